"""Live stitching: a preview that follows a scan while it is being captured.

:class:`LiveStitcher` takes tiles one at a time (:meth:`LiveStitcher.add`):

1. it checks that the file is complete: older than the settle time, a JPEG
   that ends with its end-of-image marker (a PNG with its ``IEND`` chunk), a
   header that reads, and pixels that decode;
2. it correlates only the new tile's pairs, found from the stage positions,
   through the correlation cache (keyed as in a batch run, so a later
   ``ofstitch FOLDER`` reuses them);
3. it places every tile again. Tiles that do not yet overlap the rest (a
   graph with several components) are placed component by component, each
   component where its stage positions put it;
4. it decodes the new tile once, shrunk on load, into an in-memory cache of
   small tiles from which :meth:`LiveStitcher.preview` composes the mosaic.

Placement is the batch run's call on the same pairs. Robust placement (the
default) also correlates null pairs (tiles that do not overlap) to learn the
chance score; :meth:`LiveStitcher.add` uses those already in the cache and
leaves the new ones to :meth:`LiveStitcher.refine`, which ``ofstitch watch``
runs a few pairs at a time between tiles, and in full when it stops. The
reference placement's threshold search is slow on large scans: while it takes
longer than :data:`SYNC_SEARCH_S`, updates reuse the thresholds of the last
search (one sparse solve), a fresh search runs in a background thread whenever
the pairs have grown by :data:`RESEARCH_GROWTH`, and :meth:`LiveStitcher.refine`
runs it at once. Once refined (:attr:`LiveStitcher.exact`), the positions are
those of ``ofstitch.register`` on the same tiles; :meth:`LiveStitcher.finish` is
a batch run on the folder, every pair coming from the cache.

Thread safety: one writer (``add``, ``refine``, ``finish``) and any number of
readers (``positions``, ``preview``, ``snapshot``). Each update publishes an
immutable :class:`LiveSnapshot` under a lock, so a reader always sees one
consistent state.

:func:`watch` runs a :class:`LiveStitcher` on a folder with the ``watchdog``
file-system events (``ofstitch watch FOLDER``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
import pyvips

from . import formats, pipeline, render, tiles
from .backends import Backend, select_backend
from .cache import CorrelationCache, cache_path
from .errors import OfstitchError, OfstitchWarning
from .graph import OverlapGraph, components, find_pairs
from .place import place
from .scan import (
    Scan,
    TileFile,
    TileRecord,
    find_image_files,
    is_tile_name,
    read_tile,
    require_folder,
    scan_from_tiles,
    tile_configuration,
)
from .settings import StitchSettings

log = logging.getLogger(__name__)

PREVIEW_NAME = "preview.jpg"
LIVE_DZI_NAME = "preview.dzi"
TILE_CONFIGURATION_NAME = "OFMTileConfiguration.txt"  # the live positions (Fiji format)
DEFAULT_SETTLE_TIME_S = 0.5
# Run the automatic threshold search on every update while it is this quick.
SYNC_SEARCH_S = 0.25
# Otherwise search again (in the background) once the pairs have grown by this factor.
RESEARCH_GROWTH = 1.2
MAX_SHRINK = 8  # libjpeg's DCT scaling goes down to 1/8
NULL_PAIRS_PER_REFINE = 4  # null pairs ``watch`` correlates between two looks at the folder


class AddStatus(str, Enum):
    """What :meth:`LiveStitcher.add` did with a file."""

    ADDED = "added"  # a new (or rewritten) tile, now placed
    WAITING = "waiting"  # still being written, or younger than the settle time: try later
    IGNORED = "ignored"  # not a tile (an output, another file type) or already added
    SKIPPED = "skipped"  # unusable (a warning says why); tried again only if the file changes


@dataclass(frozen=True)
class LiveSnapshot:
    """One consistent state of a live scan (never modified once published).

    Attributes
    ----------
    version : int
        Increases with every update.
    names : tuple of str
        Tile file names, in capture order.
    positions_px : ndarray, shape (n, 2), float64, read-only
        ``(row, col)`` of each tile's top-left corner, the smallest at 0.
    scan : Scan or None
    pairs : ndarray, shape (m, 2)
    n_components : int
        Groups of tiles joined by pairs (1 once the scan is connected).
    exact : bool
        Whether the placement is the one a batch run gives on these tiles (see
        :meth:`LiveStitcher.refine`).
    """

    version: int
    names: tuple[str, ...]
    positions_px: np.ndarray
    scan: Scan | None
    pairs: np.ndarray
    n_components: int
    exact: bool

    def positions(self) -> dict[str, tuple[float, float]]:
        return {n: (float(r), float(c)) for n, (r, c) in
                zip(self.names, self.positions_px.tolist(), strict=True)}


@dataclass(frozen=True)
class LiveUpdate:
    """What one update did (for progress lines and benchmarks)."""

    version: int
    n_tiles: int
    n_pairs: int
    n_correlated: int
    n_components: int
    exact: bool
    seconds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Correlations:
    """The pair results one placement uses (graph pairs in the graph's order)."""

    scan: Scan
    graph: OverlapGraph
    pairs: np.ndarray
    shift: np.ndarray
    quality: np.ndarray
    candidates: np.ndarray
    null_candidates: np.ndarray  # of the null pairs in the cache (all, once refined)
    null_shift: np.ndarray
    n_new: int  # graph pairs correlated now
    n_null_missing: int  # null pairs of the batch run not in the cache yet


def _empty_snapshot() -> LiveSnapshot:
    positions = np.zeros((0, 2))
    positions.flags.writeable = False
    return LiveSnapshot(0, (), positions, None, np.zeros((0, 2), np.int64), 0, True)


def _looks_complete(path: Path) -> bool:
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


def shrink_for(scale: float) -> int:
    """The power-of-two shrink (1 to 8) whose scale ``1/shrink`` is at least ``scale``."""
    if scale >= 1:
        return 1
    return int(min(MAX_SHRINK, 2 ** math.floor(math.log2(1 / scale) + 1e-9)))


def compose(small: list[np.ndarray | None], layout: render.Layout) -> np.ndarray:
    """Compose tiles already at ``layout.scale`` into one uint8 RGB array (nearest centre).

    ``small[i]`` is tile ``i`` as ``(h, w, 3)`` uint8 at the layout's tile shape,
    or ``None`` (left out).
    """
    height, width = layout.size
    th, tw = layout.tile_shape
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    best = np.full((height, width), np.inf, dtype=np.float32)
    rows = np.arange(th, dtype=np.float32) + 0.5
    cols = np.arange(tw, dtype=np.float32) + 0.5
    for i, arr in enumerate(small):
        if arr is None:
            continue
        ty, tx = (int(v) for v in layout.top_left[i])
        cy, cx = layout.centre[i]
        dist = (rows + ty - np.float32(cy))[:, None] ** 2 + (cols + tx - np.float32(cx))[None] ** 2
        region = best[ty:ty + th, tx:tx + tw]
        h, w = region.shape
        nearer = dist[:h, :w] < region
        np.copyto(region, dist[:h, :w], where=nearer)
        np.copyto(canvas[ty:ty + th, tx:tx + tw], arr[:h, :w], where=nearer[..., None])
    return canvas


class LiveStitcher:
    """Stitch a scan while it is captured: add tiles as they arrive, read a preview any time.

    Parameters
    ----------
    folder : path
        The scan folder (tiles are added from it; the cache lives beside them).
    settings : StitchSettings, optional
        The same settings as a batch run (correlation settings key the cache).
    cache_dir : path, optional
        Where the correlation cache lives (default: ``folder``).
    use_cache : bool
        Read and write the correlation cache (otherwise results stay in memory).
    settle_time : float
        Seconds a file must have been left unchanged before it is read.
    preview_width : int
        Default width of :meth:`preview`.
    backend : Backend, optional
        Default: from ``settings.device``.
    progress : callable, optional
        ``progress(stage, done, total)`` while pairs are correlated (many at
        once when tiles are already there at the start).

    Examples
    --------
    >>> live = LiveStitcher("scan")                  # doctest: +SKIP
    >>> live.add("scan/tile_0001.jpg")               # doctest: +SKIP
    <AddStatus.ADDED: 'added'>
    >>> live.positions()                             # doctest: +SKIP
    >>> live.preview(path="scan/preview.jpg")        # doctest: +SKIP
    >>> live.finish()                                # doctest: +SKIP
    """

    def __init__(self, folder: Path | str, settings: StitchSettings | None = None, *,
                 cache_dir: Path | str | None = None, use_cache: bool = True,
                 settle_time: float = DEFAULT_SETTLE_TIME_S,
                 preview_width: int = render.PREVIEW_WIDTH,
                 backend: Backend | None = None,
                 progress: pipeline.Progress = pipeline._noop) -> None:
        self.folder = Path(folder)
        require_folder(self.folder)
        self._folder_resolved = self.folder.resolve()
        if settle_time < 0:
            raise OfstitchError(f"--settle-time must be zero or positive, got {settle_time}")
        if preview_width < 1:
            raise OfstitchError(f"--preview-width must be positive, got {preview_width}")
        self.settings = settings or StitchSettings()
        if self.settings.thresholding != "automatic":
            raise OfstitchError("live stitching cannot ask for thresholds: use automatic "
                                "thresholding (--min-peak-quality and --max-stage-discrepancy "
                                "still apply)")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.settle_time = float(settle_time)
        self.preview_width = int(preview_width)
        self.backend = backend or select_backend(self.settings.device)
        self.progress = progress
        path = cache_path(self.folder, self.cache_dir)
        self._cache = CorrelationCache.load(path) if use_cache else \
            CorrelationCache(path, writable=False)
        self._tile_config = tile_configuration(self.folder)
        self._records: dict[str, TileRecord] = {}
        self._skipped: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when skipped
        self._tile_shape: tuple[int, int] | None = None
        self._eight_bit: bool | None = None
        self._value_scale: float | None = None
        self._seen_warnings: set[str] = set()
        # Thresholds from the last full search, and the pair count it saw.
        self._thresholds: tuple[float, float] | None = None
        self._search_pairs = 0
        self._search_seconds = 0.0
        self._search: Future | None = None
        self._search_pool = ThreadPoolExecutor(1, thread_name_prefix="ofstitch-thresholds")
        self._n_correlated = 0
        # Readers and the writer.
        self._state_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._snapshot = _empty_snapshot()
        # Small decoded tiles for previews: (file key, shrink) -> (h, w, 3) uint8.
        self._small: dict[tuple[str, int], np.ndarray] = {}
        self._small_lock = threading.Lock()
        self._shrink = 1
        self._last: _Correlations | None = None  # what the last placement used
        self._null_tried: set[tuple[str, str]] = set()  # null pairs correlated (file keys)
        self.last_update: LiveUpdate | None = None

    # ------------------------------------------------------------------ readers

    def snapshot(self) -> LiveSnapshot:
        """The current state (immutable; safe to keep while the scan goes on)."""
        with self._state_lock:
            return self._snapshot

    def positions(self) -> dict[str, tuple[float, float]]:
        """``{file name: (row, col)}`` of every tile placed so far (top-left, pixels)."""
        return self.snapshot().positions()

    @property
    def names(self) -> tuple[str, ...]:
        return self.snapshot().names

    def __len__(self) -> int:
        return len(self.snapshot().names)

    def preview(self, width: int | None = None, *, path: Path | str | None = None,
                dzi: Path | str | None = None) -> np.ndarray:
        """The mosaic so far, ``width`` pixels wide (at most full resolution).

        Parameters
        ----------
        width : int, optional
            Default: ``preview_width`` (1000).
        path : path, optional
            Also write it there as a JPEG (atomically, with ofstitch EXIF).
        dzi : path, optional
            Also write a Deep Zoom pyramid there (``.dzi`` and ``*_files``), at the
            resolution of the decoded preview tiles (up to full resolution for
            small scans, 1/8 for large ones).

        Returns
        -------
        ndarray, shape (h, width, 3), uint8

        Raises
        ------
        OfstitchError
            No tile has been added yet.
        """
        snap = self.snapshot()
        if not snap.names:
            raise OfstitchError("no tile has been added yet, so there is no preview")
        scan = snap.scan
        width = int(width or self.preview_width)
        scale = render.scale_for_width(snap.positions_px, scan.tile_shape, width)
        shrink = shrink_for(scale)
        layout = render.make_layout(snap.positions_px, scan.tile_shape, 1.0 / shrink)
        small = [self._small_tile(scan, i, shrink, layout.tile_shape) for i in range(len(scan))]
        canvas = compose(small, layout)
        image = pyvips.Image.new_from_array(canvas).copy(interpretation="srgb")
        out_w = max(1, round(scan_width(snap.positions_px, scan.tile_shape) * scale))
        if image.width != out_w:
            image = image.resize(out_w / image.width)
        result = image.numpy()
        if path is not None or dzi is not None:
            pixel = scan.pixel_size_um / scale if scan.pixel_size_um else None
            if path is not None:
                formats.write_jpeg(
                    pyvips.Image.new_from_array(result).copy(interpretation="srgb"), Path(path),
                    metadata=scan.metadata, pixel_size_um=pixel, n_tiles=len(scan))
            if dzi is not None:  # at the resolution of the small tiles; no viewer page
                formats.write_dzi(
                    pyvips.Image.new_from_array(canvas).copy(interpretation="srgb"), Path(dzi),
                    viewer=False)
        return result

    def _small_tile(self, scan: Scan, i: int, shrink: int, shape: tuple[int, int]
                    ) -> np.ndarray | None:
        key = (scan.files[i].key, shrink)
        with self._small_lock:
            arr = self._small.get(key)
        if arr is not None:
            return arr
        try:
            arr = tiles.read_rgb8_scaled(scan.path(i), 1.0 / shrink, shape,
                                         value_scale=self._value_scale or 1.0)
        except tiles.TileReadError as exc:
            warnings.warn(f"leaving out {scan.files[i].name} from the preview: {exc}",
                          OfstitchWarning, stacklevel=3)
            return None
        arr.flags.writeable = False
        with self._small_lock:
            self._small[key] = arr
        return arr

    # ------------------------------------------------------------------ the writer

    def add(self, path: Path | str) -> AddStatus:
        """Add one tile file (in the scan folder) and update the placement.

        Returns :attr:`AddStatus.WAITING` for a file still being written (call
        again later), :attr:`AddStatus.IGNORED` for a non-tile or an unchanged
        tile, :attr:`AddStatus.SKIPPED` (with a warning) for an unusable one.
        """
        return self.add_many([path])[Path(path)]

    def add_many(self, paths: Iterable[Path | str]) -> dict[Path, AddStatus]:
        """Add several files, then update once (cheaper than one :meth:`add` each)."""
        with self._write_lock:
            status = {Path(p): self._accept(Path(p)) for p in paths}
            if any(s == AddStatus.ADDED for s in status.values()):
                self._update()
            return status

    def remove(self, path: Path | str) -> bool:
        """Forget a tile whose file was deleted or moved away; returns whether it was known."""
        name = Path(path).name
        with self._write_lock:
            self._skipped.pop(name, None)
            if self._records.pop(name, None) is None:
                return False
            if self._records:
                self._update()
            else:
                with self._state_lock:
                    self._snapshot = replace(_empty_snapshot(),
                                             version=self._snapshot.version + 1)
            return True

    def _accept(self, path: Path) -> AddStatus:
        """Check one file; on success record it (no correlation yet)."""
        name = path.name
        if not is_tile_name(name) or path.parent.resolve() != self._folder_resolved:
            return AddStatus.IGNORED
        try:
            stat = path.stat()
        except OSError:
            return AddStatus.WAITING  # created but not there yet, or removed: nothing to do
        known = self._records.get(name)
        if known is not None and (known.stat.st_size, known.stat.st_mtime_ns) == (
                stat.st_size, stat.st_mtime_ns):
            return AddStatus.IGNORED
        if self._skipped.get(name) == (stat.st_size, stat.st_mtime_ns):
            return AddStatus.IGNORED
        age = time.time() - stat.st_mtime
        if stat.st_size == 0 or age < self.settle_time or not _looks_complete(path):
            return AddStatus.WAITING
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = read_tile(path, self._tile_config)
        if record is None:
            for w in caught:
                warnings.warn(str(w.message), OfstitchWarning, stacklevel=4)
            self._skipped[name] = (stat.st_size, stat.st_mtime_ns)
            return AddStatus.SKIPPED
        if (record.stat.st_size, record.stat.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            return AddStatus.WAITING  # it changed while we read it
        eight_bit = record.format in ("uchar", "char")
        problem = None
        if self._tile_shape is not None and record.shape != self._tile_shape:
            problem = (f"it is {record.shape[1]}x{record.shape[0]} px but the scan's tiles are "
                       f"{self._tile_shape[1]}x{self._tile_shape[0]}")
        elif self._eight_bit is not None and eight_bit != self._eight_bit:
            problem = (f"it is {'8' if eight_bit else '16'}-bit but the scan's tiles are "
                       f"{'8' if self._eight_bit else '16'}-bit")
        if problem:
            warnings.warn(f"skipping {name}: {problem}", OfstitchWarning, stacklevel=4)
            self._skipped[name] = (stat.st_size, stat.st_mtime_ns)
            return AddStatus.SKIPPED
        # Decode it now, shrunk, for the preview: this also proves the pixels are all there.
        shape = record.shape
        shrink = self._shrink
        key = TileFile(name, stat.st_size, stat.st_mtime_ns).key
        try:
            small = tiles.read_rgb8_scaled(path, 1.0 / shrink,
                                           tiles.scaled_shape(shape, 1.0 / shrink),
                                           value_scale=self._value_scale or 1.0)
        except tiles.TileReadError as exc:
            if "truncated" in str(exc).lower() or "premature" in str(exc).lower():
                return AddStatus.WAITING
            warnings.warn(f"skipping {name}: {exc}", OfstitchWarning, stacklevel=4)
            self._skipped[name] = (stat.st_size, stat.st_mtime_ns)
            return AddStatus.SKIPPED
        small.flags.writeable = False
        with self._small_lock:
            self._small[(key, shrink)] = small
        self._tile_shape = self._tile_shape or shape
        self._eight_bit = eight_bit if self._eight_bit is None else self._eight_bit
        self._records[name] = record
        self._skipped.pop(name, None)
        return AddStatus.ADDED

    def _build_scan(self) -> Scan:
        # The scan-wide rules of a batch run (capture order, z-stacks, CSM); each
        # warning is shown once, not at every update.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan = scan_from_tiles(self.folder, list(self._records.values()), self.settings)
        for w in caught:
            text = str(w.message)
            if text not in self._seen_warnings:
                self._seen_warnings.add(text)
                warnings.warn(text, w.category, stacklevel=4)
        return scan

    def _update(self) -> LiveUpdate:
        t0 = time.perf_counter()
        scan = self._build_scan()
        if self._value_scale is None:
            self._value_scale = pipeline.value_scale(scan)
            if self._value_scale != 1.0:  # 16-bit tiles: decode the preview tiles again
                with self._small_lock:
                    self._small.clear()
        graph = find_pairs(scan.stage_px, scan.tile_shape, self.settings.minimum_overlap)
        t1 = time.perf_counter()
        corr = self._correlate(scan, graph, null_budget=0)
        self._n_correlated += corr.n_new
        t2 = time.perf_counter()
        positions, n_comp, exact = self._place(corr)
        t3 = time.perf_counter()
        self._publish(scan, graph.pairs, positions, n_comp, exact)
        self._prepare_preview()
        t4 = time.perf_counter()
        self.last_update = LiveUpdate(
            self._snapshot.version, len(scan), len(graph.pairs), corr.n_new, n_comp, exact,
            {"scan": t1 - t0, "correlate": t2 - t1, "place": t3 - t2, "preview_tiles": t4 - t3})
        log.info("live: %d tiles, %d pairs (%d correlated now), %d component(s), %s",
                 len(scan), len(graph.pairs), corr.n_new, n_comp,
                 {k: round(v, 3) for k, v in self.last_update.seconds.items()})
        self._last = corr
        return self.last_update

    def _correlate(self, scan: Scan, graph, *, null_budget: int | None) -> _Correlations:
        """Correlate the pairs a batch run would (through the cache, so only new ones).

        The null pairs of robust placement (non-overlapping pairs that calibrate the
        chance score) are the batch run's; those not in the cache yet are left for
        :meth:`refine`, except for ``null_budget`` of them (``None``: all).
        """
        s = self.settings
        all_pairs, all_expected, order, null_shift = pipeline.pairs_to_correlate(scan, graph, s)
        m = len(graph.pairs)
        back = np.argsort(order)  # where each graph pair, then each null pair, sits
        real_at, null_at = back[:m], back[m:]
        use = np.zeros(len(all_pairs), dtype=bool)
        use[real_at] = True
        n_missing = 0
        if len(null_at):
            keys = [f.key for f in scan.files]
            found = self._cache.lookup(s.correlation, keys, all_pairs[null_at],
                                       all_expected[null_at], scan.tile_shape,
                                       with_candidates=True)[0]
            pair_keys = [(keys[a], keys[b]) for a, b in all_pairs[null_at].tolist()]
            # A pair tried before and still not cached cannot be (an unreadable tile).
            tried = np.array([k in self._null_tried for k in pair_keys], dtype=bool)
            missing = np.flatnonzero(~found & ~tried)
            budget = len(missing) if null_budget is None else min(null_budget, len(missing))
            self._null_tried.update(pair_keys[i] for i in missing[:budget])
            found[missing[:budget]] = True
            use[null_at[found | tried]] = True
            n_missing = len(missing) - budget
        sel = np.flatnonzero(use)  # in the batch run's streaming order
        stats: dict = {}
        shift_s, quality_s, cand_s, _, _ = pipeline.correlate_scan(
            scan, all_pairs[sel], all_expected[sel], s, self.backend, cache=self._cache,
            progress=self.progress, found_out=stats)
        shift = np.full((len(all_pairs), 2), np.nan)
        quality = np.full(len(all_pairs), np.nan)
        candidates = np.full((len(all_pairs),) + cand_s.shape[1:], np.nan)
        cached = np.ones(len(all_pairs), dtype=bool)
        shift[sel], quality[sel], candidates[sel], cached[sel] = (
            shift_s, quality_s, cand_s, stats["found"])
        null_used = use[null_at]
        return _Correlations(scan, graph, graph.pairs, shift[real_at], quality[real_at],
                             candidates[real_at], candidates[null_at][null_used],
                             null_shift[null_used], int((~cached[real_at]).sum()), n_missing)

    def _publish(self, scan: Scan, pairs: np.ndarray, positions: np.ndarray, n_comp: int,
                 exact: bool) -> None:
        positions = np.array(positions, dtype=np.float64)
        positions.flags.writeable = False
        with self._state_lock:
            self._snapshot = LiveSnapshot(self._snapshot.version + 1,
                                          tuple(f.name for f in scan.files), positions, scan,
                                          pairs, n_comp, exact)

    def _prepare_preview(self) -> None:
        """Decode at a coarser shrink once the mosaic has grown past the current one."""
        snap = self._snapshot
        scale = render.scale_for_width(snap.positions_px, snap.scan.tile_shape,
                                       self.preview_width)
        shrink = shrink_for(scale)
        if shrink == self._shrink:
            return
        self._shrink = shrink
        shape = tiles.scaled_shape(snap.scan.tile_shape, 1.0 / shrink)
        for i in range(len(snap.scan)):
            self._small_tile(snap.scan, i, shrink, shape)
        with self._small_lock:  # forget the other sizes
            self._small = {k: v for k, v in self._small.items() if k[1] == shrink}

    # ------------------------------------------------------------------ placement

    def _place(self, corr: _Correlations, *, force_search: bool = False
               ) -> tuple[np.ndarray, int, bool]:
        """Positions of every tile; ``(positions, components, exact)``."""
        scan, pairs = corr.scan, corr.pairs
        n = len(scan)
        labels = components(n, pairs) if len(pairs) else np.arange(n)
        n_comp = int(labels.max()) + 1 if n else 0
        self._collect_search()
        if n_comp == 1:
            positions, exact = self._place_connected(
                corr, np.ones(len(pairs), bool), scan.stage_px, search=True, force=force_search)
            return positions, 1, exact
        # Each group of joined tiles is placed on its own, where its stage positions put it.
        positions = scan.stage_px.astype(np.float64).copy()
        sizes = np.bincount(labels)
        exact = True
        for label in np.flatnonzero(sizes > 1):
            members = np.flatnonzero(labels == label)
            index = np.full(n, -1)
            index[members] = np.arange(len(members))
            sel = labels[pairs[:, 0]] == label
            stage = scan.stage_px[members]
            sub, sub_exact = self._place_connected(
                corr, sel, stage, index=index, search=label == int(np.argmax(sizes)),
                force=force_search)
            exact &= sub_exact
            positions[members] = sub - sub.mean(axis=0) + stage.mean(axis=0)
        return positions - positions.min(axis=0), n_comp, exact

    def _place_connected(self, corr: _Correlations, sel: np.ndarray, stage_px: np.ndarray, *,
                         index: np.ndarray | None = None, search: bool, force: bool = False
                         ) -> tuple[np.ndarray, bool]:
        """Place the tiles joined by the pairs ``sel`` (renumbered by ``index``)."""
        s = self.settings
        pairs = corr.pairs[sel] if index is None else index[corr.pairs[sel]]
        shift, quality, csm = corr.shift[sel], corr.quality[sel], corr.scan.csm
        if pipeline.placement_method(s) == "robust":
            cands = corr.candidates[sel]

            def robust():
                return place(pairs, shift, quality, stage_px, csm, method="robust",
                             candidates=cands, null_candidates=corr.null_candidates,
                             null_stage_shift=corr.null_shift,
                             search_radius=s.correlation.corr_mask_radius,
                             tile_shape=corr.scan.tile_shape,
                             warn=False)  # issue 14: previews carry placement.report

            placement = robust()
            if index is None:  # the whole scan: as a batch run, try to join its islands
                extra = pipeline.island_pairs(corr.scan, corr.graph, placement.accepted)
                if len(extra):
                    scan = corr.scan
                    stats: dict = {}
                    x_shift, x_quality, x_cand, _, _ = pipeline.correlate_scan(
                        scan, extra, scan.stage_px[extra[:, 1]] - scan.stage_px[extra[:, 0]],
                        s, self.backend, cache=self._cache, progress=self.progress,
                        found_out=stats)
                    self._n_correlated += int((~stats["found"]).sum())
                    pairs = np.concatenate([pairs, extra])
                    shift = np.concatenate([shift, x_shift])
                    quality = np.concatenate([quality, x_quality])
                    cands = np.concatenate([cands, x_cand])
                    placement = robust()
            return placement.positions_px, corr.n_null_missing == 0
        # The reference placement's threshold search is slow on large scans: see the module
        # docstring.
        quick = not force and self._thresholds is not None and \
            self._search_seconds > SYNC_SEARCH_S
        if not quick:
            t0 = time.perf_counter()
            placement = place(pairs, shift, quality, stage_px, csm, method="reference",
                              min_peak_quality=s.min_peak_quality,
                              max_stage_discrepancy=s.max_stage_discrepancy)
            if search:
                self._search_seconds = time.perf_counter() - t0
                self._thresholds = (placement.min_peak_quality, placement.max_stage_discrepancy)
                self._search_pairs = len(pairs)
            return placement.positions_px, True
        if search and self._search is None and len(pairs) >= RESEARCH_GROWTH * self._search_pairs:
            self._start_search(pairs, shift, quality, stage_px, csm)
        thresholds = self._thresholds
        placement = place(pairs, shift, quality, stage_px, csm, method="reference",
                          thresholding="manual", ask_thresholds=lambda: thresholds,
                          min_peak_quality=s.min_peak_quality,
                          max_stage_discrepancy=s.max_stage_discrepancy)
        return placement.positions_px, False

    def _start_search(self, pairs, shift, quality, stage_px, csm) -> None:
        s = self.settings
        args = (pairs.copy(), shift.copy(), quality.copy(), stage_px.copy(), csm.copy())

        def search() -> tuple[float, float, int, float]:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the foreground reports the same things
                placement = place(*args, method="reference",
                                  min_peak_quality=s.min_peak_quality,
                                  max_stage_discrepancy=s.max_stage_discrepancy)
            return (placement.min_peak_quality, placement.max_stage_discrepancy, len(args[0]),
                    time.perf_counter() - t0)

        try:
            self._search = self._search_pool.submit(search)
        except RuntimeError:  # closed: finish() runs the full search
            self._search = None

    def _collect_search(self, wait: bool = False) -> None:
        if self._search is None or not (wait or self._search.done()):
            return
        try:
            q, d, n_pairs, seconds = self._search.result()
        except Exception as exc:  # keep the old thresholds; a full search runs at finish
            log.warning("background threshold search failed: %s", exc)
        else:
            self._thresholds, self._search_pairs, self._search_seconds = (q, d), n_pairs, seconds
        self._search = None

    def refine(self, *, max_null_pairs: int | None = None) -> bool:
        """Bring the placement to what a batch run gives on the same tiles, if it is not.

        With robust placement (the default), correlates the null pairs that
        :meth:`add` left out (at most ``max_null_pairs`` of them; default all);
        with reference placement, runs the full threshold search. Returns whether
        any position changed. ``ofstitch watch`` calls it between tiles and when
        it stops; once :attr:`exact`, :meth:`positions` are the batch positions.
        """
        with self._write_lock:
            snap = self._snapshot
            if snap.exact or self._last is None:
                return False
            self._collect_search(wait=True)
            scan = self._last.scan
            graph = find_pairs(scan.stage_px, scan.tile_shape, self.settings.minimum_overlap)
            corr = self._correlate(scan, graph, null_budget=max_null_pairs)
            positions, n_comp, exact = self._place(corr, force_search=True)
            self._last = corr
            changed = not np.array_equal(positions, snap.positions_px)
            self._publish(scan, corr.pairs, positions, n_comp, exact)
            self._prepare_preview()
            return changed

    @property
    def refine_is_quick(self) -> bool:
        """Whether :meth:`refine` is cheap enough to run between tiles (robust placement:
        a few null pairs; the reference threshold search takes seconds on large scans)."""
        return pipeline.placement_method(self.settings) == "robust"

    @property
    def exact(self) -> bool:
        """Whether the current positions are those a batch run gives on the same tiles
        (see :meth:`refine`)."""
        return self.snapshot().exact

    @property
    def n_correlated(self) -> int:
        """Pairs correlated by this stitcher so far (the rest came from the cache)."""
        return self._n_correlated

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Save the correlation cache and stop the background search. Safe to call twice."""
        with self._write_lock:
            if self._search is not None:
                self._search.cancel()
            self._search_pool.shutdown(wait=True)
            self._search = None
            if self._cache.writable and self._cache.sets:
                self._cache.save()

    def finish(self, *, output_dir: Path | str | None = None, render_outputs: bool = True,
               progress: pipeline.Progress = pipeline._noop
               ) -> pipeline.StitchResult | pipeline.Registration:
        """Stitch the whole folder the batch way; every pair comes from the cache.

        With ``render_outputs`` (default), writes the outputs of
        ``settings.stitching_mode`` (as ``ofstitch FOLDER`` does) and returns the
        :class:`~ofstitch.pipeline.StitchResult`; otherwise returns the
        :class:`~ofstitch.pipeline.Registration`. Afterwards :meth:`positions`
        are the batch positions.
        """
        with self._write_lock:
            self.close()
            if render_outputs:
                result = pipeline.stitch(self.folder, self.settings, output_dir=output_dir,
                                         cache_dir=self.cache_dir, progress=progress)
                reg = result.registration
            else:
                result = reg = pipeline.register(self.folder, self.settings,
                                                 cache_dir=self.cache_dir, progress=progress,
                                                 backend=self.backend)
            if reg is not None:
                self._publish(reg.scan, reg.graph.pairs, reg.positions_px, 1, True)
            return result

    def __enter__(self) -> LiveStitcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_width(positions_px: np.ndarray, tile_shape: tuple[int, int]) -> float:
    """Width of the mosaic, in full-resolution pixels."""
    return float(positions_px[:, 1].max() - positions_px[:, 1].min() + tile_shape[1])


# ---------------------------------------------------------------------------- watching


class _Events:
    """A watchdog handler that queues ``(changed, path)``: ``True`` for created, modified
    and moved-in files, ``False`` for deleted and moved-away ones."""

    def __init__(self) -> None:
        from watchdog.events import FileSystemEventHandler

        self.queue: queue.SimpleQueue[tuple[bool, Path]] = queue.SimpleQueue()
        outer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.is_directory:
                    return
                kind, src = event.event_type, Path(os.fsdecode(event.src_path))
                if kind in ("created", "modified", "closed"):
                    outer.queue.put((True, src))
                elif kind == "deleted":
                    outer.queue.put((False, src))
                elif kind == "moved":
                    outer.queue.put((False, src))
                    outer.queue.put((True, Path(os.fsdecode(event.dest_path))))

        self.handler = Handler()

    def drain(self) -> list[tuple[bool, Path]]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


@dataclass(frozen=True)
class WatchResult:
    """How :func:`watch` ended."""

    n_tiles: int
    reason: str  # "idle", "stopped"
    waiting: tuple[str, ...]  # files still incomplete at the end (left out)
    final: pipeline.StitchResult | pipeline.Registration | None
    final_seconds: float = 0.0


def watch(folder: Path | str, settings: StitchSettings | None = None, *,
          output_dir: Path | str | None = None, cache_dir: Path | str | None = None,
          settle_time: float = DEFAULT_SETTLE_TIME_S, idle_timeout: float | None = None,
          preview_width: int = render.PREVIEW_WIDTH, dzi: bool = False, final: bool = False,
          polling: bool = False, stop: threading.Event | None = None,
          on_update: Callable[[LiveUpdate, float], None] | None = None,
          progress: pipeline.Progress = pipeline._noop) -> WatchResult:
    """Follow a scan as it is written into ``folder``, rewriting the preview after each tile.

    Tiles already in the folder are added first. Then every new or rewritten
    tile (file-system events from ``watchdog``) is added once it is complete,
    ``preview.jpg`` (and ``preview.dzi`` with ``dzi``) and the positions so far,
    ``OFMTileConfiguration.txt``, in ``output_dir`` are rewritten atomically,
    and ``on_update(update, seconds)`` is called. It stops when ``stop`` is set
    (the CLI sets it on Ctrl-C) or after ``idle_timeout`` seconds without a file
    event, saves the correlation cache and, with ``final``, writes the full
    outputs as ``ofstitch FOLDER`` would.
    """
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    folder = Path(folder)
    require_folder(folder)
    out = Path(output_dir) if output_dir is not None else folder
    pipeline.check_writable(out)
    stop = stop or threading.Event()
    live = LiveStitcher(folder, settings, cache_dir=cache_dir, settle_time=settle_time,
                        preview_width=preview_width, progress=progress)
    events = _Events()
    observer = PollingObserver(timeout=0.5) if polling else Observer()
    observer.schedule(events.handler, os.fspath(folder), recursive=False)
    observer.start()  # before listing the folder, so no file falls between the two
    pending: set[Path] = set(find_image_files(folder))
    last_event = time.monotonic()
    reason = "stopped"
    tick = 0.05  # how often files that are still being written are looked at again
    pacer = _Pacer()
    try:
        while not stop.is_set():
            arrived = [(changed, p) for changed, p in events.drain() if is_tile_name(p.name)]
            removed = False
            for changed, p in arrived:
                last_event = time.monotonic()
                if changed:
                    pending.add(p)
                elif not p.exists():
                    pending.discard(p)
                    removed |= live.remove(p)
            if removed and len(live):
                _write_preview(live, out, dzi)
            if pending:
                t0, started = time.perf_counter(), time.monotonic()
                status = live.add_many(sorted(pending))
                pending = {p for p, s in status.items() if s == AddStatus.WAITING}
                if any(s == AddStatus.ADDED for s in status.values()):
                    last_event = time.monotonic()
                    pacer.tile_added(started)
                    _write_preview(live, out, dzi)
                    if on_update is not None:
                        on_update(live.last_update, time.perf_counter() - t0)
                    continue
            idle = time.monotonic() - last_event
            paused = idle > max(2.0, 2 * settle_time)
            if not live.exact and (paused or (live.refine_is_quick and not pending
                                              and pacer.has_time())):
                # Null pairs a few at a time (one while tiles keep coming), so that a new
                # tile waits little; the reference threshold search only in a pause.
                n = NULL_PAIRS_PER_REFINE if paused else 1
                t0 = time.perf_counter()
                if live.refine(max_null_pairs=n):
                    _write_preview(live, out, dzi)
                pacer.refined(time.perf_counter() - t0, n)
                continue
            if idle_timeout is not None and idle >= idle_timeout:
                reason = "idle"
                break
            stop.wait(tick)
        if not live.exact and live.refine():  # stopping: leave the batch result
            _write_preview(live, out, dzi)
    finally:
        observer.stop()
        observer.join(timeout=5)
        live.close()
    waiting = tuple(sorted(p.name for p in pending))
    for name in waiting:
        warnings.warn(f"leaving out {name}: it was still incomplete when watching stopped",
                      OfstitchWarning, stacklevel=2)
    result, t0 = None, time.perf_counter()
    if final and len(live):
        result = live.finish(output_dir=out, progress=progress)
    return WatchResult(len(live), reason, waiting, result, time.perf_counter() - t0)


class _Pacer:
    """Whether there is time for a step of :meth:`LiveStitcher.refine` before the next tile.

    Learns the pace of the scan (time between tiles) and the cost of a refine step,
    both as moving averages.
    """

    def __init__(self) -> None:
        self.last_tile: float | None = None
        self.pace_s: float | None = None
        self.step_s = 0.5  # a first guess at one null pair's correlation

    def tile_added(self, now: float) -> None:
        """A tile was taken at ``now`` (``time.monotonic()``, when its update began)."""
        if self.last_tile is not None:
            gap = min(now - self.last_tile, 10.0)  # a long pause says little about the pace
            self.pace_s = gap if self.pace_s is None else 0.7 * self.pace_s + 0.3 * gap
        self.last_tile = now

    def refined(self, seconds: float, n_pairs: int) -> None:
        self.step_s = 0.7 * self.step_s + 0.3 * seconds / max(1, n_pairs)

    def has_time(self) -> bool:
        if self.pace_s is None or self.last_tile is None:
            return False
        return self.last_tile + self.pace_s - time.monotonic() > self.step_s


def _write_preview(live: LiveStitcher, out: Path, dzi: bool) -> None:
    snap = live.snapshot()
    formats.write_tile_configuration(out / TILE_CONFIGURATION_NAME, list(snap.names),
                                    snap.positions_px)
    live.preview(path=out / PREVIEW_NAME, dzi=out / LIVE_DZI_NAME if dzi else None)
