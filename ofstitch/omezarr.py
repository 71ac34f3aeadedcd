"""OME-Zarr: the mosaic as an NGFF multiscale image, written with ``zarr`` and ``ome-zarr``.

The pixels arrive once, top to bottom, from a sequential pyvips image. Each
level is a Zarr array written one row of chunks (NGFF 0.4) or of shards (0.5)
at a time; each row block is halved (2x2 mean) into the next level as it
arrives, so memory stays bounded by a few rows of chunks per level whatever
the size of the mosaic. ``ome-zarr`` writes the ``multiscales`` and ``omero``
metadata.

- NGFF 0.4 (the default): Zarr v2 arrays, ``/``-separated chunk keys.
- NGFF 0.5: Zarr v3 arrays, chunks grouped into shards of 4x4 chunks.

Axes are ``c, y, x`` (one channel for grey, three for RGB) with a ``scale``
per level in micrometres. The ``omero`` metadata names the channels and
colours (red, green and blue for RGB; white for grey) and gives the display
window of the 8-bit renderings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

from .atomic import atomic_dir
from .errors import OfstitchError
from .levels import VIPS_DTYPES, Levels
from .settings import NGFF_VERSIONS

SHARD_CHUNKS = 4
_BLOSC = {"cname": "lz4", "clevel": 5}  # what Zarr readers expect, and fast


def level_shapes(size: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: halved (rounding up) until it fits in one chunk."""
    shapes = [tuple(size)]
    while max(shapes[-1]) > chunk:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def halve(rows: np.ndarray) -> np.ndarray:
    """2x2 mean of an even number of rows ``(n, w, c)`` (the last column repeated if the
    width is odd); integers rounded half up, in the rows' own data type."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, rows[:, -1:]], axis=1)
    if rows.dtype.kind == "f":
        quads = rows[0::2].astype(np.float64) + rows[1::2]
        return ((quads[:, 0::2] + quads[:, 1::2]) / 4).astype(rows.dtype)
    pairs = rows[0::2].astype(np.int64) + rows[1::2]
    quads = pairs[:, 0::2] + pairs[:, 1::2] + 2
    return (quads // 4).astype(rows.dtype)


class _Level:
    """One level, written a block of rows at a time, each block halved into the next level."""

    def __init__(self, array, block_rows: int, next_level: _Level | None) -> None:
        self.array, self.block_rows, self.next = array, block_rows, next_level
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.row = 0
        self.odd: np.ndarray | None = None  # a row waiting for its pair

    def push(self, rows: np.ndarray) -> None:
        """Add ``rows`` (shape ``(n, width, channels)``) below the rows already pushed."""
        if not len(rows):
            return
        self.pending.append(rows)
        self.n_pending += len(rows)
        while self.n_pending >= self.block_rows:
            self._write(self._take(self.block_rows))
        if self.next is not None:
            if self.odd is not None:
                rows = np.concatenate([self.odd, rows])
                self.odd = None
            if len(rows) % 2:
                self.odd, rows = rows[-1:], rows[:-1]
            if len(rows):
                self.next.push(halve(rows))

    def finish(self) -> None:
        if self.n_pending:
            self._write(self._take(self.n_pending))
        if self.next is not None:
            if self.odd is not None:
                self.next.push(halve(np.concatenate([self.odd, self.odd])))
                self.odd = None
            self.next.finish()

    def _take(self, n: int) -> np.ndarray:
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        out, rest = block[:n], block[n:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)
        return out

    def _write(self, block: np.ndarray) -> None:
        self.array[:, self.row:self.row + len(block), :] = block.transpose(2, 0, 1)
        self.row += len(block)


def _omero(name: str, bands: int, dtype: np.dtype, window: Levels | None) -> dict:
    """``omero`` rendering metadata: channel colours, and the display window (the range
    the 8-bit renderings show; the data type's range by default)."""
    if window is None:
        window = Levels(*(float(v) for v in (np.iinfo(dtype).min, np.iinfo(dtype).max))) \
            if dtype.kind in "ui" else Levels(0.0, 1.0)
    lo, hi = window.low, window.high
    if dtype.kind in "ui":
        lo, hi = min(lo, float(np.iinfo(dtype).min)), max(hi, float(np.iinfo(dtype).max))
    if bands == 3:
        labels, colours, model = ("red", "green", "blue"), ("FF0000", "00FF00", "0000FF"), \
            "color"
    else:
        labels, colours, model = ("grey",), ("FFFFFF",), "greyscale"
    return {"name": name, "rdefs": {"model": model},
            "channels": [{"label": label, "color": colour, "active": True,
                          "window": {"start": float(window.low), "end": float(window.high),
                                     "min": lo, "max": hi}}
                         for label, colour in zip(labels, colours, strict=True)]}


def require() -> None:
    """Raise a clear error when ``zarr`` 3 or ``ome-zarr`` is missing."""
    try:
        import ome_zarr  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as exc:
        raise OfstitchError(f"--format ome-zarr needs zarr 3 and ome-zarr (Python 3.11 or "
                            f"later): {exc}; pip install 'zarr>=3' ome-zarr") from None


@dataclass(frozen=True)
class ZarrLayout:
    """The arrays of an OME-Zarr made by :func:`create`.

    ``block`` is the side of the unit a writer must fill whole: a chunk (NGFF 0.4)
    or a shard of :data:`SHARD_CHUNKS` x :data:`SHARD_CHUNKS` chunks (0.5).
    """

    shapes: tuple[tuple[int, int], ...]  # (height, width) of each level
    bands: int
    dtype: str
    block: int


def create(store: Path, size: tuple[int, int], bands: int, dtype: np.dtype, *,
           pixel_size_um: float | None, chunk: int, name: str = "mosaic",
           ngff_version: str = "0.4", window: Levels | None = None) -> ZarrLayout:
    """Make the (empty) arrays of every level of a ``size`` = ``(height, width)`` mosaic in
    the folder ``store``, and write the ``multiscales`` and ``omero`` metadata."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"NGFF version must be one of {', '.join(NGFF_VERSIONS)}, "
                         f"got {ngff_version!r}")
    fmt = FormatV04() if ngff_version == "0.4" else FormatV05()
    dtype = np.dtype(dtype)
    shapes = level_shapes(tuple(size), chunk)
    unit = pixel_size_um or 1.0
    axes = [{"name": "c", "type": "channel"}]
    for ax in ("y", "x"):
        axes.append({"name": ax, "type": "space", **({"unit": "micrometer"}
                                                      if pixel_size_um else {})})
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, unit * 2 ** k, unit * 2 ** k]}]}
        for k in range(len(shapes))]
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="w",
                           zarr_format=fmt.zarr_format)
    options: dict = {"chunks": (bands, chunk, chunk), "fill_value": 0}
    block = chunk
    if fmt.zarr_format == 2:
        from numcodecs import Blosc

        options.update(compressors=Blosc(shuffle=Blosc.NOSHUFFLE, **_BLOSC),
                       chunk_key_encoding={"name": "v2", "separator": "/"})
    else:
        block = chunk * SHARD_CHUNKS
        options.update(compressors=zarr.codecs.BloscCodec(shuffle="noshuffle", **_BLOSC),
                       shards=(bands, block, block))
    for k in reversed(range(len(shapes))):
        root.create_array(str(k), shape=(bands, *shapes[k]), dtype=dtype, **options)
    write_multiscales_metadata(
        root, datasets, fmt=fmt, axes=axes, name=name,
        metadata={"method": "2x2 mean", "software": "ofstitch",
                  "omero": _omero(name, bands, dtype, window)})
    return ZarrLayout(tuple(tuple(int(v) for v in s) for s in shapes), bands, dtype.str, block)


def write(image: pyvips.Image, path: Path, *, pixel_size_um: float | None, chunk: int,
          name: str = "mosaic", ngff_version: str = "0.4", window: Levels | None = None
          ) -> None:
    """Save ``image`` (its own data type, 1 or 3 bands) as an OME-Zarr at ``path``."""
    import zarr

    dtype = np.dtype(VIPS_DTYPES[image.format])
    bands = image.bands
    path = Path(path)
    with atomic_dir(path) as store:
        spec = create(store, (image.height, image.width), bands, dtype,
                      pixel_size_um=pixel_size_um, chunk=chunk, name=name,
                      ngff_version=ngff_version, window=window)
        root = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
        level = None
        for k in reversed(range(len(spec.shapes))):
            level = _Level(root[str(k)], spec.block, level)
        row_bytes = image.width * bands * dtype.itemsize
        buffer = bytearray()

        def take(n: int) -> np.ndarray:
            with memoryview(buffer) as view:
                rows = np.frombuffer(view[:n * row_bytes], dtype).copy()
            del buffer[:n * row_bytes]
            return rows.reshape(n, image.width, bands)

        def on_write(data: bytes) -> int:
            buffer.extend(data)
            n = len(buffer) // row_bytes
            if n >= 64:  # small pieces keep the downsampling's temporaries small
                level.push(take(n))
            return len(data)

        target = pyvips.TargetCustom()
        target.on_write(on_write)
        image.rawsave_target(target)
        if buffer:
            level.push(take(len(buffer) // row_bytes))
        level.finish()


# ----------------------------------------------------------------------------- by regions
#
# A writer in parallel (:mod:`ofstitch.distributed`) splits the mosaic into square
# regions whose side is ``block * 2**m``: such a region holds whole blocks of level 0
# and of the ``m`` levels below it, and its halvings start on even rows and columns,
# so each task's pixels are those of the streamed writer above, and no two tasks write
# one block. Levels below ``m`` are made by further passes over regions of level ``m``.


def region_passes(spec: ZarrLayout, levels_per_task: int) -> list[tuple[int, int]]:
    """``(base level, last level)`` of each pass: the first pass composes level 0 and
    halves it down to level ``levels_per_task``; each next pass reads the last level of
    the one before and halves it ``levels_per_task`` times more."""
    if levels_per_task < 1:
        raise ValueError(f"levels_per_task must be at least 1, got {levels_per_task}")
    last = len(spec.shapes) - 1
    passes, base = [], 0
    while True:
        passes.append((base, min(last, base + levels_per_task)))
        base += levels_per_task
        if base >= last:
            return passes


def regions(spec: ZarrLayout, level: int, levels_per_task: int
            ) -> list[tuple[int, int, int, int]]:
    """``(r0, c0, r1, c1)`` of each region of ``level`` for a pass based on it."""
    side = spec.block * 2 ** levels_per_task
    h, w = spec.shapes[level]
    return [(r, c, min(h, r + side), min(w, c + side))
            for r in range(0, h, side) for c in range(0, w, side)]


def read_region(store: Path, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels ``(h, w, bands)`` of ``box`` in ``level`` of the OME-Zarr in ``store``."""
    import zarr

    r0, c0, r1, c1 = box
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r")
    return np.ascontiguousarray(root[str(level)][:, r0:r1, c0:c1].transpose(1, 2, 0))


def write_region(store: Path, spec: ZarrLayout, level: int, last: int,
                 box: tuple[int, int, int, int], pixels: np.ndarray, *,
                 write_first: bool = True) -> None:
    """Write ``pixels`` ``(h, w, bands)`` at ``box`` of ``level`` (unless not
    ``write_first``), and their 2x2 halvings into the levels below it down to ``last``.
    ``box`` must be one of :func:`regions`."""
    import zarr

    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
    r0, c0, _, _ = box
    for k in range(level, last + 1):
        if k > level:
            if len(pixels) % 2:  # the mosaic's last row, paired with itself
                pixels = np.concatenate([pixels, pixels[-1:]])
            pixels = halve(pixels)
            r0, c0 = r0 // 2, c0 // 2
        if k > level or write_first:
            root[str(k)][:, r0:r0 + pixels.shape[0], c0:c0 + pixels.shape[1]] = \
                pixels.transpose(2, 0, 1)
