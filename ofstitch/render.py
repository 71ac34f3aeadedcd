"""Rendering: compose the mosaic from the tile files with pyvips operations.

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
The mosaic is made in bands of output rows. For a band, each tile that touches
it is cropped to the band and placed (``embed``); a label image (one byte per
pixel, computed from the rule above) then picks, with ``case``, which tile
each pixel comes from. The pixels themselves only ever pass through libvips.

The bands are chained into one sequential image (:func:`stream_mosaic`): an
encoder reading it top to bottom makes libvips compose and evaluate one band
at a time, and each band's operations are freed before the next band starts.
A tile is decoded once (sequentially, top to bottom) while the bands still
need it, then closed. Memory is bounded by one band of the mosaic plus the
tiles that cross it, whatever the size of the mosaic.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips

from . import tiles
from .errors import OfstitchError, OfstitchWarning, SettingError
from .levels import VIPS_DTYPES, Levels
from .settings import BLENDS

log = logging.getLogger(__name__)

Blend = Literal["none", "feather"]

PREVIEW_WIDTH = 1000
FETCH_WIDTH = 256  # columns of a band computed at a time
_KEEP = 4 << 20  # bytes of the PNG stream kept behind the reader
# A leaf that a cell boundary crosses is halved until its sides are at most this long.
MIXED_LEAF_SIDE = 64


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

    @classmethod
    def data(cls, dtype: np.dtype | type, bands: int) -> Pixels:
        from .levels import vips_format

        return cls(None, vips_format(dtype), bands)

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


def _feather_weight(layout: Layout) -> pyvips.Image:
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

    def __call__(self, i: int) -> pyvips.Image:
        if i not in self.open:
            self.open[i] = tiles.tile_image(self.paths[i], self.layout.scale,
                                            self.layout.tile_shape, levels=self.pixels.levels,
                                            fmt=self.pixels.fmt, bands=self.pixels.bands)
        return self.open[i]

    def forget_above(self, row: int) -> None:
        """Close the tiles that end above ``row``."""
        th = self.layout.tile_shape[0]
        for i in [i for i in self.open if self.layout.top_left[i, 0] + th <= row]:
            del self.open[i]


def compose_band(source: TileSource, layout: Layout, rows: tuple[int, int], *,
                 blend: Blend = "none", skip: frozenset[int] | set[int] = frozenset(),
                 weight: pyvips.Image | None = None, max_members: int = 200
                 ) -> pyvips.Image:
    """Rows ``[r0, r1)`` of the mosaic, as a lazy pyvips image."""
    r0, r1 = rows
    th, tw = layout.tile_shape
    width = layout.size[1]
    top = layout.top_left
    order = priority_order(layout)
    members = [int(i) for i in order if top[i, 0] < r1 and top[i, 0] + th > r0
               and int(i) not in skip]
    # Few enough tiles per piece for an 8-bit label (and a cheap feathered sum).
    limit = max_members if blend == "none" else 8
    pieces, c0 = [], 0
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


def _png_geometry(pixels: Pixels, width: int) -> tuple[int, int, int]:
    """``(PNG width, bit depth, colour type)`` of the stream that carries a mosaic.

    8-bit mosaics are plain grey or RGB PNGs. Any other pixel format travels as
    the bytes of its rows, read as 16-bit grey samples (:func:`_unpack` turns
    them back), so that every value arrives exactly.
    """
    if pixels.fmt == "uchar":
        return width, 8, 2 if pixels.bands == 3 else 0
    return width * pixels.bands * pixels.dtype.itemsize // 2, 16, 0


def _unpack(image: pyvips.Image, pixels: Pixels) -> pyvips.Image:
    """The mosaic from the image its stream decodes to (see :func:`_png_geometry`)."""
    if pixels.fmt != "uchar":
        per_pixel = pixels.bands * pixels.dtype.itemsize // 2  # 16-bit samples
        if per_pixel > 1:
            image = image.bandfold(factor=per_pixel)
        image = image.copy(format=pixels.fmt, bands=pixels.bands)
    return image.copy(interpretation=pixels.interpretation)


class _PngStream:
    """An uncompressed PNG of the mosaic, made band by band as a reader asks for bytes.

    Each band is composed by pyvips from the tiles it touches and evaluated
    into memory on its own, so that libvips frees everything a band used
    before the next one starts: memory is bounded by one band.
    """

    def __init__(self, paths: Sequence[Path], layout: Layout, *, blend: Blend,
                 pixels: Pixels, skip: frozenset[int] | set[int],
                 progress: Callable[[int, int], None] | None, band_height: int) -> None:
        self.layout, self.blend, self.skip, self.progress = layout, blend, skip, progress
        self.pixels = pixels
        self.source = TileSource(paths, layout, pixels)
        self.bands = band_rows(layout, band_height)
        self.weight = _feather_weight(layout) if blend == "feather" else None
        height, width = layout.size
        png_width, depth, colour = _png_geometry(pixels, width)
        ihdr = struct.pack(">IIBBBBB", png_width, height, depth, colour, 0, 0, 0)
        self.base = self.pos = 0  # absolute offsets of buffer[0] and of the reader
        self.buffer = bytearray(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr))
        self.deflate = zlib.compressobj(0)
        self.done = False
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.threads = max(1, min(4, os.cpu_count() or 1))
        self.pool: ThreadPoolExecutor | None = None

    def read(self, size: int) -> bytes:
        while self.base + len(self.buffer) < self.pos + size and not self.done:
            self._next()
        start = self.pos - self.base
        out = bytes(self.buffer[start:start + size])
        self.pos += len(out)
        if self.pos - self.base > 2 * _KEEP:  # keep a little behind, for a rewind
            drop = self.pos - self.base - _KEEP
            del self.buffer[:drop]
            self.base += drop
        return out

    def seek(self, offset: int, whence: int) -> int:
        """Seeks within the bytes still held (libvips rewinds after reading the header).

        Being seekable keeps libvips from saving every byte read for a rewind.
        """
        target = {0: offset, 1: self.pos + offset}.get(whence, -1)
        if not self.base <= target <= self.base + len(self.buffer):
            return -1
        self.pos = target
        return target

    def close(self) -> None:
        """Stop composing (if the reader gave up early) and release the threads."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.pool is not None:
            self.pool.shutdown()

    def _next(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._produce, name="ofstitch-bands",
                                           daemon=True)
            self.thread.start()
        item = self.queue.get()
        if item is None:
            self.done = True
        elif isinstance(item, BaseException):  # reported by Mosaic.write
            self.error, self.done = item, True
        else:
            self.buffer += item

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _produce(self) -> None:
        """Compose the bands in order (on this thread, outside libvips' own workers, so
        that libvips frees each band's memory) and queue their bytes."""
        try:
            for k, rows in enumerate(self.bands):
                if self.stopped.is_set():
                    return
                data = self._band_bytes(rows)
                if self.progress is not None:  # before the reader can have the band
                    self.progress(k + 1, len(self.bands))
                self._put(data)
            self._put(self._idat(self.deflate.flush()) + _png_chunk(b"IEND", b""))
            self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _band_bytes(self, rows: tuple[int, int]) -> bytes:
        band = compose_band(self.source, self.layout, rows, blend=self.blend, skip=self.skip,
                            weight=self.weight)
        # A region fetch, not a sink: a sink would end by "minimising" the tiles
        # (dropping their sequential read caches), and the next band could not
        # resume reading them. Fetched in pieces, so that each operation's
        # buffers stay small.
        h, w = band.height, band.width
        bpp = self.pixels.bands * self.pixels.dtype.itemsize  # bytes per pixel
        scanlines = np.zeros((h, bpp * w + 1), dtype=np.uint8)  # filter type 0 (none)
        pieces = [(x, min(FETCH_WIDTH, w - x)) for x in range(0, w, FETCH_WIDTH)]
        n_threads = min(self.threads, len(pieces))
        per_thread = math.ceil(len(pieces) / n_threads)

        def fetch(share: list[tuple[int, int]]) -> None:  # one region per thread
            region = pyvips.Region.new(band)
            for x, n in share:
                piece = np.frombuffer(region.fetch(x, 0, n, h), dtype=np.uint8)
                scanlines[:, 1 + bpp * x:1 + bpp * (x + n)] = piece.reshape(h, bpp * n)

        shares = [pieces[k:k + per_thread] for k in range(0, len(pieces), per_thread)]
        if len(shares) == 1:
            fetch(shares[0])
        else:
            if self.pool is None:  # the same few threads for every band
                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ofstitch-fetch")
            list(self.pool.map(fetch, shares))
        if self.pixels.fmt != "uchar" and sys.byteorder == "little":  # PNG is big-endian
            samples = scanlines[:, 1:].reshape(h, -1, 2)
            samples[:] = samples[:, :, ::-1].copy()
        data = self._idat(self.deflate.compress(scanlines.data))
        self.source.forget_above(rows[1])
        return data

    @staticmethod
    def _idat(data: bytes) -> bytes:
        return b"".join(_png_chunk(b"IDAT", data[k:k + (1 << 20)])
                        for k in range(0, len(data), 1 << 20))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def stream_mosaic(paths: Sequence[Path], layout: Layout, *, blend: Blend = "none",
                  pixels: Pixels = Pixels(), skip: frozenset[int] | set[int] = frozenset(),
                  progress: Callable[[int, int], None] | None = None,
                  band_height: int = 128) -> tuple[pyvips.Image, _PngStream]:
    """The mosaic as a sequential pyvips image that composes itself band by band.

    Returns the image and its stream (whose ``error`` holds an exception raised
    while composing, if any). The image can be read once, top to bottom.
    """
    if blend not in BLENDS:
        raise SettingError("blend", f"must be one of {', '.join(BLENDS)}, got {blend!r}")
    stream = _PngStream(paths, layout, blend=blend, pixels=pixels, skip=skip,
                        progress=progress, band_height=band_height)
    source = pyvips.SourceCustom()
    source.on_read(stream.read)
    source.on_seek(stream.seek)
    image = pyvips.Image.new_from_source(source, "", access="sequential")
    return _unpack(image, pixels), stream


