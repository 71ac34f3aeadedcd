"""Previews: the mosaic at a small width, composed from tiles decoded shrunk on load.

Batch runs (``preview.jpg``, ``stitched_from_stage.jpg``) and live stitching
draw their previews with :func:`preview_image`, so the two agree pixel for
pixel on the same tiles and positions. Each tile is decoded once at ``1/shrink``
of its size (libjpeg's DCT scaling for JPEG), kept in a :class:`PreviewTiles`
cache (live stitching keeps it across updates), and composed by the
nearest-centre rule of :mod:`ofstitch.render`, ties going to the same tile.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyvips

from . import render, tiles
from .errors import OfstitchWarning
from .flatfield import FlatField
from .levels import Levels

MAX_SHRINK = 8  # libjpeg's DCT scaling goes down to 1/8


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
    small = [cache.get(p, k, shrink, tile_shape) for p, k in zip(paths, keys, strict=True)]
    canvas = compose(small, layout)
    image = pyvips.Image.new_from_array(canvas).copy(interpretation="srgb")
    out_w = max(1, round(scan_width(positions_px, tile_shape) * scale))
    if image.width != out_w:
        image = image.resize(out_w / image.width)
    left_out = {i for i, arr in enumerate(small) if arr is None}
    return image.numpy(), canvas, left_out
