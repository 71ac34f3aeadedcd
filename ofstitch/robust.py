r"""Robust placement: significant, located readings, a guarded stage model, loops, a report.

Maths
-----
Each pair :math:`k = (a, b)` gives a reading :math:`d_k` of the shift of tile :math:`b`
relative to tile :math:`a`, with a 2x2 inverse covariance :math:`W_k` (from the shape of
its candidates, :func:`ofstitch.significance.reading_uncertainty`), and the stage model
predicts :math:`e_k = s_k T` (stage shift :math:`s_k`, affine :math:`T`) with the stage's
repeatability :math:`\sigma`. Positions :math:`x` minimise

.. math:: \sum_{k\ \mathrm{used}} (x_b - x_a - d_k)^\top W_k (x_b - x_a - d_k)
          + \sum_k \lambda \frac{\sigma_0^2}{\sigma^2} \lVert x_b - x_a - e_k \rVert^2

(:func:`solve_weighted`, :math:`\sigma_0` the sigma of a located reading, :math:`\lambda`
:data:`STAGE_LINK_FACTOR`): a located
reading holds its tiles, a straight edge holds them across the edge only, and the stage
holds whatever no reading does. The promises, in order:

1. *Never worse than the stage.* Readings are only taken within a gate of the stage
   model, whose repeatability is bounded by the tile size; the affine :math:`T` is fitted
   only on enough located pairs along both axes and only when it stays near the stage's
   own matrix; and a result that disagrees with the stage far beyond its repeatability
   drops its suspect pairs and falls back towards the stage, with a warning.
2. *The same positions whatever the file order*: nothing depends on the tile numbering
   (the chance-level pairs are chosen by stage position, :func:`ofstitch.graph.null_pairs`).
3. *Each reading weighted by its own uncertainty* (above).
4. *A report* (:class:`ofstitch.place.PlacementReport`), with a warning when doubtful.
"""

from __future__ import annotations

import logging

import numpy as np

from .backlash import fit_backlash, pair_offset
from .local_search import LocalReadings
from .place import (
    RESEARCHED,
    STAGE_ONLY,
    TRUSTED,
    Placement,
    PlacementReport,
    fit_affine,
    stage_placement,
)
from .significance import (
    LOCATED_SIGMA_PX,
    RIVAL_MIN_DISTANCE_PX,
    area_scaled,
    chance_threshold,
    overlap_area,
    scale_candidates,
    uncertainty_of,
)

log = logging.getLogger(__name__)

NULL_FPR = 0.01  # chance passes the threshold with this probability per pair
MIN_SCORE = 0.2  # ... and never below this overlap NCC
PRIOR_RADIUS_FRACTION = 0.2  # first search window around the stage: this fraction of the tile
MAX_SIGMA_FRACTION = 0.12  # the stage's repeatability is believed up to this fraction of a tile
MAX_GATE_FRACTION = 0.4  # ... and a reading at most this fraction of a tile from the stage
RESEARCH_SIGMAS = 3.0  # the constrained search: this many stage sigmas from the prediction
GATE_SIGMAS = 5.0  # a reading further than this from the stage model is a repeat
MIN_RESEARCH_RADIUS_PX = 4.0
MIN_GATE_RADIUS_PX = 12.0
MIN_SIGMA_PX = 1.0
# Stage links weigh this fraction of their inverse variance: the stage's pair errors are not
# independent (each tile's error is shared by its pairs), and the links are there to place
# what no reading locates, not to pull on what readings hold.
STAGE_LINK_FACTOR = 0.01
LOOP_TOLERANCE_PX = 1.0  # a used pair disagreeing more with its loops is pruned...
LOOP_SIGMAS = 4.0  # ... when it is also this many robust sigmas out
MAX_PRUNE_ROUNDS = 200
LOOP_GROUP_RATIO = 0.6
PRUNE_FRACTION = 0.5
# The affine is fitted only with this many located pairs along each axis ...
MIN_AFFINE_PAIRS = 4
# ... and kept only when no element strays further than this from the stage's own matrix.
AFFINE_TOLERANCE = 0.1
# ... and only when it shrinks the residual variance by this many times its 4 parameters'
# share of the pairs (a model selection test: a fit on noisy pairs always "explains" some).
AFFINE_GAIN = 3.0
# Never worse than the stage: a tile further than this many stage sigmas (at least
# GUARD_MIN_PX) from the stage model, after the best overall translation, is suspect ...
GUARD_SIGMAS = 6.0
GUARD_MIN_PX = 20.0
MAX_GUARD_ROUNDS = 30  # pairs the guard drops one by one before it falls back to the stage
# ... and the mosaic's extent must stay within this ratio of the stage layout's.
GUARD_EXTENT_RATIO = 1.2
# Doubtful: more than this fraction of the tiles placed by stage only.
DOUBT_STAGE_ONLY_FRACTION = 0.25


