"""Composition: where each tile goes and which tile each pixel of the mosaic comes from.

Composition rule
----------------
Positions are rounded to whole output pixels with ``floor(p + 0.5)`` (at the
output scale), the same rule for every tile. Each output pixel comes from the
tile whose (unrounded) centre is nearest to the pixel's centre, among the tiles
that cover the pixel; a tie goes to the tile that is higher in the mosaic (then
to the earlier tile). No blending, as in OpenFlexure Stitching. With
``blend="feather"`` a pixel covered by several tiles is instead their weighted
mean, each tile weighted by the distance from the pixel to the tile's nearest
edge (a linear ramp across each overlap).

How it is built
---------------
The mosaic is made in bands of output rows. Without blending,
:class:`NearestPaster` pastes each tile's rows into a NumPy band in priority
order, where the tile is nearer than every tile pasted before it: one float32
distance per pixel and tile, and a masked copy of whole pixels as machine
words (RGB pixels get a fourth, zero band: :func:`word_bands`). The tiles are
decoded whole, once (:meth:`TileSource.decode`). With feathering, and on the
Dask workers, libvips composes a band instead (:func:`compose_band`): each tile
that touches it is cropped and placed (``embed``); a label image (one byte per
pixel, from :func:`nearest_labels`, the same rule and arithmetic) picks, with
``case``, which tile each pixel comes from, or the tiles are averaged. What
the pixels are (an 8-bit rendering, or the tiles' own data) is a
:class:`Pixels`. :mod:`ofstitch.render` streams the bands into the writers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyvips

from . import tiles
from .errors import OfstitchError, SettingError
from .levels import VIPS_DTYPES, Levels
from .settings import BLENDS

if TYPE_CHECKING:
    from .flatfield import FlatField

Blend = Literal["none", "feather"]


@dataclass(frozen=True)
class Pixels:
    """What a mosaic's pixels are.

    The default, an 8-bit RGB rendering of the tiles through ``levels``; with
    ``levels=None``, the tiles' data in the libvips pixel format ``fmt``
    (``"uchar"``, ``"ushort"``, ``"short"`` or ``"float"``) with ``bands`` bands
    (1 or 3), as the data formats keep it (:mod:`ofstitch.levels`).
    """

    levels: Levels | None = Levels()
    fmt: str = "uchar"
    bands: int = 3
    flat: FlatField | None = field(default=None, compare=False)  # divides the tiles

    @classmethod
    def data(cls, dtype: np.dtype | type, bands: int, flat: FlatField | None = None
             ) -> Pixels:
        from .levels import vips_format

        return cls(None, vips_format(dtype), bands, flat)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(VIPS_DTYPES[self.fmt])

    @property
    def interpretation(self) -> str:
        if self.bands == 3:
            return "rgb16" if self.fmt == "ushort" else "srgb"
        return "grey16" if self.fmt == "ushort" else "b-w"


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


# ----------------------------------------------------------------------------- compose


def band_rows(layout: Layout, band_height: int = 128) -> list[tuple[int, int]]:
    """``[r0, r1)`` of each band of output rows."""
    height = layout.size[0]
    return [(r, min(height, r + band_height)) for r in range(0, height, band_height)]


def priority_order(layout: Layout) -> np.ndarray:
    """Tile indices in priority order: higher in the mosaic first, then the earlier tile."""
    return np.argsort(layout.top_left[:, 0], kind="stable")


def nearest_labels(layout: Layout, box: tuple[int, int, int, int], members: Sequence[int]
                   ) -> np.ndarray:
    """For each pixel of ``box`` = ``(r0, c0, r1, c1)``, the position in ``members`` of the
    tile whose centre is nearest, among those that cover it (255 where none does).

    ``members`` must be in priority order (ties go to the earlier one) and
    number at most 255. Returns uint8, shape ``(r1 - r0, c1 - c0)``.
    """
    r0, c0, r1, c1 = box
    th, tw = layout.tile_shape
    labels = np.full((r1 - r0, c1 - c0), 255, dtype=np.uint8)
    best = np.full((r1 - r0, c1 - c0), np.inf, dtype=np.float32)
    for k, i in enumerate(members):
        ty, tx = (int(v) for v in layout.top_left[i])
        y0, y1, x0, x1 = max(r0, ty), min(r1, ty + th), max(c0, tx), min(c1, tx + tw)
        if y0 >= y1 or x0 >= x1:
            continue
        rows = np.arange(y0, y1, dtype=np.float32) + 0.5 - np.float32(layout.centre[i, 0])
        cols = np.arange(x0, x1, dtype=np.float32) + 0.5 - np.float32(layout.centre[i, 1])
        dist = rows[:, None] ** 2 + cols[None, :] ** 2
        region = best[y0 - r0:y1 - r0, x0 - c0:x1 - c0]
        nearer = dist < region
        np.copyto(region, dist, where=nearer)
        labels[y0 - r0:y1 - r0, x0 - c0:x1 - c0][nearer] = k
    return labels


def feather_weight(layout: Layout) -> pyvips.Image:
    """A tile's blending weight: the distance from each pixel centre to the nearest edge."""
    th, tw = layout.tile_shape
    xy = pyvips.Image.xyz(tw, th).cast("float")
    near = xy.linear([1.0, 1.0], [0.5, 0.5]).minpair(
        xy.linear([-1.0, -1.0], [tw - 0.5, th - 0.5]))
    return near[0].minpair(near[1]).copy_memory()


