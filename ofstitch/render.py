"""Rendering: compose the mosaic from the tile files with pyvips operations.

The mosaic is a lazy pyvips image: nothing is decoded until an encoder (see
:mod:`ofstitch.formats`) pulls pixels through it, strip by strip, so memory does
not grow with the mosaic's size.

Composition rule
----------------
Positions are rounded to whole output pixels with ``floor(p + 0.5)`` (at the
output scale), the same rule for every tile. Each output pixel comes from the
tile whose (unrounded) centre is nearest to the pixel's centre, among the tiles
that cover the pixel; a tie goes to the tile that is higher in the mosaic (then
to the earlier tile). No blending, as in OpenFlexure Stitching. With
``blend="feather"`` a pixel covered by several tiles is instead their weighted
mean, each tile weighted by the pixel's distance to its nearest edge (a linear
ramp across each overlap).

How it is built
---------------
The output rectangle is cut recursively (a k-d tree whose cuts are tile edges)
until, in every leaf, the set of covering tiles is the same at every pixel.
Because ``|p - a|^2 - |p - b|^2`` is linear in ``p``, the nearest-centre winner
of a whole leaf can be decided from its four corners: most leaves are a plain
crop of one tile. Leaves that a boundary between two cells crosses are halved
until they are narrow, and only those pixels are decided per pixel (pyvips
arithmetic on coordinate images). The tree of leaves becomes a balanced tree
of pyvips ``join`` operations, never a long chain of inserts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips

from . import tiles
from .errors import OfstitchError, OfstitchWarning

log = logging.getLogger(__name__)

Blend = Literal["none", "feather"]
BLENDS = ("none", "feather")

PREVIEW_WIDTH = 1000
# A leaf that a cell boundary crosses is halved until its sides are at most this long.
MIXED_LEAF_SIDE = 64


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
    positions_px = np.asarray(positions_px, dtype=np.float64)
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


# ----------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class Leaf:
    """A rectangle of the output, ``[r0, r1) x [c0, c1)``, covered by the same tiles.

    ``tiles`` are the covering tiles in priority order; ``winner`` is the tile
    that supplies every pixel, or ``None`` when the pixels must be decided one
    by one (a cell boundary crosses the leaf, or the leaf is blended).
    """

    r0: int
    c0: int
    r1: int
    c1: int
    tiles: tuple[int, ...]
    winner: int | None


@dataclass(frozen=True)
class Split:
    """Two halves of a rectangle: ``first`` above (axis 0) or left of (axis 1) ``second``."""

    axis: int
    first: Leaf | Split
    second: Leaf | Split


def _winner(layout: Layout, box: tuple[int, int, int, int], members: Sequence[int]
            ) -> int | None:
    """The tile nearest to every pixel centre of ``box``, or None if that varies."""
    if len(members) == 1:
        return members[0]
    r0, c0, r1, c1 = box
    corners = np.array([(r0 + 0.5, c0 + 0.5), (r0 + 0.5, c1 - 0.5),
                        (r1 - 0.5, c0 + 0.5), (r1 - 0.5, c1 - 0.5)])
    d = ((corners[None, :, :] - layout.centre[list(members)][:, None, :]) ** 2).sum(axis=2)
    # d[k] - d[j] is linear in the pixel position, so its sign at the corners decides
    # the whole box. Tiles earlier in ``members`` win ties.
    for k, i in enumerate(members):
        wins = True
        for j in range(len(members)):
            if j == k:
                continue
            diff = d[k] - d[j]
            if not (np.all(diff < 0) or (j > k and np.all(diff <= 0))):
                wins = False
                break
        if wins:
            return i
    return None


def partition(layout: Layout, *, blend: Blend = "none",
              skip: frozenset[int] | set[int] = frozenset()) -> Leaf | Split:
    """Cut the output into leaves covered by constant sets of tiles (see the module doc).

    Tiles in ``skip`` are left out (their neighbours cover their place where
    they overlap it; elsewhere the mosaic is black).
    """
    th, tw = layout.tile_shape
    height, width = layout.size
    top = layout.top_left
    # Priority: higher in the mosaic first, then the earlier tile (a stable sort).
    rank = np.empty(len(top), dtype=np.int64)
    rank[np.argsort(top[:, 0], kind="stable")] = np.arange(len(top))
    keep = np.array([i for i in range(len(top)) if i not in skip], dtype=np.int64)

    def leaf(box, members) -> Leaf | Split:
        r0, c0, r1, c1 = box
        members = tuple(int(i) for i in sorted(members, key=lambda i: rank[i]))
        if blend == "feather" or not members:
            return Leaf(r0, c0, r1, c1, members, members[0] if len(members) == 1 else None)
        win = _winner(layout, box, members)
        if win is not None or max(r1 - r0, c1 - c0) <= MIXED_LEAF_SIDE:
            return Leaf(r0, c0, r1, c1, members, win)
        if r1 - r0 >= c1 - c0:
            mid = (r0 + r1) // 2
            return Split(0, leaf((r0, c0, mid, c1), members), leaf((mid, c0, r1, c1), members))
        mid = (c0 + c1) // 2
        return Split(1, leaf((r0, c0, r1, mid), members), leaf((r0, mid, r1, c1), members))

    def cut(box, cand: np.ndarray) -> Leaf | Split:
        r0, c0, r1, c1 = box
        ys, xs = top[cand, 0], top[cand, 1]
        row_edges = np.concatenate([ys, ys + th])
        row_edges = row_edges[(row_edges > r0) & (row_edges < r1)]
        col_edges = np.concatenate([xs, xs + tw])
        col_edges = col_edges[(col_edges > c0) & (col_edges < c1)]
        if not len(row_edges) and not len(col_edges):
            return leaf(box, cand.tolist())  # every candidate covers the whole box
        # Cut across the longer side (in tiles), at the tile edge nearest its middle.
        along_rows = (r1 - r0) / th >= (c1 - c0) / tw
        if (along_rows and len(row_edges)) or not len(col_edges):
            at = int(row_edges[np.argmin(np.abs(row_edges - (r0 + r1) / 2))])
            a, b = (r0, c0, at, c1), (at, c0, r1, c1)
            axis = 0
            in_a = cand[ys < at]
            in_b = cand[ys + th > at]
        else:
            at = int(col_edges[np.argmin(np.abs(col_edges - (c0 + c1) / 2))])
            a, b = (r0, c0, r1, at), (r0, at, r1, c1)
            axis = 1
            in_a = cand[xs < at]
            in_b = cand[xs + tw > at]
        return Split(axis, cut(a, in_a), cut(b, in_b))

    return cut((0, 0, height, width), keep)


def leaves(node: Leaf | Split) -> list[Leaf]:
    """The leaves of a partition, in order."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Leaf):
            out.append(n)
        else:
            stack.extend((n.second, n.first))
    return out