def null_threshold(null_score: np.ndarray, fpr: float = NULL_FPR) -> float:
    """The score a pair must beat: what chance-level pairs exceed with probability ``fpr``
    (:func:`ofstitch.significance.chance_threshold`), never below :data:`MIN_SCORE`."""
    return chance_threshold(np.asarray(null_score, dtype=np.float64), fpr, MIN_SCORE)


def _best_candidate(candidates: np.ndarray, allowed: np.ndarray | None = None,
                    raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shift ``(m, 2)`` and score ``(m,)`` of each pair's best-scoring candidate; with ``raw``
    (unscaled), the shift of the best NCC of the same peak (scaling favours larger overlaps)."""
    score = np.where(np.isfinite(candidates[..., 2]), candidates[..., 2], -np.inf)
    if allowed is not None:
        score = np.where(allowed, score, -np.inf)
    k = np.argmax(score, axis=1)
    rows = np.arange(len(candidates))
    best = score[rows, k]
    shift = np.where(np.isfinite(best)[:, None], candidates[rows, k, :2], np.nan)
    if raw is not None:
        same = _near(candidates, np.nan_to_num(shift), RIVAL_MIN_DISTANCE_PX) & (score > -np.inf)
        k = np.argmax(np.where(same, np.nan_to_num(raw[..., 2], nan=-np.inf), -np.inf), axis=1)
        shift = np.where(np.isfinite(best)[:, None], candidates[rows, k, :2], np.nan)
    return shift, np.where(np.isfinite(best), best, np.nan)


def _near(candidates: np.ndarray, around: np.ndarray, radius: float) -> np.ndarray:
    """``(m, K)``: candidates within ``radius`` of ``around`` ``(m, 2)``."""
    d = np.linalg.norm(np.nan_to_num(candidates[..., :2] - around[:, None, :], nan=np.inf),
                       axis=2)
    return d <= radius


def _chance_scores(null_candidates: np.ndarray, allowed: np.ndarray | None = None,
                   raw: np.ndarray | None = None) -> np.ndarray:
    """The best score of each chance-level pair within ``allowed`` (NaN: none), leaving out
    readings whose rivals lie along a line: an edge that both tiles share matches all
    along it, and the camera's fixed pattern matches itself along a row or column. Such
    readings are judged by their rivals (never located), not against chance."""
    shift, best = _best_candidate(null_candidates, allowed, raw)
    if allowed is None:
        allowed = np.ones(null_candidates.shape[:2], bool)
    _, _, _, line = uncertainty_of(null_candidates if raw is None else raw, shift, MIN_SCORE,
                                 allowed)
    return np.where(line, np.nan, best)


def _window_threshold(null_candidates: np.ndarray, around: np.ndarray, radius: float,
                      fpr: float, overall: float, raw: np.ndarray | None = None) -> float:
    """The chance level of a search within ``radius`` of the prediction, from the
    chance-level pairs' best within the same window; never above ``overall`` (a search
    over fewer shifts cannot find more by chance)."""
    if len(null_candidates) == 0:
        return min(MIN_SCORE, overall)
    best = _chance_scores(null_candidates, _near(null_candidates, around, radius), raw)
    return min(null_threshold(best, fpr), overall)


def _spread(stage_shift: np.ndarray) -> tuple[int, int]:
    """Pairs mostly along rows and mostly along columns."""
    vertical = np.abs(stage_shift[:, 0]) > np.abs(stage_shift[:, 1])
    return int(vertical.sum()), int((~vertical).sum())


def fit_stage_model(stage_shift: np.ndarray, shift: np.ndarray, rounds: int = 4,
                    min_pairs: int = 3) -> tuple[np.ndarray, float]:
    """Robust affine ``T`` (``stage_shift @ T ≈ shift``) and the stage's repeatability.

    Iteratively refitted on the pairs within 3 robust sigmas of the last fit, so a few
    wrong correlations do not tilt it. The repeatability ``sigma`` is 1.4826 times the
    median absolute residual (per axis, the larger of the two), in pixels. The identity,
    and the spread around it, when fewer than ``min_pairs`` pairs lie along each axis.
    """
    if len(shift) == 0:
        return np.eye(2), float("inf")
    keep = np.ones(len(shift), bool)
    affine = np.eye(2)
    for _ in range(rounds):
        if min(_spread(stage_shift[keep])) < min_pairs:
            break
        fitted = np.asarray(fit_affine(stage_shift[keep], shift[keep]))
        if not (np.all(np.isfinite(fitted)) and abs(np.linalg.det(fitted)) > 1e-6):
            break
        affine = fitted
        residual = shift - stage_shift @ affine
        sigma = _robust_sigma(residual[keep])
        keep = np.all(np.abs(residual) <= 3 * sigma + 0.5, axis=1)
    residual = shift - stage_shift @ affine
    return affine, _robust_sigma(residual[keep] if keep.any() else residual)


def _robust_sigma(residual: np.ndarray) -> float:
    """1.4826 times the median absolute residual (the larger axis). Measured from zero, not
    the median: a pair read the other way round has the opposite residual, and the answer
    must not depend on which way round the files made it."""
    if len(residual) == 0:
        return float("inf")
    return float(1.4826 * np.max(np.median(np.abs(residual), axis=0)))


def solve_weighted(pairs: np.ndarray, target: np.ndarray, weight: np.ndarray, n: int,
                   anchor: np.ndarray) -> np.ndarray:
    """Positions ``(n, 2)`` minimising ``sum_k r_k^T W_k r_k``, ``r_k = x_b - x_a - d_k``.

    ``weight`` is ``(m, 2, 2)`` (symmetric, non-negative). The gauge (a common
    translation) is fixed by a vanishing pull of every tile towards ``anchor`` ``(n, 2)``.
    A sparse ``2n x 2n`` solve (SciPy), host side.
    """
    import scipy.sparse
    import scipy.sparse.linalg

    a, b = pairs[:, 0], pairs[:, 1]
    rows, cols, vals = [], [], []
    for i in range(2):
        for j in range(2):
            w = weight[:, i, j]
            for p, q, sign in ((a, a, 1.0), (b, b, 1.0), (a, b, -1.0), (b, a, -1.0)):
                rows.append(2 * p + i)
                cols.append(2 * q + j)
                vals.append(sign * w)
    eps = 1e-9 * max(float(np.abs(weight).max(initial=0.0)), 1.0)
    rows.append(np.arange(2 * n))
    cols.append(np.arange(2 * n))
    vals.append(np.full(2 * n, eps))
    lap = scipy.sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                          np.concatenate(cols))),
                                  shape=(2 * n, 2 * n))
    wd = np.einsum("kij,kj->ki", weight, target)
    rhs = eps * anchor.reshape(-1).astype(np.float64)
    np.add.at(rhs, 2 * b, wd[:, 0])
    np.add.at(rhs, 2 * b + 1, wd[:, 1])
    np.add.at(rhs, 2 * a, -wd[:, 0])
    np.add.at(rhs, 2 * a + 1, -wd[:, 1])
    return np.asarray(scipy.sparse.linalg.spsolve(lap, rhs)).reshape(n, 2)


def _tile_information(n: int, pairs: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``(n, 2)`` eigenvalues (ascending) of the summed reading weights at each tile."""
    info = np.zeros((n, 2, 2))
    np.add.at(info, pairs[:, 0], weight)
    np.add.at(info, pairs[:, 1], weight)
    return np.linalg.eigvalsh(info)


