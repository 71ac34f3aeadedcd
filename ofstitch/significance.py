r"""Is a pair's reading real, and how well does it locate the tiles? (host side)

Two questions about each pair's candidate peaks (``(dy, dx, score)``, the score being
the normalised cross-correlation (NCC) of the two tiles' overlap at that shift, see
:mod:`ofstitch.stream`):

**Significance.** A pair's best score must be unlikely by chance. What chance looks like
is learnt from the *chance-level pairs*: tiles of the same scan that do not overlap,
searched exactly as a real pair is. Their best scores are maxima over many shifts, so in
Fisher's :math:`z = \operatorname{artanh}(r)` (the NCC of :math:`N` independent pixels has
:math:`z \sim \mathcal N(0, 1/(N - 3))`) their distribution is close to a Gumbel law
(the maximum of many Gaussians). :func:`chance_threshold` fits it from the median and the
interquartile range, which are stable with a handful of samples (the empirical 99th
percentile of six scores is their maximum, and jumps with which tiles happen to be
chosen), and returns the score that chance exceeds with probability ``fpr``. The
overlap's effective number of independent pixels enters through the fitted scale, so
the model needs no knowledge of the texture's correlation length. The same law, fitted
on the chance-level pairs' best scores within a smaller window, gives the threshold for a
search restricted to that window (fewer shifts, so a lower threshold).

**Localisation.** A straight edge (the border of a tissue section against blank slide)
matches at every shift along the edge: its reading is right across the edge and
arbitrary along it. Such an overlap yields several candidates along a line, all
scoring about as well as the best (*rivals*). :func:`reading_uncertainty` turns the
rivals into a 2x2 covariance: none, the reading is *located* (isotropic, sigma
:data:`LOCATED_SIGMA_PX`); rivals along one line, it is located across that line only
(the variance along it is :data:`UNLOCATED_SIGMA_PX` squared); rivals in every
direction, it is not located at all. A line of rivals through zero shift is the camera's
own fixed pattern (shading, sensor rows) matching itself: not a reading either.

References: R. A. Fisher (1915), *Biometrika* 10, 507, doi:10.2307/2331838 (the z
transform); E. J. Gumbel (1958), *Statistics of Extremes*.
"""

from __future__ import annotations

import math

import numpy as np

# Gumbel quantiles: F(x) = exp(-exp(-(x - mu) / beta)).
_GUMBEL_MEDIAN = -math.log(math.log(2.0))  # 0.3665
_GUMBEL_IQR = -math.log(-math.log(0.75)) + math.log(-math.log(0.25))  # 1.5725
MIN_CHANCE_SAMPLES = 3  # fewer chance-level pairs: only the floor applies
MIN_Z_SCALE = 0.02  # a fitted Gumbel scale (in z) is never below this
LOCATED_SIGMA_PX = 0.5  # sigma of a located reading
UNLOCATED_SIGMA_PX = 1e3  # sigma along a direction the reading does not locate
# A rival scores within this much of the best in Fisher z, or within RIVAL_R in NCC (z
# magnifies differences near 1): NCCs that close cannot be told apart. A ridge along an
# edge, or a fixed pattern along a row, drops by less than 0.1 in z; the shoulder of even a
# broad, elongated peak by 0.25 or more.
RIVAL_Z = 0.2
RIVAL_R = 0.015
RIVAL_MIN_DISTANCE_PX = 2.5  # nearer candidates are the same peak
# Rivals spanning less than this (with the reading) are the top of one broad peak, not a
# ridge: the reading is located. Candidates are at least 5 px apart, so a ridge of three
# candidates spans about 10 px.
MIN_RIDGE_SPAN_PX = 8.0
LINE_RATIO = 0.12  # rivals whose spread across their main direction is below this: a line
# A line of rivals along the row (or column) through zero shift, within this many pixels, is
# the camera's fixed pattern (shading, sensor rows) matching itself, not the sample.
FIXED_PATTERN_PX = 1.5


