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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_numpy_namespace

from .backends import to_host
from .peaks import _parabolic_offset

# Candidates refined per pair: the best-scored that could be used (score at least
# REFINE_MIN_SCORE, place.MIN_SCORE), and the highest peak (the threshold search's reading).
REFINE_PER_PAIR = 3
REFINE_MIN_SCORE = 0.2
# Integer shifts compared at each step: the centre, its neighbours along y and x, then the
# diagonal ones (a ridge of anisotropic texture can run diagonally: climbing along the
# axes alone stops on it a pixel short of the peak).
STENCIL = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))
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


def climb_region(shape: tuple[int, int], shift_yx: tuple[int, int], reach: int
                 ) -> tuple[int, int, int, int] | None:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of tile a that tile b covers at every
    shift within ``reach`` px (each way) of ``shift_yx``: the overlap there, less
    ``reach`` px at each side. ``None`` when that is too small."""
    h, w = shape
    sy, sx = shift_yx
    y0, y1 = max(sy, 0) + reach, h + min(sy, 0) - reach
    x0, x1 = max(sx, 0) + reach, w + min(sx, 0) - reach
    if y1 - y0 < MIN_OVERLAP_SIDE or x1 - x0 < MIN_OVERLAP_SIDE:
        return None
    return y0, y1, x0, x1


def shift_sums(tile_a: Any, tile_b: Any, region: tuple[int, int, int, int],
               shifts: list[tuple[int, int]], moments: bool = False) -> list[Any]:
    """For each of ``shifts`` (tile b relative to tile a: b's pixel ``p`` lies on a's
    ``p + shift``), the sum of products of ``region`` of tile a, less its mean, with what
    tile b puts there, as 0-d device arrays: all over the same pixels of tile a, so they
    compare. With ``moments``, then the raw and central second moments of tile a's
    region and of tile b's at ``shifts[0]`` (a flat one has no peak).

    A region of over :data:`MAX_PIXELS` pixels is summed over every k-th row (the rows
    still pair up exactly at every shift).
    """
    xp = array_namespace(tile_a, tile_b)
    y0, y1, x0, x1 = region
    k = max(1, math.ceil((y1 - y0) * (x1 - x0) / MAX_PIXELS))
    a = tile_a[y0:y1:k, x0:x1]
    # sum((a - mean a) * b): a less its mean once (one region-sized copy), then one fused
    # loop per shift (vecdot), where sum(a * b) - mean a * sum(b) took two.
    centred = a - xp.mean(a)
    out, first = [], None
    for sy, sx in shifts:
        b = tile_b[y0 - sy:y1 - sy:k, x0 - sx:x1 - sx]
        out.append(xp.sum(xp.vecdot(centred, b)))
        first = b if first is None else first
    if moments:
        n = a.shape[0] * a.shape[1]
        for part in (a, first):
            raw = xp.sum(xp.vecdot(part, part))
            out += [raw, raw - xp.sum(part) ** 2 / n]
    return out


@dataclass
class _Climb:
    """One reading's climb: its current centre, the region its sums are taken over and
    the sums so far, by shift."""

    pair: tuple[int, int]
    centre: tuple[int, int]
    region: tuple[int, int, int, int]
    sums: dict = field(default_factory=dict)

    def wanted(self) -> list[tuple[int, int]]:
        cy, cx = self.centre
        return [(cy + dy, cx + dx) for dy, dx in STENCIL if (cy + dy, cx + dx) not in self.sums]


def refine_shifts(pairs: np.ndarray, readings: np.ndarray, live_full: dict, binning: int
                  ) -> np.ndarray:
    """``readings`` (full-resolution shifts of ``tile b`` relative to ``tile a``, one per
    row of ``pairs``) measured again on the tiles' detail in ``live_full``.

    Each climb sums over one region of tile a from start to end (:func:`climb_region`),
    so each step only adds the shifts it has not summed yet. A reading whose overlap is
    too small, whose sums are flat, or that does not settle within :func:`max_steps`
    steps keeps its coarse value (NaN stays NaN). Each step of the batch comes back to
    the host in one transfer.
    """
    out = readings.copy()
    steps = max_steps(binning)
    climbs: dict[int, _Climb] = {}
    for j in range(len(pairs)):
        if not np.isfinite(readings[j]).all():
            continue
        a, b = (int(t) for t in pairs[j])
        centre = (int(round(readings[j, 0])), int(round(readings[j, 1])))
        region = climb_region(live_full[a].shape, centre, steps + 1)
        if region is not None:
            climbs[j] = _Climb((a, b), centre, region)
    for step in range(steps):
        if not climbs:
            break
        asked, sums = [], []
        for j, c in climbs.items():
            shifts = c.wanted()
            sums.extend(shift_sums(live_full[c.pair[0]], live_full[c.pair[1]], c.region,
                                   shifts, moments=step == 0))
            asked.append((j, shifts))
        xp = array_namespace(sums[0])
        values = iter(to_host(xp.stack(sums)).astype(np.float64).tolist())
        for j, shifts in asked:
            c = climbs[j]
            c.sums.update((s, next(values)) for s in shifts)
            if step == 0:
                raw_a, var_a, raw_b, var_b = (next(values) for _ in range(4))
                if var_a <= FLAT * raw_a or var_b <= FLAT * raw_b or c.sums[c.centre] <= 0:
                    del climbs[j]  # flat, or no positive match here: keep the coarse reading
                    continue
            cy, cx = c.centre
            v = [c.sums[(cy + dy, cx + dx)] for dy, dx in STENCIL]
            best = int(np.argmax(v))
            if best == 0:
                # The vertex along y (neighbours 1, 2) and x (3, 4), as the FFT peaks have.
                fine = np.array([cy, cx]) + _parabolic_offset(
                    np.array([v[1], v[3]]), np.array([v[0], v[0]]), np.array([v[2], v[4]]), np)
                # A refinement that wanders from the coarse reading found another peak.
                if np.abs(fine - readings[j]).max() <= binning:
                    out[j] = fine
                del climbs[j]
            else:  # climb towards the highest neighbour
                c.centre = (cy + STENCIL[best][0], cx + STENCIL[best][1])
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