def place_robust(pairs: np.ndarray, candidates: np.ndarray, stage_px: np.ndarray,
                 csm: np.ndarray, *, null_candidates: np.ndarray | None = None,
                 null_stage_shift: np.ndarray | None = None, fpr: float = NULL_FPR,
                 search_radius: float | None = None,
                 tile_shape: tuple[int, int] | None = None,
                 local: LocalReadings | None = None,
                 local_chance: LocalReadings | None = None,
                 travel: np.ndarray | None = None) -> Placement:
    """Place every tile from significant, located readings, never worse than the stage.

    0. **One scale.** Scores of overlaps smaller than the scan's median predicted one are
       marked down to their evidence at that size (:func:`~ofstitch.significance.area_scaled`),
       for real and chance-level pairs and the local search; rivals are judged on the NCCs.
    1. **Significance.** Each pair's best candidate overall, and its best within a first
       window around the stage prediction (:data:`PRIOR_RADIUS_FRACTION` of the tile, or
       ``search_radius``), must beat the chance level of the same search on the
       chance-level pairs (:func:`ofstitch.significance.chance_threshold`).
    2. **Stage model.** A robust affine from stage to image shifts, fitted on those pairs
       only when enough lie along both axes and kept only near the stage's own matrix
       (:data:`AFFINE_TOLERANCE`); the stage's repeatability ``sigma`` (bounded by
       :data:`MAX_SIGMA_FRACTION` of the tile).
    3. **Readings.** Each pair's best candidate within the gate (``GATE_SIGMAS`` sigma)
       of the model, if it beats the chance level of that window; else, the constrained
       search: its best within ``RESEARCH_SIGMAS`` sigma, against that window's chance
       level. Rivals (candidates scoring about as well elsewhere in the window) give the
       reading's covariance; a reading with rivals all around is not used. With
       ``local``, a located full-resolution reading above its own chance level replaces
       the pair's (:mod:`ofstitch.local_search`).
    4. **Loops.** Weighted least squares with stage links on every pair
       (:func:`solve_weighted`); a used pair that disagrees with its loops is dropped,
       worst first (a bridge has no loop and is kept).
    5. **Guard.** A tile far from the stage model beyond its repeatability, or a mosaic
       whose extent differs from the stage layout's, drops its suspect pairs; if that
       does not help, the tiles are placed by the stage model.

    Parameters
    ----------
    pairs : ndarray, shape (m, 2), int
    candidates : ndarray, shape (m, K, 3)
        ``(dy, dx, score)`` of each candidate peak (NaN rows: none).
    stage_px : ndarray, shape (n, 2)
    csm : ndarray, shape (2, 2)
    null_candidates : ndarray, shape (q, K, 3), optional
        Candidates of the chance-level pairs (tiles that do not overlap).
    null_stage_shift : ndarray, shape (q, 2), optional
        The stage shift each chance-level pair was searched around.
    search_radius : float, optional
        The user's bound on the stage error (``--corr-mask-radius``): candidates further
        than this from the stage shift are ignored, it is the search window, and the best
        reading within it is taken as located (its repeats are not rivals): for periodic
        samples.
    tile_shape : (int, int), optional
        Bounds the stage error believed (see above); without it, the pairs' stage shifts
        stand in for the tile size.
    local : LocalReadings, optional
        The constrained full-resolution search (:mod:`ofstitch.local_search`) of pairs
        a first placement did not locate: a located reading there that beats the chance
        level of the same search (``local_chance``, the chance-level pairs searched the same way)
        replaces the pair's own.
    travel : ndarray, shape (n, 2), int, optional
        Each tile's direction of travel along stage x and y, from the capture order
        (:func:`ofstitch.backlash.travel_directions`): the stage model gets a backlash
        term when the located pairs show one clearly. ``None``: capture order unknown.
    """
    n, m = len(stage_px), len(pairs)
    if n == 1 or m == 0:
        return stage_placement(stage_px, csm, m)
    stage_shift = stage_px[pairs[:, 1]] - stage_px[pairs[:, 0]]
    if null_candidates is None or len(null_candidates) == 0:
        null_candidates = np.full((0,) + candidates.shape[1:], np.nan)
        null_stage_shift = np.zeros((0, 2))
    if search_radius is not None:
        candidates = np.where(_near(candidates, stage_shift, search_radius)[..., None],
                              candidates, np.nan)
        null_candidates = np.where(
            _near(null_candidates, null_stage_shift, search_radius)[..., None],
            null_candidates, np.nan)
    size = float(min(tile_shape)) if tile_shape is not None else \
        float(np.median(np.max(np.abs(stage_shift), axis=1))) / 0.7
    ref_area, raw, raw_null = None, candidates, null_candidates
    if tile_shape is not None:  # 0. Scores of every overlap size on one scale.
        areas = overlap_area(stage_shift, tile_shape)
        ref_area = float(np.median(areas[areas > 0])) if np.any(areas > 0) else 1.0
        candidates = scale_candidates(candidates, tile_shape, ref_area)
        null_candidates = scale_candidates(null_candidates, tile_shape, ref_area)
    window = search_radius if search_radius is not None else PRIOR_RADIUS_FRACTION * size
    max_sigma = MAX_SIGMA_FRACTION * size
    max_gate = MAX_GATE_FRACTION * size if search_radius is None else search_radius

    # 1. Significance, overall and in the first window.
    best_shift, best_score = _best_candidate(candidates, raw=raw)
    _, null_best = _best_candidate(null_candidates)
    threshold = null_threshold(_chance_scores(null_candidates, raw=raw_null), fpr)
    win_shift, win_score = _best_candidate(candidates, _near(candidates, stage_shift, window),
                                           raw)
    win_threshold = _window_threshold(null_candidates, null_stage_shift, window, fpr,
                                      threshold, raw_null)
    first = np.where((win_score > win_threshold)[:, None], win_shift, best_shift)
    seed = (win_score > win_threshold) | (best_score > threshold)

    # 2. The stage model, guarded.
    backlash = fit_backlash(travel, pairs, stage_shift, first, seed, max_gate)
    affine, sigma, affine_fitted, doubts = _stage_model(
        stage_shift, first - pair_offset(backlash, pairs), seed, max_sigma)
    predicted = stage_shift @ affine + pair_offset(backlash, pairs)

    # 3. Readings within the gate; the constrained search within a smaller window.
    gate = float(np.clip(GATE_SIGMAS * sigma, MIN_GATE_RADIUS_PX, max(max_gate,
                                                                      MIN_GATE_RADIUS_PX)))
    radius = float(np.clip(RESEARCH_SIGMAS * sigma, MIN_RESEARCH_RADIUS_PX, gate))
    null_predicted = null_stage_shift @ affine
    in_gate = _near(candidates, predicted, gate)
    gate_shift, gate_score = _best_candidate(candidates, in_gate, raw)
    gate_threshold = _window_threshold(null_candidates, null_predicted, gate, fpr, threshold,
                                       raw_null)
    in_radius = _near(candidates, predicted, radius)
    near_shift, near_score = _best_candidate(candidates, in_radius, raw)
    near_threshold = _window_threshold(null_candidates, null_predicted, radius, fpr,
                                       gate_threshold, raw_null)
    if search_radius is not None:
        # The user bounds the stage error (periodic samples, where a repeat scores as well
        # as the overlap and chance cannot tell them apart): the best within it, as the
        # reference method does, when it scores at least MIN_SCORE.
        near_threshold = MIN_SCORE
    trusted = gate_score > gate_threshold
    log.info("chance levels: overall %.3f, window %.1f px %.3f, gate %.1f px %.3f, constrained "
             "search %.1f px %.3f; stage sigma %.2f px", threshold, window, win_threshold, gate,
             gate_threshold, radius, near_threshold, sigma)
    researched = ~trusted & (near_score > near_threshold)
    shift = np.where(trusted[:, None], gate_shift, near_shift)
    score = np.where(trusted, gate_score, np.where(researched, near_score, best_score))
    allowed = np.where(trusted[:, None], in_gate, in_radius)
    pair_threshold = np.where(trusted, gate_threshold, near_threshold)
    # Rivals: anywhere in the window the reading came from, and near the reading itself
    # (a ridge along an edge runs on past the gate; a repeat a period away does not count).
    allowed = allowed | _near(candidates, np.nan_to_num(shift), gate)
    weight, located, one_way, _ = uncertainty_of(raw, shift, pair_threshold,
                                                      allowed)
    if search_radius is not None:  # ... and its repeats within the radius are not rivals
        readable = np.isfinite(shift).all(axis=1)
        weight = np.where(readable[:, None, None], np.eye(2), 0.0)
        located, one_way = readable, np.zeros(m, bool)
    used = (trusted | researched) & (located | one_way)
    located &= used
    one_way &= used
    if local is not None:
        def on_scale(r: LocalReadings) -> np.ndarray:  # the candidates' scale (step 0)
            return r.score if ref_area is None else area_scaled(r.ncc, r.area, ref_area)
        local_score = on_scale(local)
        chance = null_threshold(np.zeros(0) if local_chance is None else on_scale(local_chance),
                                fpr)
        take = local.located & (np.nan_to_num(local_score) > chance) & \
            (np.linalg.norm(np.nan_to_num(local.shift_px - predicted, nan=np.inf), axis=1)
             <= gate)
        log.info("local search: %d of %d pairs searched located above the chance level "
                 "%.3f", int(take.sum()), int(np.isfinite(local.score).sum()), chance)
        shift = np.where(take[:, None], local.shift_px, shift)
        score = np.where(take, local_score, score)
        weight = np.where(take[:, None, None], np.eye(2), weight)
        trusted &= ~take
        researched |= take
        located |= take
        one_way &= ~take
        used |= take

    # The final stage model, from the located pairs.
    backlash2 = fit_backlash(travel, pairs, stage_shift, shift, located, max_gate)
    affine2, sigma2, fitted2, doubts2 = _stage_model(
        stage_shift, shift - pair_offset(backlash2, pairs), located, max_sigma)
    if np.isfinite(sigma2) and located.sum() >= 3:
        affine, sigma, affine_fitted, doubts = affine2, sigma2, fitted2, doubts2
        backlash = backlash2
    if backlash is not None:
        log.info("stage backlash (row, col px, + vs -): %s", backlash.offset_px.round(2))
    predicted = stage_shift @ affine + pair_offset(backlash, pairs)
    tile_offset = np.zeros((n, 2)) if backlash is None else backlash.tile_px
    anchor = stage_px @ affine + tile_offset

    # 4. Loops, with stage links everywhere; 5. the guard.
    fell_back = False
    positions, residual, whitened, used = _solve_and_prune(pairs, shift, weight, used, score,
                                                           predicted, sigma, anchor, n)
    suspect = _guard(positions, anchor, sigma, size)
    if suspect is not None:
        # Drop, one at a time, the used pair that disagrees most with the stage model (in
        # the directions its reading locates) until the guard passes; else the stage.
        disagreement = np.sqrt(np.maximum(np.einsum(
            "ki,kij,kj->k", shift - predicted, weight, np.nan_to_num(shift - predicted)), 0.0))
        for _ in range(MAX_GUARD_ROUNDS):
            if suspect is None or not used.any():
                break
            used[np.argmax(np.where(used, disagreement, -np.inf))] = False
            positions, residual, whitened, used = _solve_and_prune(
                pairs, shift, weight, used, score, predicted, sigma, anchor, n)
            suspect = _guard(positions, anchor, sigma, size)
        if suspect is not None:
            used[:] = False
            positions, residual, whitened, used = _solve_and_prune(
                pairs, shift, weight, used, score, predicted, sigma, anchor, n)
        fell_back = True
        doubts = doubts + ("the correlations disagreed with the stage far beyond its "
                           "repeatability, so the result fell back towards the stage",)
    located &= used
    one_way &= used
    status = np.where(used, np.where(trusted, TRUSTED, RESEARCHED), STAGE_ONLY)
    rms = float(np.sqrt(np.mean(whitened[used] ** 2))) if used.any() else 0.0
    target = np.where(used[:, None], shift, predicted)
    report = _report(n, pairs, weight, used, located, one_way, sigma, whitened, threshold,
                     affine_fitted, fell_back, doubts)
    return Placement(positions - positions.min(axis=0), used, float("nan"), float("nan"),
                     affine, np.linalg.inv(affine) @ csm, rms, method="robust",
                     gate_px=float(gate),
                     status=status, shift_px=target, score=score, null_score=null_best,
                     score_threshold=float(threshold), stage_sigma_px=float(sigma),
                     residual_px=residual, located=located,
                     weight=np.where(used[:, None, None], weight, 0.0), report=report,
                     stage_offset_px=tile_offset)