# ----------------------------------------------------------------------------- compose


def _nearest(layout: Layout, leaf: Leaf, crops: list[pyvips.Image]) -> pyvips.Image:
    """Per-pixel nearest-centre choice between the tiles of a leaf."""
    h, w = leaf.r1 - leaf.r0, leaf.c1 - leaf.c0
    origin = np.array([leaf.r0 + 0.5, leaf.c0 + 0.5])
    c = layout.centre[list(leaf.tiles)] - origin  # centres in leaf coordinates (row, col)
    # d_j - d_0 = -2 q.(c_j - c_0) + |c_j|^2 - |c_0|^2, with q = (y, x) in the leaf.
    grad = -2 * (c[1:] - c[0])
    offset = (c[1:] ** 2).sum(axis=1) - (c[0] ** 2).sum()
    xy = pyvips.Image.xyz(w, h)  # band 0 = x (col), band 1 = y (row)
    matrix = [[float(g[1]), float(g[0])] for g in grad]
    diff = xy.recomb(matrix).linear([1.0] * len(offset), offset.tolist())
    out, best = crops[0], 0.0  # distances relative to the first tile's
    for k in range(1, len(crops)):
        dk = diff[k - 1]
        nearer = dk < best  # strict: the earlier tile wins a tie
        out = nearer.ifthenelse(crops[k], out)
        if k < len(crops) - 1:
            best = nearer.ifthenelse(dk, best)
    return out


def _feather(layout: Layout, leaf: Leaf, crops: list[pyvips.Image]) -> pyvips.Image:
    """Weighted mean of the leaf's tiles, each weighted by the distance to its nearest edge."""
    h, w = leaf.r1 - leaf.r0, leaf.c1 - leaf.c0
    th, tw = layout.tile_shape
    xy = pyvips.Image.xyz(w, h).cast("float")
    total, weight = None, None
    for i, crop in zip(leaf.tiles, crops, strict=True):
        ty, tx = layout.top_left[i]
        y0, x0 = leaf.r0 - ty + 0.5, leaf.c0 - tx + 0.5  # pixel centre, tile coordinates
        # Distances to the left, right, top and bottom edges.
        dists = xy.linear([1.0, 1.0], [x0, y0]), xy.linear([-1.0, -1.0], [tw - x0, th - y0])
        near = dists[0].minpair(dists[1])
        wi = near[0].minpair(near[1])
        term = crop.cast("float") * wi
        total = term if total is None else total + term
        weight = wi if weight is None else weight + wi
    return (total / weight + 0.5).cast("uchar")


