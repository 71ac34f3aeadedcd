"""Pixel values: the data type a mosaic keeps, and the range its 8-bit renderings show.

Two kinds of output
-------------------
- **Data formats** (OME-TIFF, OME-Zarr) keep the tiles' values and channel
  count: one channel for grey tiles, three for colour (a scan with any colour
  tile is colour; its grey tiles are repeated in the three channels). The data
  type follows :func:`mosaic_dtype`.
- **Renderings** (JPEG, DZI, the slide TIFF, previews) are 8-bit RGB. 8-bit
  tiles are shown as they are. Any other depth is scaled linearly from a
  robust range of the scan, the 0.1 and 99.9 percentiles of a sample of its
  tiles (:func:`scan_levels`), computed once per run and reported: values at
  or below the low end become 0, at or above the high end 255.

The mixed-depth rule
--------------------
A scan keeps the bit depth of its majority: 8-bit tiles in a scan of mostly
16-bit tiles (or the other way round) are skipped with a warning
(:func:`ofstitch.scan.scan_from_tiles`). Among the tiles kept, the mosaic's
data type is the smallest of uint8, uint16, int16 and float32 that holds every
tile's values exactly (NumPy's type promotion, then the next of these four).
32-bit integers and float64 become float32, with a warning: float32 is exact
for integers up to 2**24 only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

from .errors import OfstitchWarning

log = logging.getLogger(__name__)

# libvips' pixel formats and their NumPy types.
VIPS_DTYPES = {"uchar": np.uint8, "char": np.int8, "ushort": np.uint16, "short": np.int16,
               "uint": np.uint32, "int": np.int32, "float": np.float32, "double": np.float64}
DTYPE_VIPS = {np.dtype(v): k for k, v in VIPS_DTYPES.items()}
# What a mosaic can hold, smallest first.
MOSAIC_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16),
                 np.dtype(np.float32))
PERCENTILES = (0.1, 99.9)
SAMPLE_TILES = 16
SAMPLE_SIDE = 256  # tiles are sampled shrunk to about this many pixels a side


def mosaic_dtype(vips_formats: Sequence[str], *, warn: bool = True) -> np.dtype:
    """The data type of a mosaic made of tiles whose libvips formats are ``vips_formats``.

    The smallest of uint8, uint16, int16 and float32 that holds each tile's values
    exactly; 32-bit integers and float64 become float32 (with a warning).
    """
    if not vips_formats:
        return np.dtype(np.uint8)
    try:
        dtypes = {np.dtype(VIPS_DTYPES[f]) for f in vips_formats}
    except KeyError as exc:
        raise ValueError(f"tiles of pixel format {exc.args[0]} cannot be stitched") from None
    common = np.result_type(*dtypes)
    for dtype in MOSAIC_DTYPES:
        if np.can_cast(common, dtype, casting="safe"):
            return dtype
    inexact = sorted(str(d) for d in dtypes if not np.can_cast(d, np.float32, casting="safe"))
    if inexact and warn:
        warnings.warn(f"the tiles are {' and '.join(inexact)} and are written as float32 (exact "
                      "for integers up to 16,777,216 and to about 7 significant digits)",
                      OfstitchWarning, stacklevel=2)
    return np.dtype(np.float32)


def vips_format(dtype: np.dtype | type) -> str:
    """libvips' name of a NumPy data type (``"ushort"`` for uint16...)."""
    return DTYPE_VIPS[np.dtype(dtype)]


@dataclass(frozen=True)
class Levels:
    """A linear map of values to 0-255: ``low`` to 0, ``high`` to 255, clipped outside."""

    low: float = 0.0
    high: float = 255.0

    @property
    def identity(self) -> bool:
        """Whether 8-bit values pass unchanged."""
        return self.low == 0.0 and self.high == 255.0

    def to_uchar(self, image: pyvips.Image) -> pyvips.Image:
        """``image`` mapped to 8 bits (rounded to the nearest value)."""
        if self.identity and image.format == "uchar":
            return image
        gain = 255.0 / (self.high - self.low)
        mapped = image.cast("float").linear(gain, 0.5 - self.low * gain)
        return (mapped > 0).ifthenelse(mapped, 0).cast("uchar")  # cast clips above 255

    def describe(self) -> str:
        return f"{self.low:.6g} to {self.high:.6g}"


def robust_range(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
                 ) -> Levels:
    """The ``percentiles`` of the finite ``values`` as :class:`Levels` (never empty)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return Levels()
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:  # a flat image: show it mid-grey rather than divide by zero
        low, high = low - 0.5, low + 0.5
    return Levels(low, high)


def scan_levels(paths: Sequence[Path], dtype: np.dtype, *, sample: int = SAMPLE_TILES,
                percentiles: tuple[float, float] = PERCENTILES) -> Levels:
    """The range the 8-bit renderings of a scan show.

    8-bit scans: 0-255, unchanged. Any other data type: the ``percentiles`` of
    the values of up to ``sample`` tiles spread over the scan (every channel),
    each decoded shrunk to about 256 px a side.
    """
    if np.dtype(dtype) == np.uint8:
        return Levels()
    from . import tiles

    picks = np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int))
    values = []
    for i in picks:
        try:
            values.append(tiles.sample_values(paths[int(i)], SAMPLE_SIDE))
        except (tiles.TileReadError, pyvips.Error):
            continue
    if not values:
        return Levels()
    levels = robust_range(np.concatenate(values), percentiles)
    log.info("8-bit renderings show %s (the %g-%g percentiles of %d tiles)", levels.describe(),
             *percentiles, len(values))
    return levels