def _stage_model(stage_shift: np.ndarray, shift: np.ndarray, use: np.ndarray,
                 max_sigma: float) -> tuple[np.ndarray, float, bool, tuple[str, ...]]:
    """The affine (or the identity), the bounded repeatability, whether it was fitted."""
    doubts: tuple[str, ...] = ()
    along = _spread(stage_shift[use])
    affine = np.eye(2)
    fitted = False
    if min(along) >= MIN_AFFINE_PAIRS:
        candidate, _ = fit_stage_model(stage_shift[use], shift[use],
                                       min_pairs=MIN_AFFINE_PAIRS)
        # Only worth it when it explains clearly more than the stage's own matrix does
        # (four parameters from this many pairs), and only near that matrix.
        sigma_own = _robust_sigma(shift[use] - stage_shift[use])
        sigma_fit = _robust_sigma(shift[use] - stage_shift[use] @ candidate)
        better = sigma_own**2 >= (1 + AFFINE_GAIN * 4 / use.sum()) * max(sigma_fit, 1e-3)**2
        if not better:
            pass
        elif np.abs(candidate - np.eye(2)).max() <= AFFINE_TOLERANCE:
            affine, fitted = candidate, True
        else:
            doubts = ("the located pairs suggest a stage scale or rotation far from the "
                      "stage's own matrix, which was kept",)
    if use.any():
        sigma = _robust_sigma(shift[use] - stage_shift[use] @ affine)
    else:
        sigma = float("inf")
    if not np.isfinite(sigma) or sigma > max_sigma:
        sigma = max_sigma
    return affine, max(sigma, MIN_SIGMA_PX), fitted, doubts


