"""Tile metadata: what a tile file says about where it is.

OpenFlexure EXIF UserComment JSON in every layout the microscope has written (see
:mod:`ofstitch.scan`), the EXIF capture time, a ``name_X_Y[_Z]`` file name, a Fiji
layout file and a ``--csm-matrix`` text. Pure parsing: nothing here decides which
source wins (that is :func:`ofstitch.scan.read_tile`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import piexif

from . import layout
from .errors import OfstitchError

log = logging.getLogger(__name__)

DEFAULT_OPENFLEXURE_CSM_WIDTH = 832  # calibration width of OpenFlexure CSMs that record none


_FILENAME_POSITION = re.compile(
    r"(?:^|[_\s])(-?\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)(?:_(-?\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class TileMetadata:
    """What the file itself says about one tile. Missing values are ``None``."""

    stage_xyz: tuple[float, float, float] | None = None
    csm: tuple[tuple[float, float], tuple[float, float]] | None = None
    csm_width: int | None = None
    um_per_px: float | None = None
    capture_time: float | None = None
    from_openflexure: bool = False
    position_source: str = "none"
    csm_unreadable: bool = False
    usercomment: dict | None = field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------------------- metadata


def _nested(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def parse_usercomment(raw: bytes | str | None) -> dict | None:
    """Decode an EXIF UserComment holding JSON. Returns ``None`` when it is not JSON."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        encoding = "utf-8"
        if raw.startswith(b"UNICODE\x00"):
            raw = raw[8:]
            # UCS-2 in either byte order: the zero bytes of ASCII text tell which.
            encoding = "utf-16-be" if raw[:1] == b"\x00" else "utf-16-le"
        elif raw.startswith((b"ASCII\x00\x00\x00", b"\x00" * 8)):
            raw = raw[8:]
        try:
            raw = raw.decode(encoding)
        except UnicodeDecodeError:
            return None
    raw = raw.strip("\x00 \n\t")
    if not raw.startswith("{"):
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        out = float(value)
    except (ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def _matrix(value: Any) -> tuple[tuple[float, float], tuple[float, float]] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    rows = []
    for row in value:
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            return None
        nums = [_finite_float(v) for v in row]
        if any(v is None for v in nums):
            return None
        rows.append((nums[0], nums[1]))
    return rows[0], rows[1]


def metadata_from_usercomment(data: dict) -> TileMetadata:
    """Read position, CSM, calibration width and pixel size from OpenFlexure JSON."""
    position = (_nested(data, "stage", "position") or _nested(data, "/stage/", "position")
                or _nested(data, "instrument", "state", "stage", "position"))
    stage = None
    if isinstance(position, dict):
        x, y = _finite_float(position.get("x")), _finite_float(position.get("y"))
        z = _finite_float(position.get("z", 0)) or 0.0
        if x is not None and y is not None:
            stage = (x, y, z)
    elif isinstance(position, (list, tuple)) and len(position) >= 2:
        vals = [_finite_float(v) for v in position[:3]]
        if vals[0] is not None and vals[1] is not None:
            stage = (vals[0], vals[1], (vals[2] if len(vals) > 2 and vals[2] is not None else 0.0))

    csm_v3 = (_nested(data, "camera_stage_mapping", "image_to_stage_displacement_matrix")
              or _nested(data, "/camera_stage_mapping/", "image_to_stage_displacement_matrix"))
    csm_v2 = _nested(data, "instrument", "settings", "extensions",
                     "org.openflexure.camera_stage_mapping", "image_to_stage_displacement")
    raw_csm = csm_v3 if csm_v3 is not None else csm_v2
    csm = _matrix(raw_csm)
    resolution = (_nested(data, "camera_stage_mapping", "image_resolution")
                  or _nested(data, "/camera_stage_mapping/", "image_resolution"))
    csm_width = None
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        width = _finite_float(resolution[1])
        if width is not None and round(width) >= 1:
            csm_width = int(round(width))
    um_per_px = _finite_float(_nested(data, "instrument", "settings", "extensions", "usafcal",
                                      "um_per_px"))
    if um_per_px is None:
        um_per_px = _finite_float(_nested(data, "pixel_size_um"))
    if um_per_px is not None and um_per_px <= 0:
        um_per_px = None
    from_ofm = csm is not None or stage is not None
    if csm is not None and csm_width is None:
        csm_width = DEFAULT_OPENFLEXURE_CSM_WIDTH
    return TileMetadata(stage_xyz=stage, csm=csm, csm_width=csm_width, um_per_px=um_per_px,
                        from_openflexure=from_ofm,
                        position_source="exif" if stage is not None else "none",
                        csm_unreadable=raw_csm is not None and csm is None,
                        usercomment=data)


def _exif_time(exif: dict) -> float | None:
    for ifd, tag in (("Exif", piexif.ExifIFD.DateTimeOriginal), ("0th", piexif.ImageIFD.DateTime)):
        value = exif.get(ifd, {}).get(tag)
        if isinstance(value, bytes):
            try:
                text = value.decode("ascii").strip("\x00 ")
                return datetime.strptime(text, "%Y:%m:%d %H:%M:%S").timestamp()
            except (UnicodeDecodeError, ValueError):
                continue
    return None


def read_metadata(path: Path) -> TileMetadata:
    """Read a tile file's own metadata (EXIF UserComment JSON and capture time).

    Never raises for bad metadata: what cannot be read is ``None``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jpg", ".jpeg", ".tif", ".tiff"):
        return TileMetadata()
    try:
        exif = piexif.load(os.fspath(path))
    except Exception:  # piexif raises many types on malformed files
        return TileMetadata()
    data = parse_usercomment(exif.get("Exif", {}).get(piexif.ExifIFD.UserComment))
    meta = metadata_from_usercomment(data) if data is not None else TileMetadata()
    capture = _exif_time(exif)
    if capture is not None:
        meta = TileMetadata(**{**meta.__dict__, "capture_time": capture})
    return meta


def position_from_filename(name: str) -> tuple[float, float, float] | None:
    """``(x, y, z)`` from a ``name_X_Y[_Z]`` file name, or ``None``."""
    match = _FILENAME_POSITION.search(Path(name).stem)
    if match is None:
        return None
    values = [_finite_float(v) for v in match.groups() if v is not None]
    if any(v is None for v in values):
        return None  # too large to be a position
    return values[0], values[1], values[2] if len(values) > 2 else 0.0


def read_tile_configuration(path: Path) -> dict[str, tuple[float, float]]:
    """Positions ``{file name: (x, y)}`` (pixels, top-left) from a Fiji TileConfiguration.

    Never raises (:func:`ofstitch.layout.read_layout` without its ``dim = 3`` check;
    the scan's loaders refuse 3D layouts).
    """
    return layout.read_layout(path, refuse_3d=False)


def parse_csm(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Parse ``--csm-matrix`` text such as ``[[0, 1], [1, 0]]``, or NumPy's printing of
    a matrix, ``[[0.  1.5]\n [1.5 0. ]]`` (without commas)."""
    text = text.replace("(", "[").replace(")", "]")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        rows = re.fullmatch(r"\s*\[\s*\[([^\[\]]*)\]\s*,?\s*\[([^\[\]]*)\]\s*\]\s*", text)
        value = None if rows is None else \
            [[v for v in re.split(r"[\s,]+", row.strip()) if v] for row in rows.groups()]
    matrix = _matrix(value)
    if matrix is None:
        raise OfstitchError(
            f"--csm-matrix must be a 2x2 matrix such as '[[0, 1], [1, 0]]', got {text!r}")
    return matrix