def compose_box(tile: Callable[[int], pyvips.Image], layout: Layout,
                box: tuple[int, int, int, int], members: Sequence[int], *,
                blend: Blend = "none", weight: pyvips.Image | None = None,
                pixels: Pixels = Pixels()) -> pyvips.Image:
    """One rectangle of the mosaic from the tiles ``members`` (in priority order).

    ``tile(i)`` gives tile ``i`` as a pyvips image of ``pixels``. Without blending,
    each tile is placed where it is the nearest, with ``case`` on a label image;
    with feathering, the tiles are averaged with ``weight``.
    """
    r0, c0, r1, c1 = box
    h, w = r1 - r0, c1 - c0
    th, tw = layout.tile_shape
    if not len(members):
        black = pyvips.Image.black(w, h, bands=pixels.bands)
        return black if pixels.fmt == "uchar" else black.cast(pixels.fmt)
    placed, weights = [], []
    for i in members:
        ty, tx = (int(v) for v in layout.top_left[i])
        y0, y1, x0, x1 = max(r0, ty), min(r1, ty + th), max(c0, tx), min(c1, tx + tw)
        part = tile(i).crop(x0 - tx, y0 - ty, x1 - x0, y1 - y0)
        if blend == "feather":
            wpart = weight.crop(x0 - tx, y0 - ty, x1 - x0, y1 - y0)
            part = part.cast("float") * wpart
            weights.append(wpart.embed(x0 - c0, y0 - r0, w, h) if (y1 - y0, x1 - x0) != (h, w)
                           else wpart)
        placed.append(part.embed(x0 - c0, y0 - r0, w, h) if (y1 - y0, x1 - x0) != (h, w)
                      else part)
    if blend == "feather":
        total = placed[0] if len(placed) == 1 else pyvips.Image.sum(placed)
        norm = weights[0] if len(weights) == 1 else pyvips.Image.sum(weights)
        covered = norm > 0
        mean = total / covered.ifthenelse(norm, 1.0)
        if pixels.fmt == "float":
            return mean.cast("float")
        if pixels.dtype.kind == "i":  # round half away from zero, as for unsigned values
            return ((mean > 0).ifthenelse(mean + 0.5, mean - 0.5)).cast(pixels.fmt)
        return (mean + 0.5).cast(pixels.fmt)
    if len(members) == 1:
        return placed[0]
    # Uncovered pixels (label 255) take the last tile, which is black outside itself.
    index = pyvips.Image.new_from_array(nearest_labels(layout, box, members))
    return index.case(placed)


