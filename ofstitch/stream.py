"""Streaming pair correlation: the one place for batching, memory budgets and transfer.

Tiles are decoded on a thread pool (grey float32 at the requested resize) a fixed
number of tiles ahead of need, uploaded to the device once and filtered once. With
``search_margin > 0`` (the default) each pair correlates the overlap strips the stage
predicts; with whole tiles (``search_margin=0``) each tile is transformed once. Large
tiles are searched binned (strips: 2x2 from a 480 px short side, 4x4 from 2400 px;
whole tiles: 2x2 from 800 px), and the readings that could be used are refined at full
resolution by direct correlation at neighbouring integer shifts (:mod:`ofstitch.refine`).
An earlier refinement by a second, full-resolution strip FFT was measured and dropped: at
100 tiles of 832x624 it cost as much as the search it saved. A tile
stays on the device only
while it still has unprocessed pairs. Pairs are taken
in the graph's order (by first tile, in capture order), so for a raster or
snake scan the live set stays about one scan row wide (one column for a
column-first scan), and go through the kernels in batches sized from a memory
budget.
Only the per-pair results come back to the host: the highest peak's shift and quality, and
:data:`CANDIDATES` candidate peaks, each scored by the normalised cross-correlation
(NCC) of the two tiles' overlap at that shift.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from array_api_compat import array_namespace

from . import correlate, overlap, refine, tiles
from .backends import Backend, free_memory_bytes, to_device, to_host
from .errors import OfstitchWarning, SettingError
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
# Candidate peaks kept per pair, each scored by the normalised cross-correlation of the
# tiles' overlap at that shift (robust placement chooses among them).
CANDIDATES = 8
# Of those, this many are the highest within PRIOR_RADIUS_FRACTION of the tile size (or
# --corr-mask-radius) of the stage-predicted shift.
PRIOR_PEAKS = 3
PRIOR_RADIUS_FRACTION = 0.2
# A candidate must leave at least this fraction of the stage-predicted overlap.
MIN_OVERLAP_FRACTION = 0.2
# Overlaps are scored on tiles binned SCORE_BINNING times and high-pass filtered at this
# sigma (binned pixels; see correlate.score_tiles).
SCORE_BINNING = 2
SCORE_HIGH_PASS_SIGMA = 8.0
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
    if batch_pairs is None:
        batch_pairs = plan.batch_pairs(budget_bytes or DEFAULT_BUDGET_BYTES["time"])
    workers = workers or os.cpu_count() or 1
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

    live_full: dict[int, object] = {}  # coarse to fine: full-resolution detail (refine.detail)

    strips = plan.margin_px is not None
    prefetch_depth = max(2 * workers, 8)
    futures: dict[int, Future] = {}
    next_prefetch = 0

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ofstitch-decode") as pool:

        def prefetch(until: int) -> None:
            nonlocal next_prefetch
            while next_prefetch < min(until, len(first_use)):
                t = first_use[next_prefetch]
                futures[t] = pool.submit(decode, t)
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
            if ok:
                fulls = None
                if plan.refine:
                    fulls = [f for f, _ in arrays]
                    arrays = [coarse for _, coarse in arrays]
                stack = to_device(np.stack(arrays), backend)
                # Filtered once here: strips are cut per pair from the filtered tiles (a
                # quarter of a padded spectrum each); whole tiles are transformed once.
                # Binned tiles are filtered at --high-pass-sigma / sqrt(binning) binned px,
                # between the same width in bins (at 10 binned px a faint, nearly blank
                # tile of the 1000-tile scan lost its vertical readings) and in the tiles'
                # own pixels (at 5 binned px the coarse peak of a pair of the graph-paper
                # strip fell on the grid lines' next repeat, 3.7 px from the full-resolution one).
                sigma = settings.high_pass_sigma / math.sqrt(plan.binning)
                if plan.score_binning == 1:  # both filters from one transform
                    filtered, scored = correlate.search_and_score_tiles(
                        stack, high_pass_sigma=sigma, score_sigma=SCORE_HIGH_PASS_SIGMA)
                else:
                    scored = correlate.score_tiles(stack, high_pass_sigma=SCORE_HIGH_PASS_SIGMA,
                                                   binning=plan.score_binning)
                    filtered = (correlate.remove_background(stack, sigma)
                                if sigma > 0 else stack)
                _keep(live_tiles, ok, scored, xp)
                del scored
                if fulls is not None:  # one tile at a time: no stacked copy of full tiles
                    for i, t in enumerate(ok):
                        live_full[t] = refine.detail(to_device(fulls[i], backend), stack[i, ...],
                                                     filtered[i, ...], plan.binning)
                    del fulls
                if strips:
                    _keep(live_spectra, ok, filtered, xp)
                else:
                    _keep(live_spectra, ok, correlate.tile_spectra(
                        filtered, fft_shape=plan.fft_shape, high_pass_sigma=0), xp)
                del filtered
                del stack
                stats["tiles_transformed"] += len(ok)
            stats["max_live_spectra"] = max(stats["max_live_spectra"], len(live_spectra))

            good = np.array([a not in bad_tiles and b not in bad_tiles for a, b in batch.tolist()],
                            dtype=bool)
            shift = np.full((len(batch), 2), np.nan)
            quality = np.full(len(batch), np.nan)
            candidates = np.full((len(batch), CANDIDATES, 3), np.nan)
            if good.any() and strips:
                sel = batch[good]
                sel_expected = expected_shift_px[start:stop][good] * resize
                sel_shift, sel_quality, cand_shift = _correlate_strips(
                    sel, sel_expected, live_spectra, plan, settings, backend, candidates=True)
                shift[good] = sel_shift / resize
                quality[good] = sel_quality
                candidates[good] = _score_candidates(
                    sel, cand_shift, None, sel_expected, live_tiles, plan,
                    True) / np.array([resize, resize, 1.0])
                if plan.refine:
                    shift[good], candidates[good] = refine.refine_readings(
                        sel, shift[good], candidates[good], live_full, plan.binning)
            elif good.any():
                sel = batch[good]
                spec_a = _stack([live_spectra[int(a)] for a in sel[:, 0]], xp)
                spec_b = _stack([live_spectra[int(b)] for b in sel[:, 1]], xp)
                corr = correlate.cross_correlate(spec_a, spec_b, fft_shape=plan.fft_shape)
                del spec_a, spec_b
                expected = None
                if settings.corr_mask_radius is not None:
                    expected = to_device(expected_shift_px[start:stop][good] * resize, backend,
                                         dtype=xp.float32)
                peaks = correlate.locate_peaks(
                    corr, expected_shift=expected,
                    mask_radius=(settings.corr_mask_radius * resize
                                 if settings.corr_mask_radius is not None else None))
                # The highest peaks anywhere, and the highest near the stage prediction
                # (a weak true peak can rank below repeats or fixed patterns elsewhere).
                prior = to_device(expected_shift_px[start:stop][good] * resize, backend,
                                  dtype=xp.float32)
                radius = (settings.corr_mask_radius * resize
                          if settings.corr_mask_radius is not None
                          else PRIOR_RADIUS_FRACTION * min(plan.scaled_shape))
                cand_shift, cand_index = correlate.top_peaks(
                    corr, CANDIDATES - PRIOR_PEAKS, near=PRIOR_PEAKS, expected_shift=prior,
                    radius=radius)
                del corr
                candidates[good] = _score_candidates(
                    sel, to_host(cand_shift).astype(np.float64), to_host(cand_index),
                    expected_shift_px[start:stop][good] * resize, live_tiles, plan,
                    settings.pad) / np.array([resize, resize, 1.0])
                sel_shift = to_host(peaks.shift).astype(np.float64)
                if not settings.pad:
                    sel_shift = _break_ambiguity(sel, to_host(peaks.index), sel_shift,
                                                 live_tiles, plan.fft_shape)
                shift[good] = sel_shift / resize
                quality[good] = to_host(peaks.quality)
                if plan.refine:
                    shift[good], candidates[good] = refine.refine_readings(
                        sel, shift[good], candidates[good], live_full, plan.binning)
            # Free spectra whose last pair is done.
            for t in list(live_spectra):
                if last_use[t] < stop:
                    del live_spectra[t]
                    live_tiles.pop(t, None)
                    live_full.pop(t, None)
            yield BatchResult(np.arange(start, stop), shift, quality, candidates)


def _keep(store: dict, tiles_: list[int], batch: Any, xp: Any) -> None:
    """``store[t] = batch[i]`` for the ``i``-th of ``tiles_``: copies, so that the batch
    array is freed with its last tile (a batch of one is kept as it is)."""
    for i, t in enumerate(tiles_):
        store[t] = xp.asarray(batch[i, ...], copy=True) if len(tiles_) > 1 else batch[0, ...]


def _stack(arrays: list, xp: Any) -> Any:
    """``xp.stack``, without copying a single array."""
    return arrays[0][None, ...] if len(arrays) == 1 else xp.stack(arrays)


def _score_candidates(pairs: np.ndarray, shift: np.ndarray, index: np.ndarray | None,
                      expected: np.ndarray, live_tiles: dict, plan: CorrelationPlan,
                      pad: bool) -> np.ndarray:
    """``(pairs, CANDIDATES, 3)``: each candidate's sub-pixel shift and its overlap NCC.

    Without padding, a circular peak (at ``index``, unused with padding) stands for up
    to four shifts: the one whose overlap matches best is kept. A shift that leaves less
    than :data:`MIN_OVERLAP_FRACTION` of the stage-predicted overlap scores -1. The
    overlap NCCs of the whole batch come back to the host in one transfer.
    """
    h, w = plan.scaled_shape
    sb = plan.score_binning
    hb, wb = h // sb, w // sb
    out = np.full(shift.shape[:2] + (3,), np.nan)
    ey, ex = (np.abs(expected) / sb).T
    expected_area = np.maximum(hb - ey, 1) * np.maximum(wb - ex, 1)
    min_area = np.maximum((MIN_OVERLAP_FRACTION * expected_area).astype(np.int64), 2)
    whole = np.round(shift)
    # (k, c, reading, its overlap's index in `overlaps` or -1 for too small), per reading.
    jobs: list[tuple[int, int, tuple[int, int], int]] = []
    overlaps, areas, owner = [], [], []  # per distinct overlap: (a, b, shift), area, pair
    seen: dict[tuple[int, int, int], int] = {}  # (pair, binned shift) -> its index
    for k, c in zip(*np.nonzero(np.isfinite(shift[:, :, 0])), strict=True):
        a, b = (int(t) for t in pairs[k])
        readings = ([(int(whole[k, c, 0]), int(whole[k, c, 1]))] if pad else
                    overlap.unwrap_candidates(tuple(int(v) for v in index[k, c]), plan.fft_shape))
        for ry, rx in readings:
            binned = (round(ry / sb), round(rx / sb))
            area = overlap.overlap_area((hb, wb), binned)
            j = -1
            if area >= min_area[k]:
                j = seen.setdefault((int(k),) + binned, len(overlaps))
                if j == len(overlaps):  # the same overlap is scored once
                    overlaps.append((live_tiles[a], live_tiles[b], binned))
                    areas.append(area)
                    owner.append(k)
            jobs.append((int(k), int(c), (ry, rx), j))
    if not jobs:
        return out
    ncc = np.zeros(0)
    if overlaps:  # the batch's sums, in one transfer
        tiles_a, tiles_b, shifts = (list(part) for part in zip(*overlaps, strict=True))
        ncc = overlap.ncc_from_sums(to_host(overlap.overlap_sums_many(tiles_a, tiles_b, shifts)),
                                    np.asarray(areas))
    # Chance NCCs spread as 1 / sqrt(area): a smaller overlap than the stage predicts must
    # match better to count as much (the null pairs, searched around the prediction, set
    # the scale). Too small an overlap scores -1.
    factor = np.minimum(1.0, np.sqrt(np.asarray(areas, dtype=np.float64)
                                     / expected_area[np.asarray(owner, dtype=np.int64)]))
    scores = np.where(ncc > 0, ncc * factor, ncc)
    best: dict[tuple[int, int], tuple[float, tuple[int, int]]] = {}
    for k, c, reading, j in jobs:
        score = float(scores[j]) if j >= 0 else -1.0
        if (k, c) not in best or score > best[(k, c)][0]:  # the first of equal scores wins
            best[(k, c)] = (score, reading)
    for (k, c), (score, reading) in best.items():
        out[k, c, :2] = np.asarray(reading, dtype=np.float64) + (shift[k, c] - whole[k, c])
        out[k, c, 2] = score
    return out


def _to_host_list(values: list, live_tiles: dict) -> list:
    """Device arrays of one shape (0-d: scalars) -> Python floats (nested lists for
    arrays), in one transfer."""
    if not values:
        return []
    xp = array_namespace(next(iter(live_tiles.values())))
    return to_host(xp.stack([xp.asarray(v) for v in values])).tolist()


def _break_ambiguity(pairs: np.ndarray, index: np.ndarray, shift: np.ndarray,
                     live_tiles: dict, fft_shape: tuple[int, int]) -> np.ndarray:
    """Without padding, pick the wrap-around reading whose overlap matches best (the NCCs
    of the batch come back in one transfer)."""
    out = shift.copy()
    readings = [overlap.unwrap_candidates(tuple(int(v) for v in index[k]), fft_shape)
                for k in range(len(pairs))]
    # The live tiles are the binned score tiles (correlate.score_tiles).
    nccs = [overlap.overlap_ncc(live_tiles[a], live_tiles[b],
                                  (round(r[0] / SCORE_BINNING), round(r[1] / SCORE_BINNING)))
            for (a, b), rs in zip(pairs.tolist(), readings, strict=True) for r in rs]
    values = iter(_to_host_list(nccs, live_tiles))
    for k, rs in enumerate(readings):
        scores = [next(values) for _ in rs]
        frac = shift[k] - np.round(shift[k])
        out[k] = np.asarray(rs[int(np.argmax(scores))], dtype=np.float64) + frac
    return out


def strip_boxes(expected: np.ndarray, shape: tuple[int, int], margin: int
                ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """Crops ``(y0, y1, x0, x1)`` of tiles ``a`` and ``b`` for one pair.

    Each is the overlap that ``expected`` (the shift of ``b`` relative to ``a``) predicts,
    grown by ``margin`` on every side within its tile. ``None`` when no overlap is
    predicted.
    """
    h, w = shape
    sy, sx = int(round(float(expected[0]))), int(round(float(expected[1])))
    ay0, ay1, ax0, ax1 = max(0, sy), min(h, h + sy), max(0, sx), min(w, w + sx)
    if ay1 <= ay0 or ax1 <= ax0:
        return None

    def grow(y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        return max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)

    return grow(ay0, ay1, ax0, ax1), grow(ay0 - sy, ay1 - sy, ax0 - sx, ax1 - sx)


def strip_fft_length(len_a: int, len_b: int, centre: float, margin: int) -> int:
    """FFT length along one axis for crops of ``len_a`` and ``len_b`` pixels whose
    correlation is searched within ``margin`` of displacement ``centre``, free of
    wrap-around there (and at the sub-pixel neighbours)."""
    reach = margin + 2
    need = max(len_b - centre + reach, len_a + centre + reach, len_a, len_b)
    return scipy.fft.next_fast_len(int(math.ceil(need)), real=True)


def _correlate_strips(pairs: np.ndarray, expected: np.ndarray, live_tiles: dict,
                      plan: CorrelationPlan, settings: CorrelationSettings, backend: Backend,
                      candidates: bool = False) -> tuple[np.ndarray, ...]:
    """Correlate the predicted overlap strips of ``pairs`` (scaled px in and out).

    For crops at ``o_a`` in ``a`` and ``o_b`` in ``b``, the correlation peaks at
    ``d = o_a - o_b - s`` for a true shift ``s``, so ``s = (o_a - o_b) + shift`` where
    ``shift = -d`` is what :func:`correlate.locate_peaks` returns. The FFT sizes keep
    the correlation free of wrap-around within ``margin`` of the predicted ``d``. The
    peak is searched over the whole strip correlation (so a wrong peak lands anywhere
    and placement can reject it by its distance from the stage), or within
    ``corr_mask_radius`` (at most the margin) when that is set.

    With ``candidates``, also returns ``(pairs, CANDIDATES, 2)`` candidate shifts, as
    for whole tiles: the highest peaks of the strip correlation, and the highest
    within ``PRIOR_RADIUS_FRACTION`` of the tile (at most the margin) of the
    prediction; NaN where there are fewer.
    """
    xp = backend.xp
    margin = plan.margin_px
    radius = None
    if settings.corr_mask_radius is not None:
        radius = min(float(margin), settings.corr_mask_radius * plan.resize)
    shift = np.full((len(pairs), 2), np.nan)
    quality = np.full(len(pairs), np.nan)
    cand_shift = np.full((len(pairs), CANDIDATES, 2), np.nan)
    prior_radius = min(float(margin), PRIOR_RADIUS_FRACTION * min(plan.scaled_shape))
    if radius is not None:
        prior_radius = radius
    groups: dict[tuple, list] = {}
    for k, ((a, b), e) in enumerate(zip(pairs.tolist(), expected, strict=True)):
        boxes = strip_boxes(e, plan.scaled_shape, margin)
        if boxes is None:
            continue  # no predicted overlap: nothing to correlate, the stage places it
        (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = boxes
        offset = np.array([ay0 - by0, ax0 - bx0], dtype=np.float64)
        centre = offset - e
        fft = (strip_fft_length(ay1 - ay0, by1 - by0, centre[0], margin),
               strip_fft_length(ax1 - ax0, bx1 - bx0, centre[1], margin))
        key = (fft, (ay1 - ay0, ax1 - ax0), (by1 - by0, bx1 - bx0))
        groups.setdefault(key, []).append((k, a, b, boxes, offset, centre))
    for (fft, _, _), members in groups.items():
        crops_a = xp.stack([live_tiles[a][y0:y1, x0:x1]
                            for _, a, _, ((y0, y1, x0, x1), _), _, _ in members])
        crops_b = xp.stack([live_tiles[b][y0:y1, x0:x1]
                            for _, _, b, (_, (y0, y1, x0, x1)), _, _ in members])
        # The live tiles are filtered already (see correlate_pairs).
        spec_a = correlate.tile_spectra(crops_a, fft_shape=fft, high_pass_sigma=0)
        del crops_a
        spec_b = correlate.tile_spectra(crops_b, fft_shape=fft, high_pass_sigma=0)
        del crops_b
        corr = correlate.cross_correlate(spec_a, spec_b, fft_shape=fft)
        del spec_a, spec_b
        centres = np.stack([m[5] for m in members])
        if radius is None:
            peaks = correlate.locate_peaks(corr, exclude_radius=0)
        else:
            peaks = correlate.locate_peaks(
                corr, expected_shift=to_device(-centres, backend, dtype=xp.float32),
                mask_radius=radius, exclude_radius=0)
        ids = [m[0] for m in members]
        offsets = np.stack([m[4] for m in members])
        if candidates:
            prior = to_device(-centres, backend, dtype=xp.float32)
            found, _ = correlate.top_peaks(corr, CANDIDATES - PRIOR_PEAKS, exclude_radius=0,
                                           near=PRIOR_PEAKS, expected_shift=prior,
                                           radius=prior_radius)
            cand_shift[ids] = to_host(found).astype(np.float64) + offsets[:, None, :]
        del corr
        shift[ids] = to_host(peaks.shift).astype(np.float64) + offsets
        quality[ids] = to_host(peaks.quality)
    return (shift, quality, cand_shift) if candidates else (shift, quality)
