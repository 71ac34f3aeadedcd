"""Previews: the mosaic at a small width, composed from tiles decoded shrunk on load,
or from the full-resolution mosaic's bands.

Live stitching and the batch runs that write no full-resolution JPEG (``--stitching-mode
preview``, ``stitched_from_stage.jpg``) draw their previews with :func:`preview_image`,
so the two agree pixel for pixel on the same tiles and positions. Each tile is decoded
once at ``1/shrink`` of its size (libjpeg's DCT scaling for JPEG), kept in a
:class:`PreviewTiles` cache (live stitching keeps it across updates), and composed by
the nearest-centre rule of :mod:`ofstitch.render`, ties going to the same tile.

A full stitch that writes the full-resolution JPEG draws ``preview.jpg`` from that
JPEG's bands as they stream past (:class:`BandPreview`, the mean of the pixels each
preview pixel covers), so that each tile is decoded once for both.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyvips

from . import formats, render, tiles
from .errors import OfstitchWarning
from .flatfield import FlatField
from .levels import Levels
from .scan import Scan

MAX_SHRINK = 8  # libjpeg's DCT scaling goes down to 1/8
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def shrink_for(scale: float) -> int:
    """The power-of-two shrink (1 to 8) whose scale ``1/shrink`` is at least ``scale``."""
    if scale >= 1:
        return 1
    return int(min(MAX_SHRINK, 2 ** math.floor(math.log2(1 / scale) + 1e-9)))


def scan_width(positions_px: np.ndarray, tile_shape: tuple[int, int]) -> float:
    """Width of the mosaic, in full-resolution pixels."""
    return float(positions_px[:, 1].max() - positions_px[:, 1].min() + tile_shape[1])


class PreviewTiles:
    """Tiles decoded as 8-bit RGB at ``1/shrink`` of their size, kept by (file key, shrink),
    their values mapped to 8 bits by ``levels`` (:func:`ofstitch.levels.scan_levels`).

    Thread-safe: one writer may fill it while readers compose previews. Change
    ``levels`` only together with :meth:`clear`.
    """

    def __init__(self, levels: Levels | None = None, flat: FlatField | None = None) -> None:
        self.levels = levels or Levels()
        self.flat = flat  # an illumination profile divided out (batch previews)
        self._tiles: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def decode(self, path: Path, key: str, shrink: int, shape: tuple[int, int]) -> np.ndarray:
        """Tile ``path`` at ``1/shrink``, ``shape`` = its full-resolution ``(h, w)``; raises
        :class:`~ofstitch.tiles.TileReadError` if it cannot be decoded."""
        with self._lock:
            arr = self._tiles.get((key, shrink))
        if arr is not None:
            return arr
        arr = tiles.read_rgb8_scaled(path, 1.0 / shrink, tiles.scaled_shape(shape, 1.0 / shrink),
                                     levels=self.levels,
                                     flat=None if self.flat is None else self.flat.image(
                                         tiles.scaled_shape(shape, 1.0 / shrink)))
        arr.flags.writeable = False
        with self._lock:
            self._tiles[(key, shrink)] = arr
        return arr

    def get(self, path: Path, key: str, shrink: int, shape: tuple[int, int]
            ) -> np.ndarray | None:
        """As :meth:`decode`, but an undecodable tile warns and gives ``None``."""
        try:
            return self.decode(path, key, shrink, shape)
        except tiles.TileReadError as exc:
            warnings.warn(f"leaving out {Path(path).name} from the preview: {exc}",
                          OfstitchWarning, stacklevel=3)
            return None

    def keep_only(self, shrink: int) -> None:
        """Forget the tiles decoded at other sizes."""
        with self._lock:
            self._tiles = {k: v for k, v in self._tiles.items() if k[1] == shrink}

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()

    def prepare(self, scan: Scan, positions_px: np.ndarray, width: int) -> int:
        """Decode every tile at the shrink a ``width``-pixel preview needs (and forget the
        other sizes); returns that shrink."""
        shrink = shrink_for(render.scale_for_width(positions_px, scan.tile_shape, width))
        for i in range(len(scan)):
            self.get(scan.path(i), scan.files[i].key, shrink, scan.tile_shape)
        self.keep_only(shrink)
        return shrink


def compose(small: Sequence[np.ndarray | None], layout: render.Layout) -> np.ndarray:
    """Compose tiles already at ``layout.scale`` into one uint8 RGB array.

    ``small[i]`` is tile ``i`` as ``(h, w, 3)`` uint8 at the layout's tile shape, or
    ``None`` (left out). Each pixel comes from the covering tile whose centre is
    nearest, ties going as in :func:`ofstitch.render.nearest_labels`.
    """
    height, width = layout.size
    th, tw = layout.tile_shape
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    best = np.full((height, width), np.inf, dtype=np.float32)
    for i in render.priority_order(layout):
        arr = small[i]
        if arr is None:
            continue
        ty, tx = (int(v) for v in layout.top_left[i])
        region = best[ty:ty + th, tx:tx + tw]
        h, w = region.shape
        rows = np.arange(ty, ty + h, dtype=np.float32) + 0.5 - np.float32(layout.centre[i, 0])
        cols = np.arange(tx, tx + w, dtype=np.float32) + 0.5 - np.float32(layout.centre[i, 1])
        dist = rows[:, None] ** 2 + cols[None, :] ** 2
        nearer = dist < region
        np.copyto(region, dist, where=nearer)
        np.copyto(canvas[ty:ty + h, tx:tx + w], arr[:h, :w], where=nearer[..., None])
    return canvas


def draw(scan: Scan, positions_px: np.ndarray, width: int, cache: PreviewTiles, *,
         jpeg: Path | None = None, dzi: Path | None = None, extra: dict | None = None
         ) -> tuple[np.ndarray, set[int]]:
    """The preview of ``scan`` at ``positions_px``, at most ``width`` pixels wide.

    ``jpeg``: also write it there (atomically, with ofstitch EXIF: the pixel size,
    the first tile's metadata, ``extra``). ``dzi``: also write a Deep Zoom pyramid
    there, at the resolution of the decoded tiles (no viewer page). Returns the
    image ``(h, w, 3)`` uint8 and the tiles left out (undecodable).
    """
    image, canvas, left_out = preview_image(scan.paths, [f.key for f in scan.files],
                                            positions_px, scan.tile_shape, width, cache)
    if jpeg is not None:
        write_jpeg(image, Path(jpeg), scan,
                   render.scale_for_width(positions_px, scan.tile_shape, width), extra=extra)
    if dzi is not None:
        formats.write_dzi(pyvips.Image.new_from_array(canvas).copy(interpretation="srgb"),
                          Path(dzi), viewer=False)
    return image, left_out


def write_jpeg(image: np.ndarray, path: Path, scan: Scan, scale: float, *,
               extra: dict | None = None) -> None:
    """Write a preview ``image`` (``(h, w, 3)`` uint8, the mosaic at ``scale``) as the
    JPEG ``path``, atomically, with ofstitch EXIF (the pixel size, the first tile's
    metadata, ``extra``)."""
    pixel = scan.pixel_size_um / scale if scan.pixel_size_um else None
    formats.write_jpeg(pyvips.Image.new_from_array(image).copy(interpretation="srgb"), path,
                       metadata=scan.metadata, pixel_size_um=pixel, n_tiles=len(scan),
                       extra=extra)


def preview_image(paths: Sequence[Path], keys: Sequence[str], positions_px: np.ndarray,
                  tile_shape: tuple[int, int], width: int, cache: PreviewTiles
                  ) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """The mosaic at most ``width`` pixels wide.

    Returns ``(image, canvas, left_out)``: the preview ``(h, w, 3)`` uint8, the
    composed canvas at the decoded tiles' resolution (for a Deep Zoom preview),
    and the tiles that could not be decoded.
    """
    scale = render.scale_for_width(positions_px, tile_shape, width)
    shrink = shrink_for(scale)
    layout = render.make_layout(positions_px, tile_shape, 1.0 / shrink)
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="ofstitch-preview") as pool:
        # libvips decodes outside the GIL: the tiles decode on every core
        small = list(pool.map(lambda pk: cache.get(pk[0], pk[1], shrink, tile_shape),
                              zip(paths, keys, strict=True)))
    canvas = compose(small, layout)
    image = pyvips.Image.new_from_array(canvas).copy(interpretation="srgb")
    out_w = max(1, round(scan_width(positions_px, tile_shape) * scale))
    if image.width != out_w:
        image = image.resize(out_w / image.width)
    left_out = {i for i, arr in enumerate(small) if arr is None}
    return image.numpy(), canvas, left_out


class BandPreview:
    """A preview composed from a full-resolution mosaic's bands as they stream past
    (:meth:`add`, from the top): each preview pixel is the mean of the mosaic pixels it
    covers. A full stitch draws its preview so, from the bands of its JPEG, and decodes
    each tile once for both (:func:`draw` decodes them again, shrunk on load).

    ``size``: the mosaic's ``(height, width)``; the preview is at most ``width`` pixels
    wide (``shape``, at ``scale`` of the mosaic). The rows of each preview row are summed
    first (whole rows, contiguous), then their columns once.
    """

    def __init__(self, size: tuple[int, int], width: int) -> None:
        self.size = size
        h, w = size
        scale = min(1.0, width / w)
        out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
        self.shape = (out_h, out_w)
        self.scale = out_w / w
        # Preview column k (row j) covers mosaic columns (rows) from ceil(k * w / out_w).
        self._col_start = -((-np.arange(out_w) * w) // out_w)
        self._col_count = np.diff(np.append(self._col_start, w))
        self._row_start = -((-np.arange(out_h + 1) * h) // out_h)
        self._image = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        self._row_sum: np.ndarray | None = None  # the current preview row's rows, summed
        self._row = 0  # the current preview row

    def add(self, rows: tuple[int, int], band: np.ndarray) -> None:
        """Add mosaic rows ``[r0, r1)``, ``band`` ``(r1 - r0, width, 3 or 4)`` uint8 (a
        fourth band is ignored), in order. A band from row 0 starts the preview again."""
        r0, r1 = rows
        if r0 == 0:
            self._image[...] = 0
            self._row, self._row_sum = 0, None
        while r0 < r1:
            end = min(r1, int(self._row_start[self._row + 1]))
            part = band[r0 - rows[0]:end - rows[0]].sum(axis=0, dtype=np.uint32)
            self._row_sum = part if self._row_sum is None else self._row_sum + part
            r0 = end
            if end == self._row_start[self._row + 1]:  # the preview row is complete
                self._finish_row()

    def _finish_row(self) -> None:
        j = self._row
        n_rows = int(self._row_start[j + 1] - self._row_start[j])
        sums = np.add.reduceat(self._row_sum, self._col_start, axis=0)[:, :3]
        self._image[j] = np.round(sums / (n_rows * self._col_count[:, None])).astype(np.uint8)
        self._row, self._row_sum = j + 1, None

    def image(self) -> np.ndarray:
        """The preview, ``(h, w, 3)`` uint8."""
        return self._image
