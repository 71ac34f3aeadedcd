"""Arrivals: when a tile file is complete and usable, and its record once it is.

A file is taken once it is older than the settle time, a JPEG ends with its
end-of-image marker (a PNG with its ``IEND`` chunk), its header reads, it
matches the scan's tiles (size, bit depth), and its pixels decode.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np

from ofstitch import tiles
from ofstitch.errors import OfstitchWarning
from ofstitch.scan import (
    Scan,
    TileFile,
    TileRecord,
    is_tile_name,
    read_tile,
    scan_from_tiles,
    tile_configuration,
)
from ofstitch.settings import StitchSettings

DEFAULT_SETTLE_TIME_S = 0.5


class AddStatus(str, Enum):
    """What :meth:`LiveStitcher.add` did with a file."""

    ADDED = "added"  # a new (or rewritten) tile, now placed
    WAITING = "waiting"  # still being written, or younger than the settle time: try later
    IGNORED = "ignored"  # not a tile (an output, another file type) or already added
    SKIPPED = "skipped"  # unusable (a warning says why); tried again only if the file changes


def looks_complete(path: Path) -> bool:
    """Whether a JPEG or PNG was written to its end (other formats: assume so)."""
    suffix = path.suffix.lower()
    if suffix not in (".jpg", ".jpeg", ".png"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64))
            tail = fh.read()
    except OSError:
        return False
    if suffix == ".png":
        return b"IEND" in tail
    # The end-of-image marker ends the file, give or take the padding some writers add.
    # (A marker that ends an embedded thumbnail instead fails the decode that follows.)
    return tail.rstrip(b"\x00 \r\n").endswith(b"\xff\xd9")


def _replay(caught: list, stacklevel: int) -> None:
    for w in caught:
        warnings.warn(str(w.message), OfstitchWarning, stacklevel=stacklevel)


class Arrivals:
    """The tiles of one folder accepted so far (:attr:`records`), and those skipped.

    Parameters
    ----------
    folder : Path
    settle_time : float
        Seconds a file must have been left unchanged before it is read.
    decode : callable
        ``decode(path, key, shape)`` decodes a new tile (for the preview), which
        also proves that its pixels are all there; raises ``TileReadError``.
    """

    def __init__(self, folder: Path, settle_time: float,
                 decode: Callable[[Path, str, tuple[int, int]], np.ndarray]) -> None:
        self.folder = folder
        self._resolved = folder.resolve()
        self.settle_time = settle_time
        self.decode = decode
        self.tile_config = tile_configuration(folder)
        self.records: dict[str, TileRecord] = {}
        self._skipped: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when skipped
        self.tile_shape: tuple[int, int] | None = None
        self.eight_bit: bool | None = None
        self._seen_warnings: set[str] = set()

    def scan(self, settings: StitchSettings) -> Scan:
        """The scan of the tiles accepted so far, by the scan-wide rules of a batch run
        (capture order, z-stacks, CSM); each of its warnings is shown once, not at every
        update."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan = scan_from_tiles(self.folder, list(self.records.values()), settings)
        for w in caught:
            text = str(w.message)
            if text not in self._seen_warnings:
                self._seen_warnings.add(text)
                warnings.warn(text, w.category, stacklevel=4)
        return scan

    def forget(self, name: str) -> bool:
        """Forget a tile whose file went away; returns whether it was a tile of the scan."""
        self._skipped.pop(name, None)
        return self.records.pop(name, None) is not None

    def _skip(self, name: str, stat: os.stat_result, why: str | None = None) -> AddStatus:
        if why is not None:
            warnings.warn(f"skipping {name}: {why}", OfstitchWarning, stacklevel=4)
        self._skipped[name] = (stat.st_size, stat.st_mtime_ns)
        return AddStatus.SKIPPED

    def _mismatch(self, record: TileRecord, eight_bit: bool) -> str | None:
        if self.tile_shape is not None and record.shape != self.tile_shape:
            return (f"it is {record.shape[1]}x{record.shape[0]} px but the scan's tiles are "
                    f"{self.tile_shape[1]}x{self.tile_shape[0]}")
        if self.eight_bit is not None and eight_bit != self.eight_bit:
            return (f"it is {'8' if eight_bit else '16'}-bit but the scan's tiles are "
                    f"{'8' if self.eight_bit else '16'}-bit")
        return None

    def accept(self, path: Path) -> AddStatus:
        """Check one file; on success record it (no correlation yet)."""
        name = path.name
        if not is_tile_name(name) or path.parent.resolve() != self._resolved:
            return AddStatus.IGNORED
        try:
            stat = path.stat()
        except OSError:
            return AddStatus.WAITING  # created but not there yet, or removed: nothing to do
        known = self.records.get(name)
        now = (stat.st_size, stat.st_mtime_ns)
        if known is not None and (known.stat.st_size, known.stat.st_mtime_ns) == now:
            return AddStatus.IGNORED
        if self._skipped.get(name) == now:
            return AddStatus.IGNORED
        if stat.st_size == 0 or time.time() - stat.st_mtime < self.settle_time \
                or not looks_complete(path):
            return AddStatus.WAITING
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = read_tile(path, self.tile_config)
        if record is None:
            _replay(caught, stacklevel=4)
            return self._skip(name, stat)
        if (record.stat.st_size, record.stat.st_mtime_ns) != now:
            return AddStatus.WAITING  # it changed while we read it
        eight_bit = record.format in ("uchar", "char")
        problem = self._mismatch(record, eight_bit)
        if problem:
            return self._skip(name, stat, problem)
        try:
            self.decode(path, TileFile.of(record).key, record.shape)
        except tiles.TileReadError as exc:
            if "truncated" in str(exc).lower() or "premature" in str(exc).lower():
                return AddStatus.WAITING
            return self._skip(name, stat, str(exc))
        self.tile_shape = self.tile_shape or record.shape
        self.eight_bit = eight_bit if self.eight_bit is None else self.eight_bit
        self.records[name] = record
        self._skipped.pop(name, None)
        return AddStatus.ADDED
