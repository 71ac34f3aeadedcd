"""The live stitcher: the scan's state as tiles arrive, published as immutable snapshots."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ofstitch import pipeline, render
from ofstitch.backends import Backend, select_backend
from ofstitch.cache import CorrelationCache, cache_path
from ofstitch.errors import OfstitchError
from ofstitch.graph import find_pairs
from ofstitch.place import PlacementReport
from ofstitch.preview import PreviewTiles, draw
from ofstitch.registration import NullRequest, Progress, Registration, no_progress, register_scan
from ofstitch.scan import Scan, require_folder
from ofstitch.settings import StitchSettings

from .arrivals import DEFAULT_SETTLE_TIME_S, AddStatus, Arrivals
from .thresholds import ThresholdSearch

log = logging.getLogger(__name__)


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
    report : PlacementReport or None
        How far the placement can be trusted (robust placement of a connected scan).
    """

    version: int
    names: tuple[str, ...]
    positions_px: np.ndarray
    scan: Scan | None
    pairs: np.ndarray
    n_components: int
    exact: bool
    report: PlacementReport | None = None

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


def _empty_snapshot(version: int = 0) -> LiveSnapshot:
    positions = np.zeros((0, 2))
    positions.flags.writeable = False
    return LiveSnapshot(version, (), positions, None, np.zeros((0, 2), np.int64), 0, True)


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
        ``progress(stage, done, total)`` while pairs are correlated.

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
                 backend: Backend | None = None, progress: Progress = no_progress) -> None:
        self.folder = Path(folder)
        require_folder(self.folder)
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
        self.preview_width = int(preview_width)
        self.backend = backend or select_backend(self.settings.device)
        self.progress = progress
        path = cache_path(self.folder, self.cache_dir)
        self._cache = CorrelationCache.load(path) if use_cache else \
            CorrelationCache(path, writable=False)
        self._tiles = PreviewTiles()
        self._shrink = 1
        self._value_scale_known = False
        self._arrivals = Arrivals(self.folder, float(settle_time), self._decode_new)
        self._search = ThresholdSearch(self.settings)
        self._null_tried: frozenset = frozenset()  # null pairs correlated (file keys)
        self._n_correlated = 0
        self._last: Registration | None = None
        # One writer (add, refine, finish) and any number of readers (snapshot, preview).
        self._state_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._snapshot = _empty_snapshot()
        self.last_update: LiveUpdate | None = None

    @property
    def settle_time(self) -> float:
        return self._arrivals.settle_time

    def _decode_new(self, path: Path, key: str, shape: tuple[int, int]) -> np.ndarray:
        return self._tiles.decode(path, key, self._shrink, shape)

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
        """The mosaic so far, ``width`` pixels wide (at most full resolution), drawn as a
        batch run draws ``preview.jpg``.

        ``path``: also write it there as a JPEG (atomically, with ofstitch EXIF).
        ``dzi``: also write a Deep Zoom pyramid there (``.dzi`` and ``*_files``), at
        the resolution of the decoded preview tiles. Returns ``(h, width, 3)`` uint8.
        Raises :class:`OfstitchError` before the first tile.
        """
        snap = self.snapshot()
        if not snap.names:
            raise OfstitchError("no tile has been added yet, so there is no preview")
        return draw(snap.scan, snap.positions_px, int(width or self.preview_width), self._tiles,
                    jpeg=path, dzi=dzi)[0]

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
            status = {Path(p): self._arrivals.accept(Path(p)) for p in paths}
            if any(s == AddStatus.ADDED for s in status.values()):
                self._update()
            return status

    def remove(self, path: Path | str) -> bool:
        """Forget a tile whose file was deleted or moved away; returns whether it was known."""
        with self._write_lock:
            if not self._arrivals.forget(Path(path).name):
                return False
            if self._arrivals.records:
                self._update()
            else:
                with self._state_lock:
                    self._snapshot = _empty_snapshot(self._snapshot.version + 1)
            return True

    def _register(self, scan: Scan, *, null_budget: int | None, force_search: bool
                  ) -> tuple[Registration, bool]:
        """The registration core on the tiles so far (new pairs only: the cache has the
        rest). Returns it and whether it is what a batch run gives."""
        graph = find_pairs(scan.stage_px, scan.tile_shape, self.settings.minimum_overlap)
        reuse = self._search.reuse(force_search) if self.settings.placement == "reference" \
            else None
        reg = register_scan(scan, graph, self.settings, self.backend, cache=self._cache,
                            progress=self.progress,
                            nulls=NullRequest(null_budget, self._null_tried), thresholds=reuse,
                            warn=False,  # the report is on each placement; finish() warns
                            # the full-resolution local search re-reads tiles: not on every
                            # new tile, only when refined (what a batch run gives)
                            search_locally=force_search)
        self._null_tried |= reg.null_tried
        self._n_correlated += reg.n_correlated
        if self.settings.placement == "reference":
            if reuse is None:
                self._search.searched(reg.thresholds, len(graph.pairs), reg.timings_s["place"])
            else:
                self._search.start_if_grown(scan, reg.graph, reg.readings)
        return reg, reg.exact and reuse is None and (force_search or
                                                     self.settings.placement != "robust")

    def _update(self) -> LiveUpdate:
        t0 = time.perf_counter()
        scan = self._arrivals.scan(self.settings)
        if not self._value_scale_known:
            self._value_scale_known = True
            levels = pipeline.rendering_levels(scan)
            if levels != self._tiles.levels:  # not 8-bit tiles: decode the preview tiles again
                self._tiles.levels = levels
                self._tiles.clear()
        t1 = time.perf_counter()
        reg, exact = self._register(scan, null_budget=0, force_search=False)
        t2 = time.perf_counter()
        self._publish(reg, exact)
        self._prepare_preview()
        t3 = time.perf_counter()
        self.last_update = LiveUpdate(
            self._snapshot.version, len(scan), len(reg.graph.pairs), reg.n_correlated,
            reg.n_groups, self._snapshot.exact,
            {"scan": t1 - t0, "correlate": reg.timings_s["correlate"],
             "place": reg.timings_s["place"], "preview_tiles": t3 - t2})
        log.info("live: %d tiles, %d pairs (%d correlated now), %d group(s), %s",
                 len(scan), len(reg.graph.pairs), reg.n_correlated, reg.n_groups,
                 {k: round(v, 3) for k, v in self.last_update.seconds.items()})
        self._last = reg
        return self.last_update

    def _publish(self, reg: Registration, exact: bool) -> None:
        positions = np.array(reg.positions_px, dtype=np.float64)
        positions.flags.writeable = False
        with self._state_lock:
            self._snapshot = LiveSnapshot(
                self._snapshot.version + 1, tuple(reg.names), positions, reg.scan,
                reg.graph.pairs, reg.n_groups, exact,
                reg.placement.report if reg.placement is not None else None)

    def _prepare_preview(self) -> None:
        """Decode at a coarser shrink once the mosaic has grown past the current one."""
        snap = self._snapshot
        self._shrink = self._tiles.prepare(snap.scan, snap.positions_px, self.preview_width)

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
            self._search.collect(wait=True)
            reg, exact = self._register(self._last.scan, null_budget=max_null_pairs,
                                        force_search=True)
            self._last = reg
            changed = not np.array_equal(reg.positions_px, snap.positions_px)
            self._publish(reg, exact)
            self._prepare_preview()
            return changed

    @property
    def refine_is_quick(self) -> bool:
        """Whether :meth:`refine` is cheap enough to run between tiles (robust placement:
        a few null pairs; the reference threshold search takes seconds on large scans)."""
        return self.settings.placement == "robust"

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
            self._search.close()
            if self._cache.writable and self._cache.sets:
                self._cache.save()

    def finish(self, *, output_dir: Path | str | None = None, render_outputs: bool = True,
               progress: Progress = no_progress
               ) -> pipeline.StitchResult | Registration:
        """Stitch the whole folder the batch way; every pair comes from the cache.

        With ``render_outputs`` (default), writes the outputs of
        ``settings.stitching_mode`` (as ``ofstitch FOLDER`` does) and returns the
        :class:`~ofstitch.pipeline.StitchResult`; otherwise returns the
        :class:`~ofstitch.registration.Registration`. Afterwards :meth:`positions`
        are the batch positions.
        """
        with self._write_lock:
            self.close()
            if render_outputs:
                result = pipeline.stitch(self.folder, self.settings, output_dir=output_dir,
                                         cache_dir=self.cache_dir, progress=progress,
                                         backend=self.backend)
                reg = result.registration
            else:
                result = reg = pipeline.register(self.folder, self.settings,
                                                 cache_dir=self.cache_dir, progress=progress,
                                                 backend=self.backend)
            if reg is not None:
                self._publish(reg, True)
            return result

    def __enter__(self) -> LiveStitcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
