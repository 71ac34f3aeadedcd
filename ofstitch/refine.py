"""Coarse to fine: readings found on binned tiles, measured again at full resolution.

Large tiles are searched binned (:mod:`ofstitch.stream`: 2x2, or 4x4 for the largest),
which cuts the FFTs, the filters and the peak search by the square of the binning, but a
sub-pixel peak of a binned correlation is off by up to about half a binned pixel. Each
reading that could be used is therefore measured again on the two tiles' full-resolution
*detail* (:func:`detail`: the full tile less the coarse tile's low-pass, repeated over
each bin), by direct correlation: the sum of products over the overlap at the integer
shift nearest the reading and at its eight neighbours. The centre moves to the highest
neighbour until it is the highest itself (at most :data:`MAX_STEPS` times), then a
parabola through each axis's three values gives the sub-pixel shift, as a full-resolution
correlation would. That is nine sums of products per step, where a full-resolution
strip costs two forward and one inverse FFT of the strip, and a full-resolution filter
of each tile.

Every step of a batch comes back to the host in one transfer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_numpy_namespace

from .backends import to_host

# Candidates refined per pair: the best-scored that could be used (score at least
# REFINE_MIN_SCORE, place.MIN_SCORE), and the highest peak (the threshold search's reading).
REFINE_PER_PAIR = 3
REFINE_MIN_SCORE = 0.2
# Integer shifts compared at each step: the centre, its neighbours along y and x, then the
# diagonal ones (a ridge of anisotropic texture can run diagonally: climbing along the
# axes alone stops on it a pixel short of the peak).
STENCIL = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))
SUMS = len(STENCIL) + 4
MIN_OVERLAP_SIDE = 4
# Overlaps larger than this many pixels are summed over every k-th row (an overlap of
# 4056x3040 tiles has millions of pixels; a quarter of a million pins the peak to a few
# thousandths of a pixel).
MAX_PIXELS = 250_000
# A region whose variance is below this fraction of its mean square is flat: no peak.
FLAT = 1e-6  # full-resolution pixels: a smaller overlap keeps its coarse reading


def max_steps(binning: int) -> int:
    """Recentring steps allowed: a coarse reading is within about half a bin."""
    return binning + 1


def detail(full: Any, coarse: Any, coarse_filtered: Any, binning: int) -> Any:
    """``(h * binning, w * binning)``: a full-resolution tile less the low-pass that the
    coarse filter removed (``coarse - coarse_filtered``, ``(h, w)``), repeated over each
    bin.

    What is left is the full-resolution content that the coarse search correlated
    (shading and vignetting removed), with the fine detail that binning averaged away.
    ``full`` may be overwritten (it is a tile decoded for this alone).
    """
    xp = array_namespace(full, coarse)
    h, w = coarse.shape
    low = coarse - coarse_filtered
    full = full[:h * binning, :w * binning]
    if is_numpy_namespace(xp) and full.flags.c_contiguous:
        # In place through a view of the bins: no tile-sized temporaries (a 4056x3040
        # tile is 49 MB).
        full.reshape(h, binning, w, binning)[...] -= low[:, None, :, None]
        return full
    up = xp.broadcast_to(low[:, None, :, None], (h, binning, w, binning))
    return full - xp.reshape(up, (h * binning, w * binning))


def stencil_sums(tile_a: Any, tile_b: Any, shift_yx: tuple[int, int]) -> list[Any] | None:
    """Sums of products of the two tiles' overlap at ``shift_yx`` and at its eight
    neighbours (:data:`STENCIL`), as 0-d device arrays, over one region of ``tile_a``
    shared by all nine (the overlap at ``shift_yx`` less one pixel at each side), so
    the nine are compared over the same pixels; then the raw and central second moments
    of tile_a's region and of tile_b's at ``shift_yx`` (:data:`SUMS` values in all).
    ``None`` when the region is too small.

    ``shift_yx`` is the position of ``tile_b`` relative to ``tile_a``; tile_b's pixel
    ``p`` lies on tile_a's ``p + shift``.
    """
    xp = array_namespace(tile_a, tile_b)
    h, w = tile_a.shape
    sy, sx = shift_yx
    y0, y1 = max(sy, 0) + 1, h + min(sy, 0) - 1
    x0, x1 = max(sx, 0) + 1, w + min(sx, 0) - 1
    if y1 - y0 < MIN_OVERLAP_SIDE or x1 - x0 < MIN_OVERLAP_SIDE:
        return None
    # Every k-th row of a large region: the rows still pair up exactly at every shift.
    k = max(1, math.ceil((y1 - y0) * (x1 - x0) / MAX_PIXELS))
    a = tile_a[y0:y1:k, x0:x1]
    mean_a = xp.mean(a)
    out = []
    for dy, dx in STENCIL:
        by0, bx0 = y0 - sy - dy, x0 - sx - dx
        b = tile_b[by0:by0 + (y1 - y0):k, bx0:bx0 + (x1 - x0)]
        # sum((a - mean a) * b), without the temporaries (vecdot is a fused loop).
        out.append(xp.sum(xp.vecdot(a, b)) - mean_a * xp.sum(b))
        if dy == dx == 0:
            centre = b
    # Second moments, raw and about the mean, of both regions: a flat one has no peak.
    n = a.shape[0] * a.shape[1]
    for region in (a, centre):
        raw = xp.sum(xp.vecdot(region, region))
        out += [raw, raw - xp.sum(region) ** 2 / n]
    return out


def _parabola(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    den = left - 2 * centre + right
    safe = np.where(den < 0, den, -1.0)
    return np.where(den < 0, np.clip(0.5 * (left - right) / safe, -0.5, 0.5), 0.0)


def refine_shifts(pairs: np.ndarray, readings: np.ndarray, live_full: dict, binning: int
                  ) -> np.ndarray:
    """``readings`` (full-resolution shifts of ``tile b`` relative to ``tile a``, one per
    row of ``pairs``) measured again on the tiles' detail in ``live_full``. A reading
    whose overlap is too small, whose sums are flat, or that does not settle within
    :func:`max_steps` steps keeps its coarse value (NaN stays NaN)."""
    out = readings.copy()
    centre = np.round(np.nan_to_num(readings)).astype(np.int64)
    active = [j for j in range(len(pairs)) if np.isfinite(readings[j]).all()]
    for _ in range(max_steps(binning)):
        jobs, sums = [], []
        for j in active:
            a, b = (int(t) for t in pairs[j])
            s = stencil_sums(live_full[a], live_full[b], (int(centre[j, 0]), int(centre[j, 1])))
            if s is not None:
                jobs.append(j)
                sums.extend(s)
        if not jobs:
            break
        xp = array_namespace(sums[0])
        values = to_host(xp.stack(sums)).astype(np.float64).reshape(len(jobs), SUMS)
        active = []
        for j, row in zip(jobs, values, strict=True):
            v, (raw_a, var_a, raw_b, var_b) = row[:len(STENCIL)], row[len(STENCIL):]
            if var_a <= FLAT * raw_a or var_b <= FLAT * raw_b or v[0] <= 0:
                continue  # flat, or no positive match here: keep the coarse reading
            best = int(np.argmax(v))
            if best == 0:
                sub = np.array([_parabola(v[1], v[0], v[2]), _parabola(v[3], v[0], v[4])])
                fine = centre[j] + sub
                # A refinement that wanders from the coarse reading found another peak.
                if np.abs(fine - readings[j]).max() <= binning:
                    out[j] = fine
            else:  # climb towards the highest neighbour
                centre[j] += STENCIL[best]
                active.append(j)
    return out


def refine_readings(pairs: np.ndarray, shift: np.ndarray, candidates: np.ndarray,
                    live_full: dict, binning: int) -> tuple[np.ndarray, np.ndarray]:
    """Refine each pair's highest peak (``shift``, ``(m, 2)``) and its
    :data:`REFINE_PER_PAIR` best-scored candidates that could be used (``candidates``,
    ``(m, k, 3)``: shift and score); the others keep their coarse values. Full-resolution
    pixels in and out. Readings within a pixel of one another are refined once."""
    shift, candidates = shift.copy(), candidates.copy()
    jobs: list[tuple[int, int]] = []  # (pair, candidate), candidate -1 being `shift`
    twins: list[tuple[int, int, int]] = []  # (pair, candidate, job it repeats)
    readings: list[np.ndarray] = []
    for k in range(len(pairs)):
        score = np.where(np.isfinite(candidates[k, :, 2]), candidates[k, :, 2], -np.inf)
        wanted = [int(c) for c in np.argsort(-score, kind="stable")[:REFINE_PER_PAIR]
                  if score[c] >= REFINE_MIN_SCORE]
        if np.isfinite(shift[k]).all():
            wanted.append(-1)
        mine: list[int] = []
        for c in wanted:
            reading = shift[k] if c < 0 else candidates[k, c, :2]
            twin = next((j for j in mine if np.abs(readings[j] - reading).max() < 1.0), None)
            if twin is None:
                mine.append(len(jobs))
                jobs.append((k, c))
                readings.append(np.asarray(reading, dtype=np.float64))
            else:
                twins.append((k, c, twin))
    if not jobs:
        return shift, candidates
    fine = refine_shifts(np.array([pairs[k] for k, _ in jobs]), np.array(readings),
                         live_full, binning)
    for (k, c), j in [(job, j) for j, job in enumerate(jobs)] + [((k, c), j)
                                                                for k, c, j in twins]:
        if c < 0:
            shift[k] = fine[j]
        else:
            candidates[k, c, :2] = fine[j]
    return shift, candidates