def _solve_and_prune(pairs: np.ndarray, shift: np.ndarray, weight: np.ndarray,
                     used: np.ndarray, score: np.ndarray, predicted: np.ndarray, sigma: float,
                     anchor: np.ndarray, n: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve with stage links on every pair, pruning used pairs that break their loops.

    Returns ``(positions, residual, whitened, used)``: the Euclidean residual against each
    pair's target, and the residual in the directions its reading locates.
    """
    used = used.copy()
    w_stage = STAGE_LINK_FACTOR * (LOCATED_SIGMA_PX / sigma) ** 2
    eye = np.broadcast_to(np.eye(2), (len(pairs), 2, 2))
    both = np.concatenate([pairs, pairs])
    for _ in range(MAX_PRUNE_ROUNDS):
        w_read = np.where(used[:, None, None], weight, 0.0)
        positions = solve_weighted(both, np.concatenate([np.nan_to_num(shift), predicted]),
                                   np.concatenate([w_read, w_stage * eye]), n, anchor)
        delta = positions[pairs[:, 1]] - positions[pairs[:, 0]]
        target = np.where(used[:, None], shift, predicted)
        r = delta - target
        residual = np.linalg.norm(r, axis=1)
        whitened = np.where(used, np.sqrt(np.maximum(np.einsum("ki,kij,kj->k", r, weight, r),
                                                     0.0)), residual)
        if not used.any():
            break
        limit = max(LOOP_TOLERANCE_PX, LOOP_SIGMAS * 1.4826 * float(np.median(whitened[used])))
        worst = _loop_breakers(pairs, whitened, used & (whitened > limit), score)
        if not worst.any():
            break
        used &= ~worst
    return positions, residual, whitened, used


def _guard(positions: np.ndarray, anchor: np.ndarray, sigma: float, size: float
           ) -> np.ndarray | None:
    """Tiles that stray from the stage model far beyond its repeatability, or ``None``.

    After the best translation, a tile further than ``GUARD_SIGMAS`` sigma (at least
    :data:`GUARD_MIN_PX`) from the stage model is suspect; so is every tile when the
    mosaic's extent along an axis differs from the stage layout's by more than
    :data:`GUARD_EXTENT_RATIO` (scaled or collapsed columns), along the axes it spans by
    more than two tiles (``size``).
    """
    d = positions - anchor
    d = d - np.median(d, axis=0)
    off = np.linalg.norm(d, axis=1) > max(GUARD_SIGMAS * sigma, GUARD_MIN_PX)
    extent = np.ptp(positions, axis=0)
    expected = np.ptp(anchor, axis=0)
    wide = expected > 2 * size  # an axis the scan spans (not the width of a strip)
    ratio = np.where(wide, (extent + 1.0) / (expected + 1.0), 1.0)
    if np.any((ratio > GUARD_EXTENT_RATIO) | (ratio < 1 / GUARD_EXTENT_RATIO)):
        return np.ones(len(positions), bool)
    return off if off.any() else None


def _report(n: int, pairs: np.ndarray, weight: np.ndarray, used: np.ndarray,
            located: np.ndarray, one_way: np.ndarray, sigma: float, whitened: np.ndarray,
            threshold: float, affine_fitted: bool, fell_back: bool,
            doubts: tuple[str, ...]) -> PlacementReport:
    info = _tile_information(n, pairs, np.where(used[:, None, None], weight, 0.0))
    correlated = info[:, 0] >= 0.5
    partly = ~correlated & (info[:, 1] >= 0.5)
    stage_only = ~correlated & ~partly
    doubts = tuple(doubts)
    advice = []
    if stage_only.sum() > DOUBT_STAGE_ONLY_FRACTION * n:
        doubts += (f"{int(stage_only.sum())} of {n} tiles placed by stage only (their overlaps "
                   "score at chance level)",)
        advice.append("larger tiles or more overlap where the sample has content")
    if partly.sum() > DOUBT_STAGE_ONLY_FRACTION * n or (
            one_way.sum() and partly.sum() >= max(2, 0.1 * n)):
        doubts += (f"{int(partly.sum())} tiles located in one direction only (their overlaps "
                   "hold only a straight edge)",)
        advice.append("more overlap, so that overlaps reach texture beyond the edge")
    if doubts:
        advice.append("see stitching_correlations.png and stitching_residuals.png")
    max_loop = float(whitened[used].max()) if used.any() else 0.0
    return PlacementReport(
        n_pairs=len(pairs), n_located=int(located.sum()), n_one_way=int(one_way.sum()),
        n_tiles=n, n_tiles_correlated=int(correlated.sum()),
        n_tiles_one_way=int(partly.sum()), n_tiles_stage_only=int(stage_only.sum()),
        stage_sigma_px=float(sigma), max_loop_residual_px=max_loop, chance_level=threshold,
        affine_fitted=affine_fitted, fell_back=fell_back, doubts=doubts,
        advice=", or ".join(advice))


def _loop_breakers(pairs: np.ndarray, residual: np.ndarray, conflict: np.ndarray,
                   score: np.ndarray) -> np.ndarray:
    """The pairs to drop this round, one per group of pairs that share a broken loop.

    Least squares spreads a wrong pair's error over its loop: on a lone loop every
    pair ends with the same residual, so the residual alone cannot say which pair is
    wrong. Pairs in conflict that touch each other with residuals within a factor
    :data:`LOOP_GROUP_RATIO` of the largest are one group, taken largest first; the
    group drops its weakest pair: the lowest score (the overlap matches least well).
    Only groups led by a residual within :data:`PRUNE_FRACTION` of the largest drop a
    pair in a round: the smaller conflicts are often the larger ones' error spread over
    neighbouring loops, and disappear once the culprit is gone.
    """
    out = np.zeros(len(pairs), bool)
    idx = np.flatnonzero(conflict)
    if len(idx) == 0:
        return out
    by_tile: dict[int, list[int]] = {}
    for k in idx.tolist():
        for t in pairs[k].tolist():
            by_tile.setdefault(t, []).append(k)
    done: set[int] = set()
    order = idx[np.lexsort((-score[idx], -residual[idx]))].tolist()
    lead = PRUNE_FRACTION * residual[order[0]]
    for k in order:
        if residual[k] < lead:
            break  # smaller conflicts may only be echoes of the larger ones
        if k in done:
            continue
        floor = LOOP_GROUP_RATIO * residual[k]
        group, todo = [], [k]
        done.add(k)
        while todo:
            j = todo.pop()
            group.append(j)
            for t in pairs[j].tolist():
                for i in by_tile[t]:
                    if i not in done and residual[i] >= floor:
                        done.add(i)
                        todo.append(i)
        out[min(group, key=lambda j: (score[j], -residual[j]))] = True
    return out
