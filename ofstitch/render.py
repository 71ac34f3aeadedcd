"""Rendering: compose the mosaic and write the image outputs.

Each output pixel comes from the tile whose centre is nearest, among the tiles
that cover it (no blending, as in OpenFlexure Stitching). The mosaic is
composed band by band of output rows, from tiles decoded on demand, into an
uncompressed temporary file on disk; pyvips then streams that file into the
JPEG, TIFF or DZI encoders. Memory is bounded by one band plus the tiles that
touch it, whatever the size of the mosaic.

Positions are rounded to whole pixels with ``floor(p + 0.5)`` (at the output
scale) before composing, the same rule for every tile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import piexif
import pyvips

from . import tiles
from .atomic import atomic_path, write_text
from .errors import OfstitchError, OfstitchWarning

log = logging.getLogger(__name__)

JPEG_MAX_SIDE = 65535
JPEG_QUALITY = 90
PREVIEW_WIDTH = 1000
THUMBNAIL_SIZE = 400


@dataclass(frozen=True)
class Layout:
    """Where each tile goes in an output image.

    Attributes
    ----------
    top_left : ndarray, shape (n, 2), int64
        Rounded ``(row, col)`` of each tile in the output.
    centre : ndarray, shape (n, 2), float64
        Unrounded centre of each tile in the output (for the nearest-centre rule).
    tile_shape : (int, int)
        Tile ``(h, w)`` at the output scale.
    size : (int, int)
        Output ``(height, width)``.
    scale : float
        Output pixels per input pixel.
    """

    top_left: np.ndarray
    centre: np.ndarray
    tile_shape: tuple[int, int]
    size: tuple[int, int]
    scale: float


def make_layout(positions_px: np.ndarray, tile_shape: tuple[int, int], scale: float = 1.0
                ) -> Layout:
    """Layout of tiles at ``positions_px`` (top-left, full resolution) at ``scale``."""
    if not np.all(np.isfinite(positions_px)):
        raise OfstitchError("some tile positions are not finite, so no mosaic can be drawn: "
                            "delete the correlation cache and run again")
    pos = (positions_px - positions_px.min(axis=0)) * scale
    th, tw = tiles.scaled_shape(tile_shape, scale)
    top_left = np.floor(pos + 0.5).astype(np.int64)
    centre = pos + np.array([tile_shape[0], tile_shape[1]]) * scale / 2
    size = tuple(int(v) for v in top_left.max(axis=0) + (th, tw))
    return Layout(top_left, centre, (th, tw), size, scale)


def scale_for_width(positions_px: np.ndarray, tile_shape: tuple[int, int], width: int) -> float:
    """The scale at which the mosaic is at most ``width`` pixels wide (never above 1)."""
    span = positions_px[:, 1].max() - positions_px[:, 1].min() + tile_shape[1]
    return min(1.0, width / span)


def compose_to_raw(paths: list[Path], layout: Layout, raw_path: Path, *,
                   value_scale: float = 1.0, band_rows: int | None = None,
                   workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Compose the mosaic into ``raw_path`` as uint8 RGB rows (uncompressed).

    The rows are written in order, one band at a time; each band is filled from
    the tiles that intersect it, by the nearest-centre rule.
    """
    th, tw = layout.tile_shape
    height, width = layout.size
    band_rows = band_rows or max(64, th)
    n_bands = math.ceil(height / band_rows)
    top = layout.top_left
    order = np.argsort(top[:, 0], kind="stable")
    decoded: OrderedDict[int, np.ndarray] = OrderedDict()
    workers = workers or os.cpu_count() or 1

    def decode(i: int) -> np.ndarray | None:
        try:
            if layout.scale == 1.0:
                return tiles.read_rgb8(paths[i], value_scale=value_scale)
            return tiles.read_rgb8_scaled(paths[i], layout.scale, (th, tw),
                                          value_scale=value_scale)
        except tiles.TileReadError as exc:
            # Its neighbours fill its place where they overlap it.
            warnings.warn(f"leaving out {Path(paths[i]).name} from the mosaic: {exc}",
                          OfstitchWarning, stacklevel=2)
            return None

    with open(raw_path, "wb") as out, ThreadPoolExecutor(workers) as pool:
        for band in range(n_bands):
            r0, r1 = band * band_rows, min(height, (band + 1) * band_rows)
            members = [int(i) for i in order if top[i, 0] < r1 and top[i, 0] + th > r0]
            missing = [i for i in members if i not in decoded]
            for i, arr in zip(missing, pool.map(decode, missing), strict=True):
                decoded[i] = arr
            canvas = np.zeros((r1 - r0, width, 3), dtype=np.uint8)
            best = np.full((r1 - r0, width), np.inf, dtype=np.float32)
            for i in members:
                if decoded[i] is None:
                    continue
                ty, tx = top[i]
                y0, y1 = max(r0, ty), min(r1, ty + th)
                x0, x1 = max(0, tx), min(width, tx + tw)
                rows = np.arange(y0, y1, dtype=np.float32) + 0.5 - layout.centre[i, 0]
                cols = np.arange(x0, x1, dtype=np.float32) + 0.5 - layout.centre[i, 1]
                dist = rows[:, None] ** 2 + cols[None, :] ** 2
                region = best[y0 - r0:y1 - r0, x0:x1]
                nearer = dist < region
                np.copyto(region, dist, where=nearer)
                np.copyto(canvas[y0 - r0:y1 - r0, x0:x1],
                          decoded[i][y0 - ty:y1 - ty, x0 - tx:x1 - tx], where=nearer[..., None])
            out.write(canvas.tobytes())
            # Forget tiles that end above the next band.
            for i in list(decoded):
                if top[i, 0] + th <= r1:
                    del decoded[i]
            if progress is not None:
                progress(band + 1, n_bands)


