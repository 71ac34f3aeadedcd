"""Streaming pair correlation: the one place for batching, memory budgets and transfer.

Tiles are decoded on a thread pool (grey float32 at the requested resize) a fixed
number of tiles ahead of need, uploaded to the device once and filtered once. With
``search_margin > 0`` (the default) each pair correlates the overlap strips the stage
predicts; with whole tiles (``search_margin=0``) each tile is transformed once. Large
tiles are searched binned (strips: 2x2 from a 480 px short side, 4x4 from 2400 px;
whole tiles: 2x2 from 800 px), and the readings that could be used are refined at full
resolution by direct correlation at neighbouring integer shifts (:mod:`ofstitch.refine`).
An earlier refinement by a second, full-resolution strip FFT was measured and dropped: at
100 tiles of 832x624 it cost as much as the search it saved.

A tile stays on the device only while it still has unprocessed pairs. Pairs are taken
in the graph's order (by first tile, in capture order), so for a raster or snake scan the
live set stays about one scan row wide (one column for a column-first scan), and go
through the kernels (:func:`ofstitch.pairs.correlate_batch`) in batches sized from a
memory budget. Only the per-pair results come back to the host: the highest peak's shift
and quality, and :data:`CANDIDATES` candidate peaks, each scored by the normalised
cross-correlation (NCC) of the two tiles' overlap at that shift.

On the CPU every core works: each tile is filtered on the decode thread that decoded it,
and the batches run on threads of their own, as many at once as there are workers (each
with its share of the memory budget), their results yielded in order. On a device the
tiles of a batch are filtered together after its one transfer, and batches run in turn.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft

from . import correlate, refine, tiles
from . import pairs as pairs_
from .backends import Backend, free_memory_bytes, to_device
from .errors import OfstitchWarning, SettingError
from .pairs import (  # noqa: F401  (the pair kernels' names, as they were here)
    CANDIDATES,
    MIN_OVERLAP_FRACTION,
    PRIOR_PEAKS,
    PRIOR_RADIUS_FRACTION,
    SCORE_BINNING,
    SCORE_HIGH_PASS_SIGMA,
    _correlate_strips,
    _score_candidates,
    strip_boxes,
    strip_fft_length,
)
from .settings import CorrelationSettings, parse_memory

log = logging.getLogger(__name__)

# Host memory for a batch of pairs. On a CPU one large pair at a time was both faster and
# smaller (30 tiles of 832x624: 2.3 s and 260 MB peak, against 3.1 s and 326 MB at 192 MB).
DEFAULT_BUDGET_BYTES = {"time": 64 * 2**20, "memory": 32 * 2**20}
# On a GPU, a batch may use this fraction of the free device memory (less with priority memory).
DEFAULT_GPU_FRACTION = {"time": 0.5, "memory": 0.25}
# Device bytes per pair in a batch, in units of one real correlation array
# (product spectrum, correlation, masks and temporaries of the peak search).
ARRAYS_PER_PAIR = 10
# Smallest stage-error margin around the predicted overlap, in correlation pixels.
MIN_MARGIN_PX = 16
MIN_SCALED_SIDE = 16  # tiles smaller than this after --resize cannot be correlated
# Coarse to fine (ofstitch.refine): tiles are searched binned, and the readings that
# could be used are refined at full resolution. Whole tiles are binned 2x2 from a shorter
# side of COARSE_MIN_SIDE; overlap strips 2x2 from COARSE_STRIP_MIN_SIDE and 4x4 from
# COARSE_STRIP_4X_SIDE (so the binned strips keep 240-760 px across).
COARSE_MIN_SIDE = 800
COARSE_STRIP_MIN_SIDE = 480
COARSE_STRIP_4X_SIDE = 2400


@dataclass(frozen=True)
class CorrelationPlan:
    """Sizes of the correlation for one scan and settings."""

    tile_shape: tuple[int, int]  # full resolution (h, w)
    scaled_shape: tuple[int, int]  # after resize
    fft_shape: tuple[int, int]  # whole tiles; with strips, the largest a strip pair can need
    resize: float
    margin_px: int | None = None  # strips: stage-error margin (scaled px); None: whole tiles
    refine: bool = False  # coarse to fine: binned tiles, refined at full resolution
    binning: int = 1  # with refine: the tiles are binned this many times each way

    @property
    def score_binning(self) -> int:
        """Binning of the score tiles relative to the correlated (scaled) tiles."""
        if self.margin_px is None:
            return SCORE_BINNING
        return max(1, SCORE_BINNING // self.binning)

    @classmethod
    def make(cls, tile_shape: tuple[int, int], settings: CorrelationSettings) -> CorrelationPlan:
        scaled = tiles.scaled_shape(tile_shape, settings.resize)
        binning = 1
        if settings.pad and settings.resize == 1.0 and settings.search_margin > 0:
            short = min(tile_shape)
            binning = 4 if short >= COARSE_STRIP_4X_SIDE else 2 if short >= COARSE_STRIP_MIN_SIDE \
                else 1
            scaled = (tile_shape[0] // binning, tile_shape[1] // binning)
        if min(scaled) < MIN_SCALED_SIDE:
            raise SettingError(
                "resize", f"of {settings.resize:g} leaves tiles of {scaled[1]}x{scaled[0]} px, "
                f"too small to correlate (at least {MIN_SCALED_SIDE} px a side): use at least "
                f"{min(1.0, MIN_SCALED_SIDE / min(tile_shape)):.3g}")
        if settings.pad and settings.search_margin > 0:
            margin = max(MIN_MARGIN_PX, math.ceil(settings.search_margin * max(scaled)))
            fft = (scipy.fft.next_fast_len(scaled[0] + 2 * margin + 3, real=True),
                   scipy.fft.next_fast_len(scaled[1] + 2 * margin + 3, real=True))
            # Never more than whole padded tiles.
            fft = (min(fft[0], scipy.fft.next_fast_len(2 * scaled[0], real=True)),
                   min(fft[1], scipy.fft.next_fast_len(2 * scaled[1], real=True)))
            return cls(tile_shape, scaled, fft, settings.resize / binning, margin,
                       refine=binning > 1, binning=binning)
        refine = settings.pad and settings.resize == 1.0 and min(tile_shape) >= COARSE_MIN_SIDE
        if refine:
            scaled = (tile_shape[0] // 2, tile_shape[1] // 2)
        if settings.pad:
            fft = (scipy.fft.next_fast_len(2 * scaled[0], real=True),
                   scipy.fft.next_fast_len(2 * scaled[1], real=True))
        else:
            fft = scaled
        return cls(tile_shape, scaled, fft, 0.5 if refine else settings.resize, refine=refine,
                   binning=2 if refine else 1)

    def batch_pairs(self, budget_bytes: int) -> int:
        per_pair = ARRAYS_PER_PAIR * 4 * self.fft_shape[0] * self.fft_shape[1]
        return max(1, min(256, budget_bytes // per_pair))


def memory_budget(backend: Backend, device_memory: str | None = None,
                  priority: str = "time") -> int:
    """Bytes a batch of pairs may use on ``backend``'s device.

    ``device_memory`` is ``--device-memory`` (an amount, or a fraction of the free
    memory: device memory on a GPU, available RAM on the host).
    """
    free = free_memory_bytes(backend)
    if device_memory is not None:
        kind, value = parse_memory(device_memory)
        if kind == "bytes":
            return int(value)
        if free is None:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(value * free)
    if free is None:
        return DEFAULT_BUDGET_BYTES[priority]
    return int(DEFAULT_GPU_FRACTION[priority] * free)


@dataclass(frozen=True)
class BatchResult:
    """Results of one batch: ``pair_ids`` index the pairs given to :func:`correlate_pairs`."""

    pair_ids: np.ndarray  # (k,) int
    shift_px: np.ndarray  # (k, 2) float64, full-resolution (row, col) of b relative to a
    quality: np.ndarray  # (k,) float64
    # (k, CANDIDATES, 3): (row, col, ncc) of each candidate peak, best correlation first;
    # NaN rows where there are fewer candidates. ncc is -1 where the overlap is too small.
    candidates: np.ndarray | None = None


def correlate_pairs(
    paths: list[Path],
    pairs: np.ndarray,
    expected_shift_px: np.ndarray,
    settings: CorrelationSettings,
    plan: CorrelationPlan,
    backend: Backend,
    *,
    batch_pairs: int | None = None,
    budget_bytes: int | None = None,
    workers: int | None = None,
    stats: dict | None = None,
) -> Iterator[BatchResult]:
    """Correlate ``pairs`` of the tiles in ``paths``, yielding results batch by batch.

    Parameters
    ----------
    paths : list of Path
        Tile files, indexed by tile number.
    pairs : ndarray, shape (m, 2), int
        Tile indices ``(a, b)``, in the order to process them.
    expected_shift_px : ndarray, shape (m, 2)
        Stage-predicted ``(row, col)`` shift of ``b`` relative to ``a`` (full resolution).
    settings, plan
        Correlation settings and sizes.
    backend : Backend
        Where the kernels run.
    stats : dict, optional
        Filled with ``max_live_spectra``, ``tiles_transformed`` and
        ``max_prefetched`` (for tests).

    Yields
    ------
    BatchResult
        A pair whose tile cannot be decoded gets NaN results (with a warning).
    """
    m = len(pairs)
    if m == 0:
        return
    workers = workers or os.cpu_count() or 1
    on_host = backend.name == "numpy"
    if batch_pairs is None:  # the budget is shared by the batches running at once
        batch_pairs = plan.batch_pairs((budget_bytes or DEFAULT_BUDGET_BYTES["time"])
                                       // (workers if on_host else 1))
    xp = backend.xp
    resize = plan.resize

    # Last pair index at which each tile is needed: free its spectrum after that.
    last_use: dict[int, int] = {}
    first_use: list[int] = []  # tiles in the order they are first needed
    used_by = np.zeros(m, dtype=np.int64)  # len(first_use) once pairs[:k + 1] are done
    for k, (a, b) in enumerate(pairs.tolist()):
        for t in (a, b):
            if t not in last_use:
                first_use.append(t)
            last_use[t] = k
        used_by[k] = len(first_use)
    live_spectra: dict[int, object] = {}
    live_tiles: dict[int, object] = {}  # binned, filtered tiles: overlap NCC of candidates
    bad_tiles: set[int] = set()
    stats = stats if stats is not None else {}
    stats.setdefault("max_live_spectra", 0)
    stats.setdefault("tiles_transformed", 0)
    stats.setdefault("max_prefetched", 0)  # tiles decoded (or decoding) ahead of use

    def decode(t: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        if plan.refine:  # the full tile, and its bins for the coarse search
            full = tiles.read_grey(paths[t], 1.0, shape=plan.tile_shape)
            return full, correlate.bin_tiles(full[None], plan.binning)[0]
        return tiles.read_grey(paths[t], resize, shape=plan.tile_shape)

    # On the CPU each tile is also filtered on the decode threads, so that the other cores
    # filter tiles while pairs are correlated (pocketfft and NumPy's loops release the
    # GIL); on a device the filters run batched, after the batch's one transfer.

    def decode_and_prepare(t: int) -> _Prepared:
        decoded = decode(t)
        full, coarse = decoded if plan.refine else (None, decoded)
        return _prepare(coarse[None], None if full is None else [full], plan, settings, backend)

    live_full: dict[int, object] = {}  # coarse to fine: full-resolution detail (refine.detail)

    prefetch_depth = max(2 * workers, 8)
    futures: dict[int, Future] = {}
    next_prefetch = 0

    # On the CPU the batches of pairs run on threads too, up to one per worker at once,
    # each holding the tiles it reads; results are yielded in order.
    in_flight = workers if on_host else 1
    pending: deque[tuple[int, int, Future | tuple]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ofstitch-decode") as pool, \
            ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="ofstitch-pairs") \
            if in_flight > 1 else contextlib.nullcontext() as pair_pool:

        def prefetch(until: int) -> None:
            nonlocal next_prefetch
            while next_prefetch < min(until, len(first_use)):
                t = first_use[next_prefetch]
                futures[t] = pool.submit(decode_and_prepare if on_host else decode, t)
                next_prefetch += 1

        for start in range(0, m, batch_pairs):
            stop = min(m, start + batch_pairs)
            batch = pairs[start:stop]
            needed = [t for t in dict.fromkeys(batch.ravel().tolist())
                      if t not in live_spectra and t not in bad_tiles]
            # Decoded tiles wait in memory: look ahead a fixed number of tiles past this
            # batch's, never further (a batch of live tiles must not move the window).
            prefetch(int(used_by[stop - 1]) + prefetch_depth)
            stats["max_prefetched"] = max(stats["max_prefetched"], len(futures))
            arrays, ok = [], []
            for t in needed:
                try:
                    arrays.append(futures.pop(t).result())
                    ok.append(t)
                except tiles.TileReadError as exc:
                    warnings.warn(f"{exc}; its pairs are placed from the stage only",
                                  OfstitchWarning, stacklevel=2)
                    bad_tiles.add(t)
            if ok and on_host:  # prepared on the decode threads
                for t, prepared in zip(ok, arrays, strict=True):
                    _keep_prepared(prepared, [t], live_spectra, live_tiles, live_full, xp)
            elif ok:
                fulls = None
                if plan.refine:
                    fulls = [f for f, _ in arrays]
                    arrays = [coarse for _, coarse in arrays]
                prepared = _prepare(to_device(np.stack(arrays), backend), fulls, plan, settings,
                                    backend)
                del arrays, fulls
                _keep_prepared(prepared, ok, live_spectra, live_tiles, live_full, xp)
                del prepared
            if ok:
                stats["tiles_transformed"] += len(ok)
            stats["max_live_spectra"] = max(stats["max_live_spectra"], len(live_spectra))

            good = np.array([a not in bad_tiles and b not in bad_tiles for a, b in batch.tolist()],
                            dtype=bool)
            used = list(dict.fromkeys(batch[good].ravel().tolist()))
            live = pairs_.LiveTiles({t: live_spectra[t] for t in used},
                                    {t: live_tiles[t] for t in used},
                                    {t: live_full[t] for t in used} if plan.refine else {})
            # Free the tiles whose last pair is in this batch (the batch holds its own).
            for t in list(live_spectra):
                if last_use[t] < stop:
                    del live_spectra[t]
                    live_tiles.pop(t, None)
                    live_full.pop(t, None)
            job = (batch, expected_shift_px[start:stop], good, live, plan, settings, backend)
            del live
            pending.append((start, stop, pair_pool.submit(pairs_.correlate_batch, *job)
                            if pair_pool is not None else pairs_.correlate_batch(*job)))
            del job
            while len(pending) >= in_flight:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(start: int, stop: int, readings: Future | tuple) -> BatchResult:
    if isinstance(readings, Future):
        readings = readings.result()
    return BatchResult(np.arange(start, stop), *readings)


@dataclass
class _Prepared:
    """Tiles ready to correlate: ``search`` (filtered tiles for strips, spectra for whole
    tiles), ``scored`` (for the candidates' overlap NCC) and, coarse to fine, the
    full-resolution ``details`` (:func:`ofstitch.refine.detail`), one per tile."""

    search: Any
    scored: Any
    details: list | None


def _prepare(stack: Any, fulls: list[np.ndarray] | None, plan: CorrelationPlan,
             settings: CorrelationSettings, backend: Backend) -> _Prepared:
    """Filter a batch of decoded tiles (``stack``, ``(n, h, w)`` on the device; ``fulls``,
    coarse to fine, their full-resolution host tiles, overwritten)."""
    # Binned tiles are filtered at --high-pass-sigma / sqrt(binning) binned px, between the
    # same width in bins (at 10 binned px a faint, nearly blank tile of the 1000-tile scan
    # lost its vertical readings) and in the tiles' own pixels (at 5 binned px the coarse
    # peak of a pair of the graph-paper strip fell on the grid lines' next repeat, 3.7 px
    # from the full-resolution one).
    sigma = settings.high_pass_sigma / math.sqrt(plan.binning)
    if plan.score_binning == 1:  # both filters from one transform
        filtered, scored = correlate.search_and_score_tiles(
            stack, high_pass_sigma=sigma, score_sigma=SCORE_HIGH_PASS_SIGMA)
    else:
        scored = correlate.score_tiles(stack, high_pass_sigma=SCORE_HIGH_PASS_SIGMA,
                                       binning=plan.score_binning)
        filtered = correlate.remove_background(stack, sigma) if sigma > 0 else stack
    details = None
    if fulls is not None:  # one tile at a time: no stacked copy of full tiles
        details = [refine.detail(to_device(full, backend), stack[i, ...], filtered[i, ...],
                                 plan.binning) for i, full in enumerate(fulls)]
    # Strips are cut per pair from the filtered tiles (a quarter of a padded spectrum each);
    # whole tiles are transformed once.
    search = filtered if plan.margin_px is not None else correlate.tile_spectra(
        filtered, fft_shape=plan.fft_shape, high_pass_sigma=0)
    return _Prepared(search, scored, details)


def _keep_prepared(prepared: _Prepared, tiles_: list[int], live_spectra: dict,
                   live_tiles: dict, live_full: dict, xp: Any) -> None:
    """File ``prepared`` (tiles ``tiles_``) in the live sets."""
    _keep(live_tiles, tiles_, prepared.scored, xp)
    _keep(live_spectra, tiles_, prepared.search, xp)
    if prepared.details is not None:
        live_full.update(zip(tiles_, prepared.details, strict=True))


def _keep(store: dict, tiles_: list[int], batch: Any, xp: Any) -> None:
    """``store[t] = batch[i]`` for the ``i``-th of ``tiles_``: copies, so that the batch
    array is freed with its last tile (a batch of one is kept as it is)."""
    for i, t in enumerate(tiles_):
        store[t] = xp.asarray(batch[i, ...], copy=True) if len(tiles_) > 1 else batch[0, ...]
