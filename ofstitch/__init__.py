"""ofstitch: fast stitching of 2D microscope scans.

Conventions, used everywhere in the package:

- Image axes and coordinates are ``(y, x)`` = ``(row, col)``, in pixels of the
  full-resolution tiles unless a name says otherwise (``_px``, ``_um``).
- A tile's position is its top-left corner. A pair ``(a, b)`` has ``a < b``
  and its shift is ``position[b] - position[a]``.
- Tiles are numbered in capture order; file names appear only at the edges.

Library use::

    import ofstitch
    reg = ofstitch.register("scan_folder")      # positions, no rendering
    reg.positions()                              # {file name: (row, col)}
    ofstitch.stitch("scan_folder")               # positions and all outputs
"""

from .errors import (
    DeviceUnavailableError,
    DisconnectedScanError,
    MetadataError,
    NoImagesError,
    OfstitchError,
    OfstitchWarning,
)
from .settings import CorrelationSettings, StitchSettings

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing ofstitch stays cheap (pyvips and scipy load on first use).
    if name in ("register", "stitch", "Registration", "StitchResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "CorrelationSettings",
    "DeviceUnavailableError",
    "DisconnectedScanError",
    "MetadataError",
    "NoImagesError",
    "OfstitchError",
    "OfstitchWarning",
    "Registration",
    "StitchResult",
    "StitchSettings",
    "register",
    "stitch",
]
