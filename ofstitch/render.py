"""Rendering: the mosaic as one sequential pyvips image that the writers pull through.

The writers read the mosaic (:func:`stream_mosaic`) from an uncompressed
BigTIFF that is made as libvips reads it, one strip per band of
:mod:`ofstitch.compose`: its header says where every band's bytes lie, so
libtiff asks for each band in one read. The bands are composed on a thread of
their own, a little ahead of the reader. Without blending, each tile is
decoded whole, once, on a small pool of threads (libvips releases the GIL) as
the bands approach it, pasted into the bands that cross it with NumPy, and
dropped when the bands have passed it. Memory is bounded by a few bands of the
mosaic plus the decoded tiles that cross the current band (for a scan of 820 x
616 px tiles, about two rows of tiles at 2 MB a tile), whatever the number of
rows of tiles. :class:`Mosaic` leaves out, with a warning, the tiles that turn
out to be undecodable.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import itertools
import logging
import math
import os
import queue
import signal
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyvips

from . import tiles
from .compose import (  # noqa: F401  (the composition, re-exported for render's users)
    Blend,
    Layout,
    NearestPaster,
    Pixels,
    TileSource,
    band_rows,
    compose,
    compose_band,
    compose_box,
    feather_weight,
    make_layout,
    nearest_labels,
    pixel_view,
    priority_order,
    scale_for_width,
    word_bands,
)
from .errors import OfstitchWarning, SettingError
from .settings import BLENDS

log = logging.getLogger(__name__)

PREVIEW_WIDTH = 1000
FETCH_WIDTH = 256  # columns of a blended band computed at a time

_TIFF_SAMPLE_FORMAT = {"u": 1, "i": 2, "f": 3}  # TIFF's SampleFormat of a NumPy kind


def _tiff_header(size: tuple[int, int], bands: int, dtype: np.dtype,
                 strip_rows: Sequence[tuple[int, int]]) -> tuple[bytes, list[int]]:
    """The header of an uncompressed BigTIFF in the machine's byte order whose strips are
    the bands ``strip_rows``, and the offset of each strip (they follow the header).

    ``bands`` samples a pixel of ``dtype``; a fourth band of an RGB image is an extra
    sample (``_unpack`` drops it).
    """
    order = "<" if sys.byteorder == "little" else ">"
    height, width = size
    bpp = bands * dtype.itemsize
    counts = [(r1 - r0) * width * bpp for r0, r1 in strip_rows]
    short, long_, long8 = 3, 4, 16  # TIFF field types

    def inline(fmt: str, values: Sequence[int]) -> bytes:  # a value held in the entry
        return struct.pack(f"{order}{len(values)}{fmt}", *values).ljust(8, b"\0")

    entries = [(256, long_, 1, inline("I", [width])), (257, long_, 1, inline("I", [height])),
               (258, short, bands, inline("H", [8 * dtype.itemsize] * bands)),
               (259, short, 1, inline("H", [1])),  # no compression
               (262, short, 1, inline("H", [2 if bands >= 3 else 1])),  # RGB or grey
               (273, long8, len(counts), None),  # strip offsets
               (277, short, 1, inline("H", [bands])),
               (278, long_, 1, inline("I", [strip_rows[0][1] - strip_rows[0][0]])),
               (279, long8, len(counts), None)]  # strip byte counts
    if bands == 4:
        entries.append((338, short, 1, inline("H", [0])))  # an unspecified extra sample
    entries.append((339, short, bands, inline("H", [_TIFF_SAMPLE_FORMAT[dtype.kind]] * bands)))
    # The strips' offsets and byte counts: arrays after the IFD, or in their entries
    # when there is one strip (BigTIFF keeps a value of 8 bytes or fewer in its entry).
    n_arrays = 2 if len(counts) > 1 else 0
    arrays = 16 + 8 + 20 * len(entries) + 8  # after the header and the IFD
    data = arrays + n_arrays * 8 * len(counts)
    offsets = [int(o) for o in np.cumsum([data] + counts[:-1])]
    pack = functools.partial(struct.pack, f"{order}{len(counts)}Q")
    if n_arrays:
        where = {273: struct.pack(f"{order}Q", arrays),
                 279: struct.pack(f"{order}Q", arrays + 8 * len(counts))}
    else:
        where = {273: pack(*offsets), 279: pack(*counts)}
    ifd = struct.pack(f"{order}Q", len(entries)) + b"".join(
        struct.pack(f"{order}HHQ", tag, kind, count) + (where[tag] if value is None else value)
        for tag, kind, count, value in entries) + struct.pack(f"{order}Q", 0)
    head = (b"II" if order == "<" else b"MM") + struct.pack(f"{order}HHHQ", 43, 8, 0, 16)
    header = head + ifd + (pack(*offsets) + pack(*counts) if n_arrays else b"")
    assert len(header) == data
    return header, offsets


def _unpack(image: pyvips.Image, pixels: Pixels) -> pyvips.Image:
    """The mosaic from the image its stream decodes to (less the extra band of
    :func:`~ofstitch.compose.word_bands`)."""
    if image.bands > pixels.bands:
        image = image.extract_band(0, n=pixels.bands)
    return image.copy(interpretation=pixels.interpretation)


class _TiffStream:
    """An uncompressed BigTIFF of the mosaic, one strip a band, made as a reader asks.

    The header, written first, says where each band's bytes lie, so the file is
    known before its pixels exist. Bands are composed on a thread of their own
    (:meth:`_produce`) a little ahead of the reader, and each is dropped once
    read: memory is bounded by a few bands. libtiff reads a whole strip at a
    time, so each band crosses into libvips in one piece.
    """

    def __init__(self, paths: Sequence[Path], layout: Layout, *, blend: Blend,
                 pixels: Pixels, skip: frozenset[int] | set[int],
                 progress: Callable[[int, int], None] | None, band_height: int,
                 on_band: Callable[[tuple[int, int], np.ndarray], None] | None = None) -> None:
        self.layout, self.blend, self.skip, self.progress = layout, blend, skip, progress
        self.on_band = on_band
        self.pixels = pixels
        self.source = TileSource(paths, layout, pixels)
        self.bands = band_rows(layout, band_height)
        self.weight = feather_weight(layout) if blend == "feather" else None
        self.header, self.starts = _tiff_header(layout.size, word_bands(pixels), pixels.dtype,
                                                self.bands)
        bpp = word_bands(pixels) * pixels.dtype.itemsize
        self.length = len(self.header) + layout.size[0] * layout.size[1] * bpp
        self.pos = 0  # the reader's offset
        self.held: tuple[int, memoryview] | None = None  # (band, its bytes)
        self.done = False
        self.error: BaseException | None = None
        # Tiles that could not be decoded (nearest-centre bands): left out as they are met,
        # their neighbours filling their place; Mosaic.write warns about them.
        self.failed: dict[int, BaseException] = {}
        # Signals that arrived while libvips renders (see _deferred_signals): the stream
        # then ends at once, and Mosaic.write delivers them when libvips has returned.
        self.signals: list[int] = []
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.threads = max(1, min(4, os.cpu_count() or 1))
        self.pool: ThreadPoolExecutor | None = None
        self.band_height = band_height
        self.decode_ahead = band_height  # rows below a band whose tiles decode meanwhile

    def read(self, size: int) -> bytes | memoryview:
        if self.signals:  # stopping: libvips sees the stream end and gives up
            return b""
        if self.pos < len(self.header):
            out = self.header[self.pos:self.pos + size]
        else:
            k = bisect.bisect_right(self.starts, self.pos) - 1
            while not self.done and (self.held is None or self.held[0] < k):
                self._next()
            if self.held is None or self.held[0] != k:
                return b""  # ended early (an error), or a band already dropped
            offset = self.pos - self.starts[k]
            out = self.held[1][offset:offset + size]
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int) -> int:
        """Seeks anywhere in the file (reading goes forward, one strip after the other)."""
        target = {0: offset, 1: self.pos + offset, 2: self.length + offset}.get(whence, -1)
        if not 0 <= target <= self.length:
            return -1
        self.pos = target
        return target

    def close(self) -> None:
        """Stop composing (if the reader gave up early) and release the threads."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

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
            self.held = item

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
            bands = self._nearest_bands() if self.blend == "none" else (
                (rows, self._blended_band(rows)) for rows in self.bands)
            for k, (rows, band) in enumerate(bands):
                if self.stopped.is_set():
                    return
                self.source.forget_above(rows[1])
                if self.on_band is not None:  # before the buffer can be reused
                    self.on_band(rows, band)
                if self.progress is not None:  # before the reader can have the band
                    self.progress(k + 1, len(self.bands))
                self._put((k, memoryview(band.reshape(-1).view(np.uint8))))
            self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _decode_by_band(self, i: int) -> collections.deque[np.ndarray]:
        """Tile ``i`` decoded, cut into the rows each band it crosses takes (copies, so that
        each piece is freed as soon as its band is composed)."""
        tile = self.source.decode(i)
        ty, step = int(self.layout.top_left[i, 0]), self.band_height
        cuts = [ty, *range((ty // step + 1) * step, ty + len(tile), step), ty + len(tile)]
        return collections.deque(tile[a - ty:b - ty].copy() for a, b in itertools.pairwise(cuts))

    def _nearest_bands(self) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """The bands of the nearest-centre mosaic, pasted with NumPy from tiles decoded
        on the pool a band ahead of the one being composed."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ofstitch-decode")
        layout, th = self.layout, self.layout.tile_shape[0]
        top = layout.top_left[:, 0]
        order = [int(i) for i in priority_order(layout) if int(i) not in self.skip]  # by top
        tops = top[order]  # sorted: the tiles crossing a band are a run of ``order``
        paster = NearestPaster(layout)
        decoded: dict[int, Future] = {}
        started = 0
        shape = (max((r1 - r0 for r0, r1 in self.bands), default=0), layout.size[1])
        best_buffer = np.empty(shape, dtype=np.float32)
        # Band buffers, reused in turn once the reader is done with them: the one being
        # composed, the queued ones, and the one being read.
        ring = [np.empty((*shape, word_bands(self.pixels)), dtype=self.pixels.dtype)
                for _ in range(self.queue.maxsize + 2)]
        for k, rows in enumerate(self.bands):
            r0, r1 = rows
            while started < len(order) and top[order[started]] < r1 + self.decode_ahead:
                decoded[order[started]] = self.pool.submit(self._decode_by_band, order[started])
                started += 1
            out, best = ring[k % len(ring)][:r1 - r0], best_buffer[:r1 - r0]
            out.fill(0)
            best.fill(np.inf)
            words = pixel_view(out)
            first, end = np.searchsorted(tops, r0 - th, "right"), np.searchsorted(tops, r1)
            for i in order[first:end]:
                if i in self.failed:  # never pasted: the nearer of the others take its pixels
                    continue
                try:
                    pieces = decoded[i].result()
                except (pyvips.Error, tiles.TileReadError) as exc:
                    self.failed[i] = exc
                    del decoded[i]
                    continue
                paster.paste(words, best, r0, i, pixel_view(pieces.popleft()))
                if not pieces:  # the tile's last band
                    del decoded[i]
                    paster.forget(i)
            yield rows, out

    def _blended_band(self, rows: tuple[int, int]) -> np.ndarray:
        band = compose_band(self.source, self.layout, rows, blend=self.blend, skip=self.skip,
                            weight=self.weight)
        bands = word_bands(self.pixels)
        if bands > band.bands:
            band = band.bandjoin_const([0] * (bands - band.bands))
        # A region fetch, not a sink: a sink would end by "minimising" the tiles
        # (dropping their sequential read caches), and the next band could not
        # resume reading them. Fetched in pieces, so that each operation's
        # buffers stay small.
        h, w = band.height, band.width
        out = np.empty((h, w, bands), dtype=self.pixels.dtype)
        pieces = [(x, min(FETCH_WIDTH, w - x)) for x in range(0, w, FETCH_WIDTH)]
        n_threads = min(self.threads, len(pieces))
        per_thread = math.ceil(len(pieces) / n_threads)

        def fetch(share: list[tuple[int, int]]) -> None:  # one region per thread
            region = pyvips.Region.new(band)
            for x, n in share:
                out[:, x:x + n] = np.frombuffer(region.fetch(x, 0, n, h), dtype=out.dtype
                                                ).reshape(h, n, bands)

        shares = [pieces[k:k + per_thread] for k in range(0, len(pieces), per_thread)]
        if len(shares) == 1:
            fetch(shares[0])
        else:
            if self.pool is None:  # the same few threads for every band
                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ofstitch-fetch")
            list(self.pool.map(fetch, shares))
        return out


@contextlib.contextmanager
def _deferred_signals(record: list[int]) -> Iterator[None]:
    """While libvips renders, Ctrl-C and SIGTERM are recorded in ``record`` instead of
    raised: an exception raised inside one of libvips' callbacks into Python is printed
    and dropped by cffi, and the run would go on. The stream ends at once instead, and
    the signals are delivered again, to the handlers there were before, when libvips
    has returned (so Ctrl-C still raises KeyboardInterrupt, within a band's time)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: record.append(signum))
                for s in kinds}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(record):
            signal.raise_signal(s)


def stream_mosaic(paths: Sequence[Path], layout: Layout, *, blend: Blend = "none",
                  pixels: Pixels = Pixels(), skip: frozenset[int] | set[int] = frozenset(),
                  progress: Callable[[int, int], None] | None = None,
                  band_height: int = 128,
                  on_band: Callable[[tuple[int, int], np.ndarray], None] | None = None
                  ) -> tuple[pyvips.Image, _TiffStream]:
    """The mosaic as a sequential pyvips image that composes itself band by band.

    Returns the image and its stream (whose ``error`` holds an exception raised
    while composing, if any). The image can be read once, top to bottom.
    ``on_band(rows, pixels)`` sees each band as it is composed (its buffer is reused
    afterwards), from the top, on the composing thread.
    """
    if blend not in BLENDS:
        raise SettingError("blend", f"must be one of {', '.join(BLENDS)}, got {blend!r}")
    stream = _TiffStream(paths, layout, blend=blend, pixels=pixels, skip=skip,
                         progress=progress, band_height=band_height, on_band=on_band)
    source = pyvips.SourceCustom()
    source.on_read(stream.read)
    source.on_seek(stream.seek)
    image = pyvips.Image.new_from_source(source, "", access="sequential")
    return _unpack(image, pixels), stream


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
                    progress: Callable[[int, int], None] | None,
                    on_band: Callable[[tuple[int, int], np.ndarray], None] | None) -> None:
        image, stream = stream_mosaic(self.paths, self.layout, blend=self.blend,
                                      pixels=self.pixels,
                                      skip=frozenset(self.skip), progress=progress,
                                      band_height=self.band_height, on_band=on_band)
        with _deferred_signals(stream.signals):
            try:
                writer(image)
            except pyvips.Error:
                if stream.signals:
                    return  # _deferred_signals delivers them as it exits
                if stream.error is not None:
                    raise stream.error from None
                raise
            finally:
                stream.close()
        if stream.error is not None:
            raise stream.error
        self._leave_out({i: tiles._first_line(exc).strip() for i, exc in stream.failed.items()})

    def _leave_out(self, failed: dict[int, str]) -> None:
        """Warn about the tiles that could not be decoded (``failed``: why, by tile), and
        skip them from now on (in the other formats of the same mosaic)."""
        for i in sorted(set(failed) - self.skip):
            # Its neighbours fill its place where they overlap it.
            why = f" ({failed[i]})" if failed[i] else ""
            warnings.warn(f"leaving out {Path(self.paths[i]).name} from the mosaic: cannot "
                          f"decode it{why}", OfstitchWarning, stacklevel=3)
            self.skip.add(i)

    def write(self, writer: Callable[[pyvips.Image], None], *,
              progress: Callable[[int, int], None] | None = None,
              on_band: Callable[[tuple[int, int], np.ndarray], None] | None = None) -> None:
        """Call ``writer(image)``; ``progress(bands done, bands)`` as the mosaic is composed,
        and ``on_band(rows, pixels)`` with each band (see :func:`stream_mosaic`; from the
        top again if a tile turns out to be undecodable and the mosaic is written again)."""
        try:
            self._write_once(writer, progress, on_band)
            return
        except pyvips.Error:
            bad = find_undecodable(self.paths, workers=self.workers) - self.skip
            if not bad:
                raise
        self._leave_out(dict.fromkeys(bad, ""))
        self._write_once(writer, progress, on_band)