def _exif_bytes(metadata: dict | None, pixel_size_um: float | None, n_tiles: int,
                extra: dict | None = None) -> bytes:
    comment = dict(metadata or {})
    for key in ("stage", "/stage/"):
        comment.pop(key, None)
    comment.update({"Notes": "Stitched by ofstitch", "NumberOfImages": n_tiles})
    if pixel_size_um is not None:
        comment["pixel_size_um"] = pixel_size_um
    if extra:
        comment.update(extra)
    zeroth: dict = {piexif.ImageIFD.Software: b"ofstitch"}
    if pixel_size_um:
        px_per_cm = 1e4 / pixel_size_um
        rational = (int(round(px_per_cm * 1000)), 1000)
        zeroth.update({piexif.ImageIFD.XResolution: rational,
                       piexif.ImageIFD.YResolution: rational,
                       piexif.ImageIFD.ResolutionUnit: 3})
    exif = {"0th": zeroth,
            "Exif": {piexif.ExifIFD.UserComment: json.dumps(comment).encode("utf-8")}}
    return piexif.dump(exif)


def _atomic_save(image: pyvips.Image, path: Path, save: Callable[[pyvips.Image, str], None]
                 ) -> None:
    with atomic_path(path) as tmp:
        save(image, tmp)


def write_jpeg(image: pyvips.Image, path: Path, *, metadata: dict | None = None,
               pixel_size_um: float | None = None, n_tiles: int = 0,
               quality: int = JPEG_QUALITY, extra: dict | None = None) -> None:
    """Save ``image`` as a JPEG with ofstitch EXIF (UserComment JSON, resolution)."""
    if max(image.width, image.height) > JPEG_MAX_SIDE:
        raise OfstitchError(
            f"the mosaic is {image.width}x{image.height} px, larger than JPEG allows "
            f"({JPEG_MAX_SIDE} px per side): use --stitch-tiff or --stitch-dzi, or "
            "--stitching-mode preview")
    image = image.copy()
    image.set_type(pyvips.GValue.blob_type, "exif-data",
                   _exif_bytes(metadata, pixel_size_um, n_tiles, extra))
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    _atomic_save(image, path, lambda im, p: im.jpegsave(p, Q=quality, keep="exif"))


def write_tiff(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
               tile_size: int = 256) -> None:
    """Save a tiled, pyramidal, JPEG-compressed TIFF (BigTIFF)."""
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    _atomic_save(image, path, lambda im, p: im.tiffsave(
        p, tile=True, pyramid=True, compression="jpeg", Q=JPEG_QUALITY, bigtiff=True,
        tile_width=tile_size, tile_height=tile_size, resunit="cm"))


def write_dzi(image: pyvips.Image, path: Path, *, tile_size: int = 256) -> None:
    """Save a Deep Zoom pyramid: ``path`` (.dzi) and the ``*_files`` folder beside it."""
    path = Path(path)
    base = path.with_suffix("")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".dzi.", dir=path.parent))
    try:
        image.dzsave(str(tmp_dir / base.name), tile_size=tile_size, suffix=".jpg[Q=90]")
        files_dir = path.parent / f"{base.name}_files"
        if files_dir.exists():
            shutil.rmtree(files_dir)
        os.replace(tmp_dir / f"{base.name}_files", files_dir)
        os.replace(tmp_dir / f"{base.name}.dzi", path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_tile_configuration(path: Path, names: list[str], positions_px: np.ndarray) -> None:
    """Fiji TileConfiguration (``name; ; (x, y)``, top-left, pixels)."""
    lines = ["# Define the number of dimensions used", "dim = 2", "",
             "# Define the image coordinates"]
    for name, (row, col) in zip(names, positions_px.tolist(), strict=True):
        lines.append(f"{name}; ; ({col:.3f}, {row:.3f})")
    write_text(path, "\n".join(lines) + "\n")


def mosaic_image(raw_path: Path, layout: Layout) -> pyvips.Image:
    """Open a composed raw mosaic as a pyvips image (streamed from disk)."""
    height, width = layout.size
    return pyvips.Image.rawload(str(raw_path), width, height, 3).copy(interpretation="srgb")


def render(paths: list[Path], positions_px: np.ndarray, tile_shape: tuple[int, int],
           work_dir: Path, *, scale: float = 1.0, value_scale: float = 1.0,
           progress: Callable[[int, int], None] | None = None) -> tuple[pyvips.Image, Path]:
    """Compose the mosaic at ``scale`` into a temporary raw file in ``work_dir``.

    Returns the pyvips image and the raw file's path; delete the file when done.
    """
    layout = make_layout(positions_px, tile_shape, scale)
    fd, raw = tempfile.mkstemp(prefix=".ofstitch-mosaic.", suffix=".raw", dir=work_dir)
    os.close(fd)
    try:
        compose_to_raw(paths, layout, Path(raw), value_scale=value_scale, progress=progress)
    except BaseException:
        os.unlink(raw)
        raise
    return mosaic_image(Path(raw), layout), Path(raw)


def write_thumbnail(source: Path, path: Path, size: int = THUMBNAIL_SIZE) -> None:
    """A small JPEG that fits in ``size`` x ``size``."""
    image = pyvips.Image.thumbnail(str(source), size, height=size)
    _atomic_save(image, path, lambda im, p: im.jpegsave(p, Q=85, keep="none"))