def compose(paths: Sequence[Path], layout: Layout, *, blend: Blend = "none",
            value_scale: float = 1.0, skip: frozenset[int] | set[int] = frozenset()
            ) -> pyvips.Image:
    """The mosaic as a lazy 8-bit sRGB pyvips image (nothing is decoded yet).

    Parameters
    ----------
    paths : sequence of Path
        Tile files, indexed like ``layout``.
    layout : Layout
    blend : {"none", "feather"}
    value_scale : float
        Factor applied to the tiles' values before clipping to 0-255 (16-bit tiles).
    skip : set of int
        Tiles to leave out (undecodable ones).
    """
    if blend not in BLENDS:
        raise OfstitchError(f"--blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    tree = partition(layout, blend=blend, skip=skip)
    opened: dict[int, pyvips.Image] = {}

    def tile(i: int) -> pyvips.Image:
        if i not in opened:
            opened[i] = tiles.rgb8_image(paths[i], layout.scale, layout.tile_shape,
                                         value_scale=value_scale)
        return opened[i]

    def build(node: Leaf | Split) -> pyvips.Image:
        if isinstance(node, Split):
            a, b = build(node.first), build(node.second)
            return a.join(b, "vertical" if node.axis == 0 else "horizontal")
        h, w = node.r1 - node.r0, node.c1 - node.c0
        if not node.tiles:
            return pyvips.Image.black(w, h, bands=3)
        crops = []
        for i in (node.tiles if node.winner is None else (node.winner,)):
            ty, tx = (int(v) for v in layout.top_left[i])
            crops.append(tile(i).crop(node.c0 - tx, node.r0 - ty, w, h))
        if node.winner is not None:
            return crops[0]
        return _feather(layout, node, crops) if blend == "feather" else \
            _nearest(layout, node, crops)

    return build(tree).copy(interpretation="srgb")


def find_undecodable(paths: Sequence[Path], *, workers: int | None = None) -> set[int]:
    """Indices of the tiles whose pixels cannot be decoded (slow: decodes every tile)."""

    def bad(i: int) -> bool:
        try:
            tiles.rgb8_image(paths[i], 1.0, None).avg()
        except (pyvips.Error, tiles.TileReadError):
            return True
        return False

    with ThreadPoolExecutor(workers) as pool:
        return {i for i, b in enumerate(pool.map(bad, range(len(paths)))) if b}


class Mosaic:
    """A mosaic to write in one or several formats, leaving out undecodable tiles.

    ``Mosaic(...).write(writer)`` calls ``writer(image)`` with the lazy mosaic.
    If a tile turns out to be undecodable while it is written, that tile is
    found, left out with a warning, and the output written again.
    """

    def __init__(self, paths: Sequence[Path], positions_px: np.ndarray,
                 tile_shape: tuple[int, int], *, scale: float = 1.0, blend: Blend = "none",
                 value_scale: float = 1.0, skip: set[int] | None = None,
                 workers: int | None = None) -> None:
        self.paths = list(paths)
        self.layout = make_layout(positions_px, tile_shape, scale)
        self.blend = blend
        self.value_scale = value_scale
        self.skip: set[int] = set(skip or ())
        self.workers = workers

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return self.layout.size

    def image(self) -> pyvips.Image:
        return compose(self.paths, self.layout, blend=self.blend,
                       value_scale=self.value_scale, skip=frozenset(self.skip))

    def write(self, writer: Callable[[pyvips.Image], None]) -> None:
        try:
            writer(self.image())
            return
        except pyvips.Error:
            bad = find_undecodable(self.paths, workers=self.workers) - self.skip
            if not bad:
                raise
        for i in sorted(bad):
            # Its neighbours fill its place where they overlap it.
            warnings.warn(f"leaving out {Path(self.paths[i]).name} from the mosaic: cannot "
                          "decode it", OfstitchWarning, stacklevel=2)
        self.skip |= bad
        writer(self.image())
