"""The registration core: a scan's pairs -> correlations (through the cache) -> placement.

Batch runs (:func:`ofstitch.pipeline.register`, :func:`ofstitch.pipeline.stitch`)
and live stitching (:class:`ofstitch.live.LiveStitcher`) all call
:func:`register_scan`; nothing else correlates pairs or places tiles. It owns:

- the cache lookup, and the correlation of what the cache lacks
  (:func:`correlate`, streamed in batches by :mod:`ofstitch.stream`);
- the null pairs of robust placement (tiles that do not overlap, searched like
  real pairs to learn the chance level; :func:`plan_pairs`);
- placement, and the extra pairs of tiles left in islands (:func:`island_pairs`);
- the constrained local search (robust placement, :func:`local_search`): the pairs a
  first placement did not locate, and those with small overlaps, searched again at full
  resolution around the stage model's prediction, then placed again;
- scans whose tiles form several groups (live stitching before the scan
  connects): each group is placed on its own, where its stage positions put it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import diagnostics
from .backends import Backend
from .backlash import travel_directions
from .cache import CorrelationCache
from .errors import OfstitchError, OfstitchWarning
from .graph import (
    OverlapGraph,
    canonical_flip,
    components,
    find_pairs,
    interleave,
    null_pairs,
    predicted_overlap,
)
from .local_pass import LocalSearch, local_search
from .place import Placement, place
from .scan import Scan, expected_shifts
from .settings import StitchSettings
from .stream import CANDIDATES, CorrelationPlan, correlate_pairs, memory_budget

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # the correlation cache's journal is appended at most this often
ISLAND_MIN_OVERLAP = 0.02  # extra pairs for tiles in islands: overlap above this fraction

Progress = Callable[[str, int, int], None]
Thresholds = tuple[float, float]  # (min peak quality, max stage discrepancy px)


def no_progress(stage: str, done: int, total: int) -> None:
    """A :data:`Progress` that reports nothing."""


class Readings(NamedTuple):
    """Correlation results of ``m`` pairs.

    Attributes
    ----------
    shift_px : ndarray, shape (m, 2)
        Shift of tile b relative to tile a (NaN where no peak was found).
    quality : ndarray, shape (m,)
        Peak quality (NaN where the pair could not be correlated).
    candidates : ndarray, shape (m, K, 3)
        Candidate peaks ``(dy, dx, overlap NCC)``, NaN-padded.
    cached : ndarray, shape (m,), bool
        Whether each result came from the cache (the rest were correlated now).
    """

    shift_px: np.ndarray
    quality: np.ndarray
    candidates: np.ndarray
    cached: np.ndarray

    @classmethod
    def empty(cls, m: int) -> Readings:
        return cls(np.full((m, 2), np.nan), np.full(m, np.nan),
                   np.full((m, CANDIDATES, 3), np.nan), np.zeros(m, dtype=bool))

    def take(self, index: np.ndarray) -> Readings:
        return Readings(*(a[index] for a in self))

    def put(self, index: np.ndarray, other: Readings) -> None:
        """Write ``other`` into the rows ``index`` (only for readings being built)."""
        for mine, theirs in zip(self, other, strict=True):
            mine[index] = theirs

    def concat(self, other: Readings) -> Readings:
        return Readings(*(np.concatenate([a, b]) for a, b in zip(self, other, strict=True)))

    @property
    def n_cached(self) -> int:
        return int(self.cached.sum())

    @property
    def n_correlated(self) -> int:
        return len(self.cached) - self.n_cached


def correlate(scan: Scan, pairs: np.ndarray, expected: np.ndarray, settings: StitchSettings,
              backend: Backend, *, cache: CorrelationCache | None,
              progress: Progress = no_progress) -> Readings:
    """Correlate ``pairs`` (searched around the ``expected`` shifts), reusing and filling
    the cache.

    Each pair is correlated from its tile with the smaller stage position (and flipped
    back), so that the results do not depend on the order of the files.
    """
    flip = canonical_flip(scan.stage_px, pairs)
    pairs = np.where(flip[:, None], pairs[:, ::-1], pairs)
    expected = np.where(flip[:, None], -expected, expected)
    readings = _correlate(scan, pairs, expected, settings, backend, cache=cache,
                          progress=progress)
    readings.shift_px[flip] *= -1
    readings.candidates[flip, :, :2] *= -1
    return readings


def _correlate(scan: Scan, pairs: np.ndarray, expected: np.ndarray, settings: StitchSettings,
               backend: Backend, *, cache: CorrelationCache | None,
               progress: Progress = no_progress) -> Readings:
    keys = [f.key for f in scan.files]
    cs = settings.correlation
    if cache is not None:
        hit = cache.lookup(cs, keys, pairs, expected, scan.tile_shape)
        readings = Readings(hit.shift_px, hit.quality, hit.candidates, hit.found)
    else:
        readings = Readings.empty(len(pairs))
    todo = np.flatnonzero(~readings.cached)
    progress("correlate", 0, len(todo))
    if not len(todo):
        return readings
    plan = CorrelationPlan.make(scan.tile_shape, cs)
    budget = memory_budget(backend, settings.device_memory, settings.priority)
    done = 0
    flushed = time.monotonic()
    if settings.scheduler:
        from .distributed import correlate_on_cluster

        batches = correlate_on_cluster(settings.scheduler, scan.paths, pairs[todo],
                                       expected[todo], cs, scan.tile_shape,
                                       batch_pairs=settings.batch_pairs, budget_bytes=budget)
    else:
        batches = correlate_pairs(scan.paths, pairs[todo], expected[todo], cs, plan, backend,
                                  batch_pairs=settings.batch_pairs, budget_bytes=budget,
                                  workers=settings.workers)
    for batch in batches:
        ids = todo[batch.pair_ids]
        readings.shift_px[ids] = batch.shift_px
        readings.quality[ids] = batch.quality
        readings.candidates[ids] = batch.candidates
        done += len(ids)
        progress("correlate", done, len(todo))
        if cache is not None:
            cache.add(cs, keys, pairs[ids], batch.shift_px, batch.quality, expected[ids],
                      batch.candidates)
            if time.monotonic() - flushed >= FLUSH_INTERVAL_S:
                # A killed run keeps every batch finished before the last flush; an fsync
                # per batch cost up to a tenth of the correlation (more on an SD card).
                cache.flush()
                flushed = time.monotonic()
    if cache is not None:
        cache.save()
    return readings


@dataclass(frozen=True)
class PairPlan:
    """What one registration correlates: the graph's pairs and, for robust placement, the
    null pairs, streamed interleaved so that the tiles of both are decoded once.

    Attributes
    ----------
    pairs, expected : ndarray, shape (m, 2)
        The graph's pairs and their stage-predicted shifts.
    null_pairs, null_expected : ndarray, shape (k, 2)
        Pairs of tiles that do not overlap, and the shift searched around.
    order : ndarray, shape (m + k,)
        ``order[i]``: the index, in ``pairs`` followed by ``null_pairs``, of the
        ``i``-th pair to correlate.
    """

    pairs: np.ndarray
    expected: np.ndarray
    null_pairs: np.ndarray
    null_expected: np.ndarray
    order: np.ndarray

    @property
    def stream_pairs(self) -> np.ndarray:
        return np.concatenate([self.pairs, self.null_pairs])[self.order]

    @property
    def stream_expected(self) -> np.ndarray:
        return np.concatenate([self.expected, self.null_expected])[self.order]

    @property
    def null_rows(self) -> np.ndarray:
        """Where each null pair sits in the streaming order."""
        return np.argsort(self.order)[len(self.pairs):]

    def split(self, readings: Readings) -> tuple[Readings, Readings]:
        """Readings in streaming order -> (the graph's pairs', the null pairs')."""
        back = np.argsort(self.order)
        m = len(self.pairs)
        return readings.take(back[:m]), readings.take(back[m:])


def plan_pairs(scan: Scan, graph: OverlapGraph, settings: StitchSettings) -> PairPlan:
    """The graph's pairs plus, for robust placement, the null pairs."""
    null, null_expected = np.zeros((0, 2), np.int64), np.zeros((0, 2))
    if settings.placement == "robust":
        null, null_expected = null_pairs(scan.stage_px, scan.tile_shape, graph.pairs)
    return PairPlan(graph.pairs, expected_shifts(scan, graph.pairs), null, null_expected,
                    interleave(graph.pairs, null))


def island_pairs(scan: Scan, graph: OverlapGraph, used: np.ndarray) -> np.ndarray:
    """Pairs outside the graph (predicted overlap between :data:`ISLAND_MIN_OVERLAP` and
    ``minimum_overlap``, such as diagonal neighbours) that could join a tile that the
    used pairs leave out of the largest group to a tile of another group."""
    n = len(scan)
    labels = components(n, graph.pairs[used]) if used.any() else np.arange(n)
    main = np.argmax(np.bincount(labels))
    if np.all(labels == main):
        return np.zeros((0, 2), np.int64)
    wider = find_pairs(scan.stage_px, scan.tile_shape, ISLAND_MIN_OVERLAP).pairs
    known = {tuple(p) for p in graph.pairs.tolist()}
    keep = [(a, b) for a, b in wider.tolist() if (a, b) not in known
            and labels[a] != labels[b] and (labels[a] != main or labels[b] != main)]
    return np.asarray(keep, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class NullRequest:
    """Which null pairs to correlate now (live stitching spreads them over time).

    Attributes
    ----------
    budget : int or None
        Null pairs missing from the cache to correlate now (``None``: all of them).
    skip : frozenset of (str, str)
        Null pairs (file keys) tried before that cannot be cached (an unreadable
        tile): they are not tried again.
    """

    budget: int | None = None
    skip: frozenset = frozenset()


@dataclass(frozen=True)
class Registration:
    """Where every tile goes, and how that was decided.

    Attributes
    ----------
    scan : Scan
    graph : OverlapGraph
        The pairs placed: the overlap graph's, then any added for tiles in islands.
    readings : Readings
        The correlation of each pair of ``graph``.
    positions_px : ndarray, shape (n, 2)
        ``(row, col)`` of each tile's top-left corner, the smallest at 0.
    placement : Placement or None
        How the tiles were placed; ``None`` when they form several groups that no
        pair joins (live stitching before the scan connects), each placed on its own.
    n_groups : int
        Groups of tiles joined by pairs (1 for a connected scan).
    n_correlated, n_cached : int
        Pairs of ``graph`` correlated in this run, and taken from the cache.
    n_null : int
        Null pairs (tiles that do not overlap) that set the chance level.
    device : str
        The backend that ran the kernels.
    n_null_missing : int
        Null pairs a batch run would use that were left for later (live only).
    null_tried : frozenset of (str, str)
        The null pairs (file keys) correlated in this run.
    thresholds : (float, float) or None
        Reference placement: the thresholds used (of the largest group).
    timings_s : dict
        Seconds per stage (``"correlate"``, ``"place"``, ``"load"``).
    """

    scan: Scan
    graph: OverlapGraph
    readings: Readings
    positions_px: np.ndarray
    placement: Placement | None
    n_groups: int
    n_correlated: int
    n_cached: int
    n_null: int
    device: str
    n_null_missing: int = 0
    null_tried: frozenset = frozenset()
    thresholds: Thresholds | None = None
    timings_s: dict = field(default_factory=dict)

    @property
    def shift_px(self) -> np.ndarray:
        return self.readings.shift_px

    @property
    def quality(self) -> np.ndarray:
        return self.readings.quality

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.scan.files]

    def positions(self) -> dict[str, tuple[float, float]]:
        """``{file name: (row, col)}``."""
        return {n: (float(r), float(c)) for n, (r, c) in
                zip(self.names, self.positions_px.tolist(), strict=True)}

    @property
    def exact(self) -> bool:
        """Whether this is the placement a batch run gives (no null pair left for later)."""
        return self.n_null_missing == 0

    def suggested_csm(self) -> np.ndarray:
        """The improved camera-to-sample matrix, at the scan's calibration width.

        Pass it back as ``--csm-matrix`` together with ``--csm-calibration-width``
        set to :attr:`Scan.csm_calibration_width` (when that is not ``None``).
        """
        m = self.placement.csm if self.placement is not None else self.scan.csm
        width = self.scan.csm_calibration_width
        return m * self.scan.tile_shape[1] / width if width else m


def _null_selection(scan: Scan, plan: PairPlan, settings: StitchSettings,
                    cache: CorrelationCache | None, request: NullRequest
                    ) -> tuple[np.ndarray, int, frozenset]:
    """Which null pairs to use: ``(mask, how many are left for later, keys tried now)``."""
    k = len(plan.null_pairs)
    if request.budget is None or cache is None or not k:
        return np.ones(k, dtype=bool), 0, frozenset()
    keys = [f.key for f in scan.files]
    found = cache.lookup(settings.correlation, keys, plan.null_pairs, plan.null_expected,
                         scan.tile_shape).found
    pair_keys = [(keys[a], keys[b]) for a, b in plan.null_pairs.tolist()]
    tried = np.array([p in request.skip for p in pair_keys], dtype=bool)
    missing = np.flatnonzero(~found & ~tried)
    now = missing[:request.budget]
    use = found.copy()
    use[now] = True
    return use, len(missing) - len(now), frozenset(pair_keys[i] for i in now)


class Placed(NamedTuple):
    """What :func:`place_readings` found (see :class:`Registration`)."""

    positions_px: np.ndarray
    placement: Placement | None
    n_groups: int
    thresholds: Thresholds | None


def place_readings(scan: Scan, graph: OverlapGraph, readings: Readings,
                   settings: StitchSettings, *, null_readings: Readings | None = None,
                   null_expected: np.ndarray | None = None,
                   ask_thresholds: Callable[[], Thresholds] | None = None,
                   local: LocalSearch | None = None) -> Placed:
    """Place every tile from the readings of the graph's pairs (no correlation).

    A graph of several groups has each group placed on its own, where its stage
    positions put it. ``ask_thresholds`` gives the reference placement's
    thresholds instead of its search. ``local``: the constrained local search of a
    connected scan's pairs (robust placement).
    """
    null_candidates = None if null_readings is None else null_readings.candidates
    travel = travel_directions(scan.stage_xy) if scan.capture_order_known else None

    def place_pairs(pairs: np.ndarray, r: Readings, stage_px: np.ndarray,
                    members: np.ndarray | None = None) -> Placement:
        if settings.placement == "robust":
            return place(pairs, r.shift_px, r.quality, stage_px, scan.csm, method="robust",
                         candidates=r.candidates, null_candidates=null_candidates,
                         null_stage_shift=null_expected,
                         search_radius=settings.correlation.corr_mask_radius,
                         tile_shape=scan.tile_shape, warn=False,
                         local=None if local is None else local.pairs,
                         local_chance=None if local is None else local.chance,
                         travel=travel if travel is None or members is None else
                         travel[members])
        return place(pairs, r.shift_px, r.quality, stage_px, scan.csm, method="reference",
                     thresholding="manual" if ask_thresholds else "automatic",
                     ask_thresholds=ask_thresholds, min_peak_quality=settings.min_peak_quality,
                     max_stage_discrepancy=settings.max_stage_discrepancy)

    n = len(scan)
    labels = components(n, graph.pairs) if len(graph.pairs) else np.arange(n)
    n_groups = int(labels.max()) + 1 if n else 0
    reference = settings.placement == "reference"
    if n_groups <= 1:
        placement = place_pairs(graph.pairs, readings, scan.stage_px)
        used = (placement.min_peak_quality, placement.max_stage_discrepancy)
        return Placed(placement.positions_px, placement, n_groups, used if reference else None)
    positions = scan.stage_px.astype(np.float64).copy()
    sizes = np.bincount(labels)
    used = (0.0, 0.0)
    for label in np.flatnonzero(sizes > 1):
        members = np.flatnonzero(labels == label)
        index = np.full(n, -1)
        index[members] = np.arange(len(members))
        sel = labels[graph.pairs[:, 0]] == label
        stage = scan.stage_px[members]
        sub = place_pairs(index[graph.pairs[sel]], readings.take(sel), stage, members)
        if label == int(np.argmax(sizes)):
            used = (sub.min_peak_quality, sub.max_stage_discrepancy)
        positions[members] = sub.positions_px - sub.positions_px.mean(axis=0) + \
            stage.mean(axis=0)
    return Placed(positions - positions.min(axis=0), None, n_groups, used if reference else None)


def register_scan(scan: Scan, graph: OverlapGraph, settings: StitchSettings, backend: Backend,
                  *, cache: CorrelationCache | None, progress: Progress = no_progress,
                  ask_thresholds: Callable[[], Thresholds] | None = None,
                  nulls: NullRequest = NullRequest(), thresholds: Thresholds | None = None,
                  plot_dir: Path | None = None, warn: bool = True,
                  search_locally: bool = True) -> Registration:
    """Correlate the graph's pairs (and the null pairs) and place every tile.

    Parameters
    ----------
    scan, graph
        The tiles and their overlap graph (which may have several groups).
    settings : StitchSettings
    backend : Backend
    cache : CorrelationCache or None
    progress : callable
        ``progress(stage, done, total)``.
    ask_thresholds : callable, optional
        For ``thresholding="manual"``: returns ``(min peak quality, max stage
        discrepancy)``, once the correlation plot is drawn into ``plot_dir``.
    nulls : NullRequest
        Which null pairs to correlate now (default: all, as a batch run).
    thresholds : (float, float), optional
        Reference placement: use these thresholds instead of searching.
    plot_dir : path, optional
        Where the correlation plot goes before ``ask_thresholds`` is asked.
    warn : bool
        Warn (once, in one line) when the placement is doubtful (live previews do not).
    search_locally : bool
        Robust placement: run the constrained local search (:func:`local_search`, full
        resolution; live updates leave it to their refinement, as a batch run does not).
    """
    t0 = time.perf_counter()
    plan = plan_pairs(scan, graph, settings)
    use_null, n_missing, tried = _null_selection(scan, plan, settings, cache, nulls)
    use = np.ones(len(plan.order), dtype=bool)
    use[plan.null_rows] = use_null
    streamed = Readings.empty(len(plan.order))
    streamed.cached[:] = True
    streamed.put(use, correlate(scan, plan.stream_pairs[use], plan.stream_expected[use],
                                settings, backend, cache=cache, progress=progress))
    readings, null_readings = plan.split(streamed)
    null_readings = null_readings.take(use_null)
    null_expected = plan.null_expected[use_null]
    t1 = time.perf_counter()

    ask = (lambda: thresholds) if thresholds is not None else None
    if settings.thresholding == "manual":
        if ask_thresholds is None:
            raise OfstitchError("thresholding='manual' needs someone to answer: pass "
                                "ask_thresholds (the command line asks)")
        if plot_dir is not None:
            diagnostics.plot_correlations(
                plot_dir / "stitching_correlations.png", readings.quality,
                np.linalg.norm(readings.shift_px - plan.expected, axis=1))
        ask = ask_thresholds
    placed = place_readings(scan, graph, readings, settings, null_readings=null_readings,
                            null_expected=null_expected, ask_thresholds=ask)
    extra = island_pairs(scan, graph, placed.placement.accepted) \
        if settings.placement == "robust" and placed.placement is not None \
        else np.zeros((0, 2), np.int64)
    if len(extra):
        # Tiles left in islands: try their smaller overlaps (diagonal neighbours) too.
        log.info("%d extra pairs for tiles in islands", len(extra))
        readings = readings.concat(correlate(scan, extra, expected_shifts(scan, extra),
                                             settings, backend, cache=cache, progress=progress))
        pairs = np.concatenate([graph.pairs, extra])
        graph = OverlapGraph(pairs, predicted_overlap(scan.stage_px, scan.tile_shape,
                                                      pairs[:, 0], pairs[:, 1]), len(scan))
        placed = place_readings(scan, graph, readings, settings, null_readings=null_readings,
                                null_expected=null_expected, ask_thresholds=ask)
    local = local_search(scan, graph, placed.placement, plan, use_null, backend, cache=cache,
                         correlation=settings.correlation) \
        if search_locally and settings.placement == "robust" \
        and settings.correlation.corr_mask_radius is None else None
    if local is not None:
        placed = place_readings(scan, graph, readings, settings, null_readings=null_readings,
                                null_expected=null_expected, ask_thresholds=ask, local=local)
    report = placed.placement.report if placed.placement is not None else None
    if warn and report is not None and report.doubtful:
        warnings.warn(report.warning(), OfstitchWarning, stacklevel=2)
    t2 = time.perf_counter()
    return Registration(
        scan, graph, readings, placed.positions_px, placed.placement, placed.n_groups,
        readings.n_correlated, readings.n_cached, len(null_readings.cached), backend.describe(),
        n_missing, tried, placed.thresholds, {"correlate": t1 - t0, "place": t2 - t1})
