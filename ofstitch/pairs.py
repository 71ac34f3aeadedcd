"""One batch of pairs: correlation, candidate peaks, overlap scores and refinement.

:func:`correlate_batch` turns the prepared tiles of a batch of pairs (filtered, from
:mod:`ofstitch.stream`) into readings: with ``search_margin > 0`` (the default) the
overlap strips the stage predicts are cut and correlated (:func:`_correlate_strips`);
otherwise whole tiles' spectra are multiplied. Either way the highest peak and
:data:`CANDIDATES` candidate peaks come back, each candidate scored by the normalised
cross-correlation (NCC) of the two tiles' overlap at that shift, and coarse-to-fine
readings are refined at full resolution (:mod:`ofstitch.refine`). Each stage brings the
whole batch back to the host in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.fft
from array_api_compat import array_namespace

from . import correlate, overlap, refine
from .backends import Backend, to_device, to_host
from .settings import CorrelationSettings

if TYPE_CHECKING:
    from .stream import CorrelationPlan

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


@dataclass(frozen=True)
class LiveTiles:
    """The prepared tiles a batch reads, by tile number: ``search`` (filtered tiles for
    strips, spectra for whole tiles), ``scored`` (binned, filtered for the overlap NCC)
    and, coarse to fine, ``full`` (full-resolution detail, :func:`ofstitch.refine.detail`)."""

    search: dict
    scored: dict
    full: dict


def correlate_batch(batch: np.ndarray, expected_px: np.ndarray, good: np.ndarray,
                    live: LiveTiles, plan: CorrelationPlan, settings: CorrelationSettings,
                    backend: Backend) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings of one batch of pairs ``(k, 2)``: ``(shift, quality, candidates)`` in
    full-resolution pixels (see :class:`ofstitch.stream.BatchResult`), NaN where ``good``
    is false (a tile could not be decoded). ``expected_px`` is each pair's stage-predicted
    shift, full resolution. A pure function of its arguments: batches can run on threads
    of their own."""
    xp = backend.xp
    resize = plan.resize
    shift = np.full((len(batch), 2), np.nan)
    quality = np.full(len(batch), np.nan)
    candidates = np.full((len(batch), CANDIDATES, 3), np.nan)
    if good.any() and plan.margin_px is not None:
        sel = batch[good]
        sel_expected = expected_px[good] * resize
        sel_shift, sel_quality, cand_shift = _correlate_strips(
            sel, sel_expected, live.search, plan, settings, backend, candidates=True)
        shift[good] = sel_shift / resize
        quality[good] = sel_quality
        candidates[good] = _score_candidates(
            sel, cand_shift, None, sel_expected, live.scored, plan,
            True) / np.array([resize, resize, 1.0])
        if plan.refine:
            shift[good], candidates[good] = refine.refine_readings(
                sel, shift[good], candidates[good], live.full, plan.binning)
    elif good.any():
        sel = batch[good]
        spec_a = _stack([live.search[int(a)] for a in sel[:, 0]], xp)
        spec_b = _stack([live.search[int(b)] for b in sel[:, 1]], xp)
        corr = correlate.cross_correlate(spec_a, spec_b, fft_shape=plan.fft_shape)
        del spec_a, spec_b
        expected = None
        if settings.corr_mask_radius is not None:
            expected = to_device(expected_px[good] * resize, backend,
                                 dtype=xp.float32)
        peaks = correlate.locate_peaks(
            corr, expected_shift=expected,
            mask_radius=(settings.corr_mask_radius * resize
                         if settings.corr_mask_radius is not None else None))
        # The highest peaks anywhere, and the highest near the stage prediction
        # (a weak true peak can rank below repeats or fixed patterns elsewhere).
        prior = to_device(expected_px[good] * resize, backend,
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
            expected_px[good] * resize, live.scored, plan,
            settings.pad) / np.array([resize, resize, 1.0])
        sel_shift = to_host(peaks.shift).astype(np.float64)
        if not settings.pad:
            sel_shift = _break_ambiguity(sel, to_host(peaks.index), sel_shift,
                                         live.scored, plan.fft_shape)
        shift[good] = sel_shift / resize
        quality[good] = to_host(peaks.quality)
        if plan.refine:
            shift[good], candidates[good] = refine.refine_readings(
                sel, shift[good], candidates[good], live.full, plan.binning)
    return shift, quality, candidates


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
