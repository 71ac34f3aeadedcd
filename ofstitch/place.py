r"""Placement: decide which pair correlations to trust, then solve tile positions.

Maths
-----
Each pair :math:`k = (a, b)` gives a measured shift :math:`d_k` of tile
:math:`b` relative to tile :math:`a`. Positions :math:`x` minimise the weighted
least squares

.. math:: \sum_k w_k \,\lVert x_b - x_a - d_k \rVert^2

(:func:`solve_positions`; a zero-mean gauge). Pairs whose correlation is
trusted use the correlation shift with :math:`w_k = 1`. The others use the
stage-predicted shift, corrected by the affine map :math:`T` fitted from stage
to image shifts on the trusted pairs (:func:`fit_affine`), with a low weight
(:func:`stage_weight`, from the stage's measured repeatability), so that every
tile stays placed but the stage never pulls a tile its correlations hold.

Which pairs are trusted is decided by two thresholds, a minimum peak quality
and a maximum discrepancy between the correlation and stage shifts. With
``thresholding="automatic"`` a grid of threshold pairs is searched for the
smallest fit error :func:`fit_error`: the RMS residual (with the degrees of
freedom of the positions removed) plus a penalty of twice the median
discrepancy times the fraction of pairs that fell back to the stage, as
OpenFlexure Stitching does.

The kernels (:func:`fit_affine`, :func:`solve_positions`, :func:`fit_error`)
take arrays of any array-API namespace; the sparse solve sits behind
:func:`ofstitch.backends.solve_laplacian`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .backends import solve_laplacian
from .errors import OfstitchError, OfstitchWarning
from .settings import PLACEMENT_METHODS

log = logging.getLogger(__name__)

STAGE_WEIGHT = 0.2**2  # at most, a stage-only pair counts as 0.2 of a correlation, squared
MIN_STAGE_WEIGHT = 1e-4
CORRELATION_SIGMA_PX = 0.5  # typical error of a trusted correlation shift
MAX_LEVELS = 24  # threshold values tried per axis in the automatic search
ONE_D_TOLERANCE_PX = 30.0

# Robust placement (the default).
STAGE_ONLY, TRUSTED, RESEARCHED = 0, 1, 2
NULL_FPR = 0.01  # accept a pair whose score beats this fraction of chance (null) scores
MIN_SCORE = 0.2  # ... and never below this overlap NCC
ISLAND_STAGE_WEIGHT = 1e-6  # stage links only place islands, never bend them
RESEARCH_SIGMAS = 3.0  # re-search rejected pairs this many stage sigmas from the prediction
GATE_SIGMAS = 5.0  # a trusted peak further than this from the stage model is a repeat
MIN_RESEARCH_RADIUS_PX = 4.0
MIN_GATE_RADIUS_PX = 12.0
LOOP_TOLERANCE_PX = 1.0  # a trusted pair disagreeing more with its loops is pruned...
LOOP_SIGMAS = 4.0  # ... when it is also this many robust sigmas out
MAX_PRUNE_ROUNDS = 200
LOOP_GROUP_RATIO = 0.6
# One wrong pair bends every loop near it: a round only prunes the groups whose largest
# residual is at least this fraction of the round's largest, then solves again.
PRUNE_FRACTION = 0.5


@dataclass(frozen=True)
class Placement:
    """The result of placement.

    Attributes
    ----------
    positions_px : ndarray, shape (n, 2)
        ``(row, col)`` of each tile's top-left corner, with the smallest at 0.
    accepted : ndarray, shape (m,), bool
        Pairs placed by their correlation (the rest by the corrected stage).
    min_peak_quality, max_stage_discrepancy : float
        The thresholds used.
    affine : ndarray, shape (2, 2)
        ``T`` such that ``stage_shift_px @ T`` best matches the correlation
        shifts (identity when it could not be fitted).
    csm : ndarray, shape (2, 2)
        The improved effective camera-to-sample matrix ``inv(T) @ M``.
    rms_error_px : float
        RMS residual of the trusted pairs at the final positions.
    """

    positions_px: np.ndarray
    accepted: np.ndarray
    min_peak_quality: float
    max_stage_discrepancy: float
    affine: np.ndarray
    csm: np.ndarray
    rms_error_px: float
    method: str = "reference"
    status: np.ndarray | None = None  # per pair: STAGE_ONLY, TRUSTED or RESEARCHED
    shift_px: np.ndarray | None = None  # the shift each pair was placed by
    score: np.ndarray | None = None  # per pair: overlap NCC of the chosen peak (robust)
    null_score: np.ndarray | None = None  # best NCC of each non-overlapping (null) pair
    score_threshold: float = float("nan")  # the null's (1 - NULL_FPR) quantile
    stage_sigma_px: float = float("nan")  # the stage's repeatability (robust)
    residual_px: np.ndarray | None = None  # per pair: |x_b - x_a - shift| at the result

    @property
    def n_accepted(self) -> int:
        return int(self.accepted.sum())

    def counts(self) -> dict[str, int]:
        """How many pairs were trusted, re-searched near the stage, or placed by the stage."""
        if self.status is None:
            n = len(self.accepted)
            return {"trusted": self.n_accepted, "re-searched": 0,
                    "stage-only": n - self.n_accepted}
        return {"trusted": int(np.sum(self.status == TRUSTED)),
                "re-searched": int(np.sum(self.status == RESEARCHED)),
                "stage-only": int(np.sum(self.status == STAGE_ONLY))}


# ----------------------------------------------------------------------------- kernels


def fit_affine(stage_shift: Any, image_shift: Any) -> Any:
    """Least-squares ``T`` (2x2) with ``stage_shift @ T ≈ image_shift``.

    Parameters
    ----------
    stage_shift, image_shift : array, shape (k, 2)

    Returns
    -------
    array, shape (2, 2), on the inputs' device
    """
    xp = array_namespace(stage_shift, image_shift)
    s_t = xp.matrix_transpose(stage_shift)
    return xp.linalg.solve(xp.matmul(s_t, stage_shift), xp.matmul(s_t, image_shift))


def solve_positions(pairs: Any, shifts: Any, weights: Any, n_tiles: int) -> Any:
    """Positions ``(n, 2)`` (zero mean) from weighted pair shifts ``(m, 2)``."""
    return solve_laplacian(pairs[:, 0], pairs[:, 1], weights, shifts, n_tiles)


def fit_error(positions: Any, pairs: Any, shifts: Any, n_stage: int,
              stage_penalty: float, weights: Any = None) -> float:
    """Weighted RMS residual plus the stage penalty: the score of one choice of trusted pairs.

    Parameters
    ----------
    positions : array, shape (n, 2)
    pairs : array of int, shape (m, 2)
    shifts : array, shape (m, 2)
        The shift each pair was fitted to.
    n_stage : int
        How many pairs fell back to the stage.
    stage_penalty : float
        Added, times the fraction of stage pairs, to the RMS.
    weights : array, shape (m,), optional
        The weights of the fit (default 1). Weighting the residuals as in the fit
        keeps a stage pair from rewarding a tile cut loose from its neighbours,
        and still shows a wrong correlation that drags a tile off its stage position.

    Returns
    -------
    float
        ``sqrt(sum w r^2 / dof) + stage_penalty * n_stage / m``, with
        ``dof = 2 m - 2 (n - 1)`` (at least 1).
    """
    xp = array_namespace(positions, pairs, shifts)
    residual = (xp.take(positions, pairs[:, 1], axis=0) - xp.take(positions, pairs[:, 0], axis=0)
                - shifts)
    r2 = xp.sum(residual**2, axis=1)
    if weights is not None:
        r2 = r2 * weights
    m, n = pairs.shape[0], positions.shape[0]
    dof = max(1, 2 * m - (2 * n - 2))
    rms = float(xp.sqrt(xp.sum(r2) / dof))
    return rms + stage_penalty * n_stage / max(1, m)


# ----------------------------------------------------------------------------- placement


def _can_fit_affine(stage_shift: np.ndarray) -> bool:
    """An affine fit needs pairs along both axes (not all in one row or column)."""
    if len(stage_shift) < 3:
        return False
    return not (np.all(np.abs(stage_shift[:, 0]) < ONE_D_TOLERANCE_PX)
                or np.all(np.abs(stage_shift[:, 1]) < ONE_D_TOLERANCE_PX))


def stage_weight(stage_residual: np.ndarray) -> float:
    """Weight of a stage-only pair relative to a trusted correlation.

    The inverse-variance ratio ``(sigma_corr / sigma_stage)^2``, where
    ``sigma_stage`` is a robust (median absolute deviation) estimate of how far
    the affine-corrected stage shifts stray from the trusted correlations, and
    ``sigma_corr`` is :data:`CORRELATION_SIGMA_PX`. It is at most
    :data:`STAGE_WEIGHT`, the fixed weight OpenFlexure Stitching uses, so the
    stage only holds tiles in place where correlations do not.
    """
    if len(stage_residual) < 3:
        return STAGE_WEIGHT
    mad = np.median(np.abs(stage_residual - np.median(stage_residual, axis=0)))
    sigma = max(1.4826 * float(mad), CORRELATION_SIGMA_PX)
    return float(np.clip((CORRELATION_SIGMA_PX / sigma) ** 2, MIN_STAGE_WEIGHT, STAGE_WEIGHT))


def _solve(pairs: np.ndarray, shift: np.ndarray, stage_shift: np.ndarray, accepted: np.ndarray,
           n_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions, the affine, the per-pair target shifts and weights for one accepted set."""
    affine = np.eye(2)
    if _can_fit_affine(stage_shift[accepted]):
        fitted = fit_affine(stage_shift[accepted], shift[accepted])
        if np.all(np.isfinite(fitted)) and abs(np.linalg.det(fitted)) > 1e-6:
            affine = fitted
    corrected = stage_shift @ affine
    target = np.where(accepted[:, None], shift, corrected)
    w_stage = stage_weight(corrected[accepted] - shift[accepted])
    weights = np.where(accepted, 1.0, w_stage)
    positions = solve_positions(pairs, target, weights, n_tiles)
    return positions, affine, target, weights