def fisher_z(score: np.ndarray) -> np.ndarray:
    """``artanh`` of an NCC, clipped to (-1, 1)."""
    return np.arctanh(np.clip(score, -0.9999, 0.9999))


def overlap_area(shift_px: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Pixels two tiles of ``tile_shape`` share at ``shift_px`` ``(..., 2)`` (NaN: 0)."""
    h, w = tile_shape
    d = np.abs(np.nan_to_num(shift_px, nan=np.inf))
    return np.maximum(h - d[..., 0], 0.0) * np.maximum(w - d[..., 1], 0.0)


def area_scaled(score: np.ndarray, area: np.ndarray, ref_area: float) -> np.ndarray:
    r"""The NCC that the same evidence would give over ``ref_area`` pixels.

    By chance, an overlap of :math:`N` pixels scores :math:`z = \operatorname{artanh}(r)`
    with a spread of :math:`1/\sqrt{N}` (times the texture's correlation length, the same
    for every overlap of a scan), so :math:`z \sqrt{N / N_0}` spreads as an overlap of
    :math:`N_0` pixels does: scores of overlaps of every size are compared with one chance
    level. A few pixels of a diagonal neighbour's corner match well by chance; this says
    how little that is worth. Overlaps larger than ``ref_area`` keep their NCC (the factor
    is capped at 1): larger overlaps are not credited beyond the typical one, so scans of
    even overlaps score as before. NaN stays NaN.
    """
    score = np.asarray(score, dtype=np.float64)
    factor = np.sqrt(np.clip(np.asarray(area, dtype=np.float64) / max(ref_area, 1.0), 0.0, 1.0))
    finite = np.isfinite(score)
    return np.where(finite, np.tanh(fisher_z(np.where(finite, score, 0.0)) * factor), np.nan)


def scale_candidates(candidates: np.ndarray, tile_shape: tuple[int, int], ref_area: float
                     ) -> np.ndarray:
    """``(..., K, 3)`` candidates with each score :func:`area_scaled` by its overlap."""
    out = np.array(candidates, dtype=np.float64, copy=True)
    out[..., 2] = area_scaled(out[..., 2], overlap_area(out[..., :2], tile_shape), ref_area)
    return out


def chance_threshold(chance_scores: np.ndarray, fpr: float, floor: float) -> float:
    """The score chance exceeds with probability ``fpr``, from a Gumbel law in Fisher z.

    Parameters
    ----------
    chance_scores : ndarray, shape (q,)
        Best score of each chance-level pair (NaN: none), searched as the real pairs.
    fpr : float
        The accepted probability that a pair with no overlap passes.
    floor : float
        The threshold is never below this.

    Returns
    -------
    float
        ``tanh(mu + beta * (-ln(-ln(1 - fpr))))`` with the Gumbel location ``mu`` and scale
        ``beta`` fitted from the median and interquartile range of ``artanh(score)``;
        ``floor`` with fewer than :data:`MIN_CHANCE_SAMPLES` scores.
    """
    finite = chance_scores[np.isfinite(chance_scores)]
    if len(finite) < MIN_CHANCE_SAMPLES:
        return floor
    z = fisher_z(finite)
    q25, q50, q75 = np.quantile(z, [0.25, 0.5, 0.75])
    beta = max(float(q75 - q25) / _GUMBEL_IQR, MIN_Z_SCALE)
    mu = float(q50) - beta * _GUMBEL_MEDIAN
    z_thr = mu - beta * math.log(-math.log(1.0 - fpr))
    return max(floor, float(np.tanh(z_thr)))


def reading_uncertainty(candidates: np.ndarray, chosen: np.ndarray, best: np.ndarray,
                        threshold: np.ndarray | float, allowed: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weight matrix (inverse covariance) of each pair's reading, from its rivals.

    Parameters
    ----------
    candidates : ndarray, shape (m, K, 3)
        ``(dy, dx, score)``; NaN rows: none.
    chosen : ndarray, shape (m, 2)
        The reading of each pair (NaN: none).
    best : ndarray, shape (m,)
        Its score.
    threshold : float or ndarray, shape (m,)
        The score a reading must beat (kept for the record; rivals are judged in Fisher z).
    allowed : ndarray, shape (m, K), bool
        Candidates that could have been chosen (within the stage window).

    Returns
    -------
    weight : ndarray, shape (m, 2, 2)
        ``inv(covariance)`` in units of ``1 / LOCATED_SIGMA_PX**2`` (a located reading has
        the identity); zeros where the pair is not located at all.
    located : ndarray, shape (m,), bool
        Localised in both directions (no rival).
    one_way : ndarray, shape (m,), bool
        Localised across a line only (rivals along one line: an edge).
    line : ndarray, shape (m,), bool
        Rivals along one line, whether an edge (``one_way``) or the camera's fixed pattern.
    """
    m = len(candidates)
    weight = np.zeros((m, 2, 2))
    located = np.zeros(m, bool)
    one_way = np.zeros(m, bool)
    line = np.zeros(m, bool)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (m,))
    score = np.where(allowed & np.isfinite(candidates[..., 2]), candidates[..., 2], -np.inf)
    offset = candidates[..., :2] - chosen[:, None, :]
    dist = np.linalg.norm(np.nan_to_num(offset, nan=np.inf), axis=2)
    z_score = np.where(np.isfinite(score), fisher_z(np.where(np.isfinite(score), score, 0.0)),
                       -np.inf)
    close = (z_score >= fisher_z(np.nan_to_num(best))[:, None] - RIVAL_Z) | \
        (score >= np.nan_to_num(best)[:, None] - RIVAL_R)
    rival = close & (dist > RIVAL_MIN_DISTANCE_PX)
    ratio = (LOCATED_SIGMA_PX / UNLOCATED_SIGMA_PX) ** 2
    for k in range(m):
        if not np.isfinite(best[k]) or not np.isfinite(chosen[k]).all():
            continue
        if not rival[k].any():
            weight[k] = np.eye(2)
            located[k] = True
            continue
        v = np.concatenate([offset[k, rival[k]], np.zeros((1, 2))])
        span = np.linalg.norm(v[:, None, :] - v[None, :, :], axis=2).max()
        v = v - v.mean(axis=0)
        evals, evecs = np.linalg.eigh(v.T @ v)  # ascending
        along, across = evecs[:, 1], evecs[:, 0]
        if evals[1] > 0 and evals[0] <= LINE_RATIO**2 * evals[1]:
            line[k] = True
            points = np.concatenate([candidates[k, rival[k], :2], chosen[k][None, :]])
            if np.any(np.all(np.abs(points) < FIXED_PATTERN_PX, axis=0)):
                continue  # a row or column through zero shift: a fixed pattern
        if span < MIN_RIDGE_SPAN_PX:
            weight[k] = np.eye(2)  # the top of one broad peak
            located[k] = True
            line[k] = False
            continue
        if not line[k]:
            continue  # rivals in every direction: not located
        weight[k] = np.outer(across, across) + ratio * np.outer(along, along)
        one_way[k] = True
    return weight, located, one_way, line


def score_at(candidates: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``(m,)``: the score of each pair's candidate at ``shift`` ``(m, 2)`` (NaN: none)."""
    d = np.linalg.norm(np.nan_to_num(candidates[..., :2] - shift[:, None, :], nan=np.inf),
                       axis=2)
    k = np.argmin(d, axis=1)
    rows = np.arange(len(candidates))
    return np.where(d[rows, k] < 1e-9, candidates[rows, k, 2], np.nan)


def uncertainty_of(raw: np.ndarray, shift: np.ndarray, threshold: np.ndarray | float,
                   allowed: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`reading_uncertainty` of readings chosen by their area-scaled scores
    (:func:`scale_candidates`), judged on the unscaled candidates ``raw``: the shape of the
    NCC around the overlap (a ridge along an edge) is about the pixels, not significance."""
    return reading_uncertainty(raw, shift, score_at(raw, shift), threshold, allowed)