class TileSource:
    """Tiles opened on demand, each kept open while the bands still need it."""

    def __init__(self, paths: Sequence[Path], layout: Layout, pixels: Pixels = Pixels()
                 ) -> None:
        self.paths, self.layout, self.pixels = paths, layout, pixels
        self.open: dict[int, pyvips.Image] = {}
        # 8-bit RGB at full scale, through no level mapping or flat field: an 8-bit RGB
        # JPEG tile's pixels are the mosaic's as decoded.
        self.plain_rgb = (layout.scale == 1 and pixels.flat is None and pixels.fmt == "uchar"
                          and pixels.bands == 3
                          and (pixels.levels is None or pixels.levels.identity))

    def image(self, i: int, *, decoded: np.ndarray | None = None) -> pyvips.Image:
        """Tile ``i`` as a lazy, sequential pyvips image of ``pixels`` (opened anew, or
        from ``decoded``: see :func:`ofstitch.tiles.tile_image`)."""
        flat = self.pixels.flat
        return tiles.tile_image(
            self.paths[i], self.layout.scale, self.layout.tile_shape,
            levels=self.pixels.levels, fmt=self.pixels.fmt, bands=self.pixels.bands,
            flat=flat.image(self.layout.tile_shape) if flat is not None else None,
            decoded=decoded)

    def __call__(self, i: int) -> pyvips.Image:
        if i not in self.open:
            self.open[i] = self.image(i)
        return self.open[i]

    def decode(self, i: int) -> np.ndarray:
        """Tile ``i``'s pixels, ``(h, w, bands)`` of ``pixels``' data type with the bands of
        :func:`word_bands` (decoded whole: libvips keeps no buffers for it afterwards)."""
        bands = word_bands(self.pixels)
        path = Path(self.paths[i])
        if self.plain_rgb and bands == 4:  # as Pillow decodes them (the 4th band dropped)
            words = tiles._jpeg_pixels(path, 1, words=True)
            if words is not None and words.shape[:2] == tuple(self.layout.tile_shape):
                return words
            decoded = None  # libvips opens the others
        else:
            decoded = tiles._jpeg_pixels(path, tiles._dct_shrink(self.layout.scale))
        image = self.image(i, decoded=decoded)
        if bands > image.bands:
            image = image.bandjoin_const([0] * (bands - image.bands))
        return np.frombuffer(image.write_to_memory(), dtype=self.pixels.dtype).reshape(
            image.height, image.width, bands)

    def forget_above(self, row: int) -> None:
        """Close the tiles that end above ``row``."""
        th = self.layout.tile_shape[0]
        for i in [i for i in self.open if self.layout.top_left[i, 0] + th <= row]:
            del self.open[i]


def compose_band(source: TileSource, layout: Layout, rows: tuple[int, int], *,
                 blend: Blend = "none", skip: frozenset[int] | set[int] = frozenset(),
                 weight: pyvips.Image | None = None, max_members: int = 200,
                 cols: tuple[int, int] | None = None) -> pyvips.Image:
    """Rows ``[r0, r1)`` of the mosaic (only its columns ``cols`` = ``[c0, c1)`` if
    given; each pixel is the same whatever the band), as a lazy pyvips image."""
    r0, r1 = rows
    th, tw = layout.tile_shape
    c0, width = cols if cols is not None else (0, layout.size[1])
    top = layout.top_left
    order = priority_order(layout)
    members = [int(i) for i in order if top[i, 0] < r1 and top[i, 0] + th > r0
               and top[i, 1] < width and top[i, 1] + tw > c0 and int(i) not in skip]
    # Few enough tiles per piece for an 8-bit label (and a cheap feathered sum).
    limit = max_members if blend == "none" else 8
    pieces = []
    while c0 < width:
        c1 = width
        while True:
            inside = [i for i in members if top[i, 1] < c1 and top[i, 1] + tw > c0]
            if len(inside) <= limit or c1 - c0 <= 1:
                break
            c1 = c0 + (c1 - c0) // 2
        pieces.append(compose_box(source, layout, (r0, c0, r1, c1), inside, blend=blend,
                                  weight=weight, pixels=source.pixels))
        c0 = c1
    band = pieces[0]
    for piece in pieces[1:]:
        band = band.join(piece, "horizontal")
    return band