def _levels(values: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of the distinct ``values``, evenly spaced in rank (always the min and max).

    Thresholds sit exactly on data values, so each one changes the accepted set.
    """
    values = np.unique(values[np.isfinite(values)])
    if len(values) <= n:
        return values
    return values[np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))]


def choose_thresholds(pairs: np.ndarray, shift: np.ndarray, quality: np.ndarray,
                      stage_shift: np.ndarray, n_tiles: int, *,
                      min_peak_quality: float | None = None,
                      max_stage_discrepancy: float | None = None) -> tuple[float, float]:
    """Search quality and discrepancy thresholds for the smallest :func:`fit_error`."""
    discrepancy = np.linalg.norm(shift - stage_shift, axis=1)
    valid = np.isfinite(discrepancy) & np.isfinite(quality)
    q_levels = _levels(quality[valid], MAX_LEVELS)
    d_levels = _levels(discrepancy[valid], MAX_LEVELS)[::-1]  # loosest first
    if min_peak_quality is not None:
        q_levels = q_levels[q_levels >= min_peak_quality]
    if max_stage_discrepancy is not None:
        d_levels = d_levels[d_levels <= max_stage_discrepancy]
    if len(q_levels) == 0 or len(d_levels) == 0:
        raise OfstitchError(
            f"--min-peak-quality {min_peak_quality} and --max-stage-discrepancy "
            f"{max_stage_discrepancy} reject every pair: loosen them (see "
            "stitching_correlations.png)")
    stage_penalty = 2 * float(np.median(discrepancy[valid])) if valid.any() else 0.0
    tried: dict[bytes, float] = {}
    trials: list[tuple[float, int, float, float]] = []  # (error, accepted count, q, d)
    fallback = (-1, float(q_levels[0]), float(d_levels[0]))
    for q in q_levels:
        for d in d_levels:
            accepted = valid & (quality >= q) & (discrepancy <= d)
            count = int(accepted.sum())
            if count > fallback[0]:
                fallback = (count, float(q), float(d))
            if count == 0:
                break  # stricter discrepancies only remove more pairs
            # No floor of n - 1 trusted pairs: blank tiles cannot have any, and demanding
            # them would force wrong correlations in. The stage penalty keeps the search
            # from trusting too few.
            key = np.packbits(accepted).tobytes()
            if key not in tried:
                positions, _, target, weights = _solve(pairs, shift, stage_shift, accepted,
                                                       n_tiles)
                tried[key] = fit_error(positions, pairs, target, len(pairs) - count,
                                       stage_penalty, weights)
            trials.append((tried[key], count, float(q), float(d)))
    if not trials:
        log.info("no threshold pair kept enough correlations; using the loosest")
        return fallback[1], fallback[2]
    # The smallest error wins; between equal errors, the fit that trusts more pairs.
    error, count, q, d = min(trials, key=lambda t: (t[0], -t[1]))
    log.info("thresholds: peak quality >= %.6f, discrepancy <= %.2f px: %d pairs, error %.3f "
             "(%d fits)", q, d, count, error, len(tried))
    return q, d


def place_reference(pairs: np.ndarray, shift: np.ndarray, quality: np.ndarray,
                    stage_px: np.ndarray, csm: np.ndarray, *, thresholding: str = "automatic",
          min_peak_quality: float | None = None, max_stage_discrepancy: float | None = None,
          ask_thresholds: Callable[[], tuple[float, float]] | None = None) -> Placement:
    """Place every tile by the threshold search of OpenFlexure Stitching.

    Parameters
    ----------
    pairs : ndarray, shape (m, 2), int
    shift : ndarray, shape (m, 2)
        Correlation shift of each pair (NaN where correlation failed).
    quality : ndarray, shape (m,)
    stage_px : ndarray, shape (n, 2)
        Stage-predicted top-left positions.
    csm : ndarray, shape (2, 2)
        The effective camera-to-sample matrix the stage positions came from.
    thresholding : {"automatic", "manual"}
    ask_thresholds : callable, optional
        For ``"manual"``: returns ``(min_peak_quality, max_stage_discrepancy)``.
    """
    n = len(stage_px)
    if n == 1 or len(pairs) == 0:
        return Placement(stage_px - stage_px.min(axis=0), np.zeros(len(pairs), bool), 0.0,
                         0.0, np.eye(2), csm, 0.0)
    stage_shift = stage_px[pairs[:, 1]] - stage_px[pairs[:, 0]]
    discrepancy = np.linalg.norm(shift - stage_shift, axis=1)
    valid = np.isfinite(discrepancy) & np.isfinite(quality)
    if not valid.any():
        warnings.warn("no pair could be correlated (blank or unreadable tiles): placing every "
                      "tile from the stage alone", OfstitchWarning, stacklevel=2)
        return stage_placement(stage_px, csm, len(pairs))
    if thresholding == "manual":
        if ask_thresholds is None:
            raise OfstitchError("thresholding='manual' needs thresholds: pass ask_thresholds, "
                                "or use the CLI, which asks for them")
        q_thr, d_thr = ask_thresholds()
    else:
        q_thr, d_thr = choose_thresholds(pairs, shift, quality, stage_shift, n,
                                         min_peak_quality=min_peak_quality,
                                         max_stage_discrepancy=max_stage_discrepancy)
    if min_peak_quality is not None:
        q_thr = max(q_thr, min_peak_quality)
    if max_stage_discrepancy is not None:
        d_thr = min(d_thr, max_stage_discrepancy)
    accepted = valid & (quality >= q_thr) & (discrepancy <= d_thr)
    positions, affine, target, _ = _solve(pairs, np.nan_to_num(shift), stage_shift, accepted, n)
    residual = positions[pairs[:, 1]] - positions[pairs[:, 0]] - target
    rms = float(np.sqrt(np.mean(np.sum(residual[accepted] ** 2, axis=1)))) if accepted.any() \
        else 0.0
    improved_csm = np.linalg.inv(affine) @ csm
    return Placement(positions - positions.min(axis=0), accepted, float(q_thr), float(d_thr),
                     affine, improved_csm, rms, method="reference",
                     status=np.where(accepted, TRUSTED, STAGE_ONLY), shift_px=target,
                     residual_px=np.linalg.norm(residual, axis=1))


def stage_placement(stage_px: np.ndarray, csm: np.ndarray, n_pairs: int = 0) -> Placement:
    """Positions from the stage alone (``stitching_mode="stage"``)."""
    return Placement(stage_px - stage_px.min(axis=0), np.zeros(n_pairs, bool), 0.0, 0.0,
                     np.eye(2), csm, 0.0)


# ----------------------------------------------------------------------------- robust placement


def null_threshold(null_score: np.ndarray, fpr: float = NULL_FPR) -> float:
    """The score a pair must beat: the ``1 - fpr`` quantile of the null scores.

    The null scores are the best candidate scores of tile pairs that do not overlap,
    searched exactly as the real pairs are: what a chance match looks like on this
    scan. With fewer than ``1 / fpr`` null pairs the quantile is their maximum. The
    threshold is never below :data:`MIN_SCORE`.
    """
    finite = null_score[np.isfinite(null_score)]
    if len(finite) == 0:
        return MIN_SCORE
    return max(MIN_SCORE, float(np.quantile(finite, 1.0 - fpr, method="higher")))


def _best_candidate(candidates: np.ndarray, allowed: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Shift ``(m, 2)`` and score ``(m,)`` of each pair's best-scoring candidate."""
    score = np.where(np.isfinite(candidates[..., 2]), candidates[..., 2], -np.inf)
    if allowed is not None:
        score = np.where(allowed, score, -np.inf)
    k = np.argmax(score, axis=1)
    rows = np.arange(len(candidates))
    best = score[rows, k]
    shift = np.where(np.isfinite(best)[:, None], candidates[rows, k, :2], np.nan)
    return shift, np.where(np.isfinite(best), best, np.nan)


def fit_stage_model(stage_shift: np.ndarray, shift: np.ndarray, rounds: int = 4
                    ) -> tuple[np.ndarray, float]:
    """Robust affine ``T`` (``stage_shift @ T ≈ shift``) and the stage's repeatability.

    Iteratively refitted on the pairs within 3 robust sigmas of the last fit, so a
    few wrong correlations do not tilt it. The repeatability ``sigma`` is
    1.4826 times the median absolute deviation of the residuals (per axis, the
    larger of the two), in pixels. The identity and the raw spread when the pairs
    cannot support a fit (fewer than 3, or all along one axis).
    """
    if len(shift) == 0:
        return np.eye(2), float("inf")
    keep = np.ones(len(shift), bool)
    affine = np.eye(2)
    for _ in range(rounds):
        if not _can_fit_affine(stage_shift[keep]):
            break
        fitted = np.asarray(fit_affine(stage_shift[keep], shift[keep]))
        if not (np.all(np.isfinite(fitted)) and abs(np.linalg.det(fitted)) > 1e-6):
            break
        affine = fitted
        residual = shift - stage_shift @ affine
        sigma = _robust_sigma(residual[keep])
        keep = np.all(np.abs(residual - np.median(residual[keep], axis=0)) <= 3 * sigma + 0.5,
                      axis=1)
    residual = shift - stage_shift @ affine
    return affine, _robust_sigma(residual[keep] if keep.any() else residual)


def _robust_sigma(residual: np.ndarray) -> float:
    if len(residual) == 0:
        return float("inf")
    mad = np.median(np.abs(residual - np.median(residual, axis=0)), axis=0)
    return float(1.4826 * np.max(mad))


def _within(candidates: np.ndarray, around: np.ndarray, radius: float) -> np.ndarray:
    """``candidates`` with those further than ``radius`` from ``around`` removed (NaN)."""
    far = np.linalg.norm(candidates[..., :2] - around[:, None, :], axis=2) > radius
    return np.where(far[..., None], np.nan, candidates)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` tiles under ``pairs``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(adj, directed=False)[1]


def place_robust(pairs: np.ndarray, candidates: np.ndarray, stage_px: np.ndarray,
                 csm: np.ndarray, *, null_candidates: np.ndarray | None = None,
                 null_stage_shift: np.ndarray | None = None, fpr: float = NULL_FPR,
                 search_radius: float | None = None) -> Placement:
    """Place every tile: null-calibrated scores, a stage model, loops and islands.

    1. **Score.** Each pair's candidate peaks are scored by the NCC of the tiles'
       overlap (see :mod:`ofstitch.stream`); the best is the pair's reading. A pair
       is trusted when its score beats :func:`null_threshold` of the null pairs
       (pairs that do not overlap, searched the same way).
    2. **Stage model.** A robust affine from stage to image shifts is fitted on the
       trusted pairs (:func:`fit_stage_model`), with the stage's repeatability
       ``sigma``. A trusted reading more than ``GATE_SIGMAS`` sigma from the model is
       a repeat of a periodic sample, not the overlap: it is rejected.
    3. **Re-search.** Each rejected pair takes its best candidate within
       ``RESEARCH_SIGMAS`` sigma of the model's prediction, if that beats the null
       threshold for the same restricted search.
    4. **Loops and islands.** Positions solve the least squares of the used pairs;
       stage links (the model's prediction) join the islands the used pairs leave,
       with a weight so small that they place islands without bending them. A used
       pair whose residual shows it disagrees with its loops is dropped, worst first,
       until every residual is within tolerance; a pair that is the only link
       (a bridge) has no loop and is kept.

    Parameters
    ----------
    pairs : ndarray, shape (m, 2), int
    candidates : ndarray, shape (m, K, 3)
        ``(dy, dx, score)`` of each candidate peak (NaN rows: none).
    stage_px : ndarray, shape (n, 2)
    csm : ndarray, shape (2, 2)
    null_candidates : ndarray, shape (q, K, 3), optional
        Candidates of the null pairs.
    null_stage_shift : ndarray, shape (q, 2), optional
        The stage shift each null pair was searched around.
    search_radius : float, optional
        The user's bound on the stage error (``--corr-mask-radius``): candidates
        further than this from the stage shift are ignored, and a pair that is not
        trusted takes its best candidate within it (as the reference method does),
        when that scores at least :data:`MIN_SCORE`. For periodic samples, where a
        repeat scores as well as the overlap and the null cannot tell them apart.
    """
    n, m = len(stage_px), len(pairs)
    if n == 1 or m == 0:
        return stage_placement(stage_px, csm, m)
    stage_shift = stage_px[pairs[:, 1]] - stage_px[pairs[:, 0]]
    if null_candidates is None or len(null_candidates) == 0:
        null_candidates = np.full((0,) + candidates.shape[1:], np.nan)
        null_stage_shift = np.zeros((0, 2))
    if search_radius is not None:
        candidates = _within(candidates, stage_shift, search_radius)
        null_candidates = _within(null_candidates, null_stage_shift, search_radius)

    # 1. Scores against the null.
    best_shift, best_score = _best_candidate(candidates)
    _, null_best = _best_candidate(null_candidates)
    threshold = null_threshold(null_best, fpr)
    trusted = best_score > threshold

    # 2. Stage model, and the gate against repeats.
    affine, sigma = fit_stage_model(stage_shift[trusted], best_shift[trusted])
    if not np.isfinite(sigma):
        sigma = float(np.max(np.abs(stage_shift))) if m else 0.0
    predicted = stage_shift @ affine
    gate = max(GATE_SIGMAS * sigma, MIN_GATE_RADIUS_PX)
    trusted &= np.linalg.norm(best_shift - predicted, axis=1) <= gate

    # 3. Re-search the rest near the stage prediction.
    radius = max(RESEARCH_SIGMAS * sigma, MIN_RESEARCH_RADIUS_PX)
    if search_radius is not None:
        radius = search_radius
    near = np.linalg.norm(candidates[..., :2] - predicted[:, None, :], axis=2) <= radius
    near_shift, near_score = _best_candidate(candidates, near)
    null_predicted = null_stage_shift @ affine
    null_near = np.linalg.norm(null_candidates[..., :2] - null_predicted[:, None, :],
                               axis=2) <= radius
    _, null_near_best = _best_candidate(null_candidates, null_near)
    near_threshold = max(null_threshold(null_near_best, fpr), threshold) \
        if search_radius is None else MIN_SCORE
    researched = ~trusted & (near_score > near_threshold)
    status = np.where(trusted, TRUSTED, np.where(researched, RESEARCHED, STAGE_ONLY))
    shift = np.where(trusted[:, None], best_shift, near_shift)
    score = np.where(trusted, best_score, np.where(researched, near_score, best_score))

    # The final stage model, from every pair now used.
    used = status != STAGE_ONLY
    affine2, sigma2 = fit_stage_model(stage_shift[used], shift[used])
    if np.isfinite(sigma2):
        affine, sigma = affine2, sigma2
    predicted = stage_shift @ affine

    # 4. Loops and islands.
    for _ in range(MAX_PRUNE_ROUNDS):
        target = np.where(used[:, None], shift, predicted)
        weights = np.where(used, 1.0, ISLAND_STAGE_WEIGHT)
        positions = np.asarray(solve_positions(pairs, target, weights, n))
        residual = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]] - target,
                                  axis=1)
        if not used.any():
            break
        r_used = residual[used]
        limit = max(LOOP_TOLERANCE_PX, LOOP_SIGMAS * 1.4826 * float(np.median(r_used)))
        worst = _loop_breakers(pairs, residual, used & (residual > limit), score)
        if not worst.any():
            break
        used &= ~worst
        status = np.where(used, status, STAGE_ONLY)
    rms = float(np.sqrt(np.mean(residual[used] ** 2))) if used.any() else 0.0
    target = np.where(used[:, None], shift, predicted)
    return Placement(positions - positions.min(axis=0), used, float(threshold), float(gate),
                     affine, np.linalg.inv(affine) @ csm, rms, method="robust",
                     status=status, shift_px=target, score=score, null_score=null_best,
                     score_threshold=float(threshold), stage_sigma_px=float(sigma),
                     residual_px=residual)


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
    order = idx[np.argsort(-residual[idx])].tolist()
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


def place(pairs: np.ndarray, shift: np.ndarray, quality: np.ndarray, stage_px: np.ndarray,
          csm: np.ndarray, *, method: str | None = None, candidates: np.ndarray | None = None,
          null_candidates: np.ndarray | None = None,
          null_stage_shift: np.ndarray | None = None, search_radius: float | None = None,
          **reference_options: Any) -> Placement:
    """Place every tile from pair correlations and stage positions.

    ``method="robust"`` (the default when ``candidates`` are given) is
    :func:`place_robust`; ``"reference"`` is the threshold search of OpenFlexure
    Stitching (:func:`place_reference`, which takes ``reference_options``).
    """
    method = method or ("robust" if candidates is not None else "reference")
    if method not in PLACEMENT_METHODS:
        raise OfstitchError(f"unknown placement method {method!r}: use one of "
                            f"{', '.join(PLACEMENT_METHODS)}")
    if method == "reference" or len(pairs) == 0:
        return place_reference(pairs, shift, quality, stage_px, csm, **reference_options)
    if candidates is None:
        raise OfstitchError("robust placement needs the candidate peaks of each pair")
    valid = np.isfinite(candidates[..., 2]).any(axis=1)
    if not valid.any():
        warnings.warn("no pair could be correlated (blank or unreadable tiles): placing every "
                      "tile from the stage alone", OfstitchWarning, stacklevel=2)
        return stage_placement(stage_px, csm, len(pairs))
    return place_robust(pairs, candidates, stage_px, csm, null_candidates=null_candidates,
                        null_stage_shift=null_stage_shift, search_radius=search_radius)