def compose(paths: Sequence[Path], layout: Layout, *, blend: Blend = "none",
            pixels: Pixels = Pixels(), skip: frozenset[int] | set[int] = frozenset()
            ) -> pyvips.Image:
    """The whole mosaic as one lazy pyvips image of band images (for small mosaics
    and tests; :func:`stream_mosaic` bounds memory for large ones)."""
    if blend not in BLENDS:
        raise SettingError("blend", f"must be one of {', '.join(BLENDS)}, got {blend!r}")
    source = TileSource(paths, layout, pixels)
    weight = _feather_weight(layout) if blend == "feather" else None
    bands = [compose_band(source, layout, rows, blend=blend, skip=skip, weight=weight)
             for rows in band_rows(layout)]
    while len(bands) > 1:  # a balanced tree of joins
        bands = [bands[k].join(bands[k + 1], "vertical") if k + 1 < len(bands) else bands[k]
                 for k in range(0, len(bands), 2)]
    return bands[0].copy(interpretation=pixels.interpretation)


def limit_malloc_arenas(n: int = 2) -> None:
    """Ask glibc for at most ``n`` malloc arenas (a no-op elsewhere).

    libvips computes on many threads; with glibc's default of up to eight arenas
    per CPU, memory freed by one band stays fragmented across arenas and the
    process grows (the usual advice for libvips servers is ``MALLOC_ARENA_MAX=2``).
    The command line calls this; a library user may prefer the variable.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def find_undecodable(paths: Sequence[Path], *, workers: int | None = None) -> set[int]:
    """Indices of the tiles whose pixels cannot be decoded (slow: decodes every tile)."""

    def bad(i: int) -> bool:
        try:
            tiles.open_tile(paths[i]).avg()
        except (pyvips.Error, tiles.TileReadError):
            return True
        return False

    with ThreadPoolExecutor(workers) as pool:
        return {i for i, b in enumerate(pool.map(bad, range(len(paths)))) if b}


class Mosaic:
    """A mosaic to write in one or several formats, leaving out undecodable tiles.

    ``Mosaic(...).write(writer)`` calls ``writer(image)`` with the mosaic as a
    sequential pyvips image that composes itself band by band (see
    :func:`stream_mosaic`). If a tile turns out to be undecodable, it is found,
    left out with a warning, and the output written again.
    """

    def __init__(self, paths: Sequence[Path], positions_px: np.ndarray,
                 tile_shape: tuple[int, int], *, scale: float = 1.0, blend: Blend = "none",
                 pixels: Pixels = Pixels(), skip: set[int] | None = None,
                 workers: int | None = None, band_height: int = 128) -> None:
        self.paths = list(paths)
        self.layout = make_layout(positions_px, tile_shape, scale)
        self.blend = blend
        self.pixels = pixels
        self.skip: set[int] = set(skip or ())
        self.workers = workers
        self.band_height = band_height

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return self.layout.size

    def _write_once(self, writer: Callable[[pyvips.Image], None],
                    progress: Callable[[int, int], None] | None) -> None:
        image, stream = stream_mosaic(self.paths, self.layout, blend=self.blend,
                                      pixels=self.pixels,
                                      skip=frozenset(self.skip), progress=progress,
                                      band_height=self.band_height)
        try:
            writer(image)
        except pyvips.Error:
            if stream.error is not None:
                raise stream.error from None
            raise
        finally:
            stream.close()
        if stream.error is not None:
            raise stream.error

    def write(self, writer: Callable[[pyvips.Image], None], *,
              progress: Callable[[int, int], None] | None = None) -> None:
        """Call ``writer(image)``; ``progress(bands done, bands)`` as the mosaic is composed."""
        try:
            self._write_once(writer, progress)
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
        self._write_once(writer, progress)