def word_bands(pixels: Pixels) -> int:
    """The bands a tile is decoded with for :class:`NearestPaster`: RGB pixels of 1 or 2 bytes
    a sample get a fourth (zero) band, so that each pixel is one machine word."""
    return 4 if pixels.bands == 3 and pixels.dtype.itemsize in (1, 2) else pixels.bands


def pixel_view(array: np.ndarray) -> np.ndarray:
    """``array`` ``(h, w, bands)`` (its last axis contiguous) as one machine word per pixel,
    ``(h, w)``, when its pixels are 1, 2, 4 or 8 bytes (a masked copy of words is several
    times faster than one of bytes); else ``array`` itself."""
    size = array.shape[-1] * array.dtype.itemsize
    if size not in (1, 2, 4, 8):
        return array
    return array.view(f"u{size}").reshape(array.shape[:-1])


class NearestPaster:
    """Pastes tiles' rows into bands of the mosaic by the nearest-centre rule (NumPy).

    :meth:`paste`, called for a band's tiles in priority order, gives each pixel
    the tile of :func:`nearest_labels` (the same float32 arithmetic, ties to the
    earlier tile). Each tile's squared row and column offsets from its centre
    are computed once, for all the bands it crosses (:meth:`forget` drops them).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._squares: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _offsets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._squares:
            (ty, tx), (th, tw) = self.layout.top_left[i], self.layout.tile_shape
            cy, cx = (np.float32(v) for v in self.layout.centre[i])
            rows = np.arange(ty, ty + th, dtype=np.float32) + 0.5 - cy
            cols = np.arange(tx, tx + tw, dtype=np.float32) + 0.5 - cx
            self._squares[i] = rows ** 2, cols ** 2
        return self._squares[i]

    def forget(self, i: int) -> None:
        self._squares.pop(i, None)

    def paste(self, out: np.ndarray, best: np.ndarray, r0: int, i: int, part: np.ndarray
              ) -> None:
        """Paste tile ``i``'s rows ``part`` into the band ``out`` (whose first row is mosaic
        row ``r0``) where it is the nearest tile so far; ``best`` holds each pixel's
        squared distance to its nearest tile so far (``inf`` where none).

        ``part`` is the tile's rows that the band holds, ``(rows, tile width[, bands])``
        as ``out`` is ``(band rows, mosaic width[, bands])`` (see :func:`pixel_view`).
        """
        ty, tx = (int(v) for v in self.layout.top_left[i])
        y0 = max(r0, ty)
        y1 = y0 + part.shape[0]
        x0, x1 = max(0, tx), min(out.shape[1], tx + part.shape[1])
        if y0 >= y1 or x0 >= x1:
            return
        rows2, cols2 = self._offsets(i)
        dist = np.add.outer(rows2[y0 - ty:y1 - ty], cols2[x0 - tx:x1 - tx])
        region = best[y0 - r0:y1 - r0, x0:x1]
        nearer = dist < region
        np.minimum(region, dist, out=region)  # dist where nearer: the same as a masked copy
        if out.ndim == 3:
            nearer = nearer[..., None]
        np.copyto(out[y0 - r0:y1 - r0, x0:x1], part[:, x0 - tx:x1 - tx], where=nearer)


def compose(paths: Sequence[Path], layout: Layout, *, blend: Blend = "none",
            pixels: Pixels = Pixels(), skip: frozenset[int] | set[int] = frozenset()
            ) -> pyvips.Image:
    """The whole mosaic as one lazy pyvips image of band images (for small mosaics
    and tests; :func:`stream_mosaic` bounds memory for large ones)."""
    if blend not in BLENDS:
        raise SettingError("blend", f"must be one of {', '.join(BLENDS)}, got {blend!r}")
    source = TileSource(paths, layout, pixels)
    weight = feather_weight(layout) if blend == "feather" else None
    bands = [compose_band(source, layout, rows, blend=blend, skip=skip, weight=weight)
             for rows in band_rows(layout)]
    while len(bands) > 1:  # a balanced tree of joins
        bands = [bands[k].join(bands[k + 1], "vertical") if k + 1 < len(bands) else bands[k]
                 for k in range(0, len(bands), 2)]
    return bands[0].copy(interpretation=pixels.interpretation)


