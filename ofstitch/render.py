"""Rendering: the mosaic as one sequential pyvips image that the writers pull through.

The bands of :mod:`ofstitch.compose` are chained into one sequential image
(:func:`stream_mosaic`): an encoder reading it top to bottom makes libvips
compose and evaluate one band at a time, and each band's operations are freed
before the next band starts. A tile is decoded once (sequentially, top to
bottom) while the bands still need it, then closed. Memory is bounded by one
band of the mosaic plus the tiles that cross it, whatever the size of the
mosaic. :class:`Mosaic` leaves out, with a warning, the tiles that turn out to
be undecodable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import signal
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyvips

from . import tiles
from .compose import (  # noqa: F401  (the composition, re-exported for render's users)
    Blend,
    Layout,
    Pixels,
    TileSource,
    band_rows,
    compose,
    compose_band,
    compose_box,
    feather_weight,
    make_layout,
    nearest_labels,
    priority_order,
    scale_for_width,
)
from .errors import OfstitchWarning, SettingError
from .settings import BLENDS

log = logging.getLogger(__name__)

PREVIEW_WIDTH = 1000
FETCH_WIDTH = 256  # columns of a band computed at a time
_KEEP = 4 << 20  # bytes of the PNG stream kept behind the reader


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
        self.weight = feather_weight(layout) if blend == "feather" else None
        height, width = layout.size
        png_width, depth, colour = _png_geometry(pixels, width)
        ihdr = struct.pack(">IIBBBBB", png_width, height, depth, colour, 0, 0, 0)
        self.base = self.pos = 0  # absolute offsets of buffer[0] and of the reader
        self.buffer = bytearray(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr))
        self.deflate = zlib.compressobj(0)
        self.done = False
        self.error: BaseException | None = None
        # Signals that arrived while libvips renders (see _deferred_signals): the stream
        # then ends at once, and Mosaic.write delivers them when libvips has returned.
        self.signals: list[int] = []
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.threads = max(1, min(4, os.cpu_count() or 1))
        self.pool: ThreadPoolExecutor | None = None

    def read(self, size: int) -> bytes:
        if self.signals:  # stopping: libvips sees the stream end and gives up
            return b""
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




def limit_malloc_arenas(n: int = 2, mmap_threshold: int = 1 << 20) -> None:
    """Ask glibc for at most ``n`` malloc arenas, and for blocks of ``mmap_threshold``
    bytes or more straight from the system (a no-op elsewhere).

    libvips computes on many threads; with glibc's default of up to eight arenas
    per CPU, memory freed by one band stays fragmented across arenas and the
    process grows (the usual advice for libvips servers is ``MALLOC_ARENA_MAX=2``).
    A band's buffers are megabytes: glibc's adaptive threshold soon takes such
    blocks from the heap, where freed ones stay in the process. The command line
    calls this; a library user may prefer ``MALLOC_ARENA_MAX`` and
    ``MALLOC_MMAP_THRESHOLD_``.
    """
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(-8, n)  # M_ARENA_MAX
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (fixed, not adaptive)
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
