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

Robust placement (the default) is :mod:`ofstitch.robust`: it weights each reading by its
own 2x2 uncertainty, never strays from the stage beyond its repeatability, and reports how
far it can be trusted (:class:`PlacementReport`).

The kernels (:func:`fit_affine`, :func:`solve_positions`, :func:`fit_error`)
take arrays of any array-API namespace; the sparse solve sits behind
:func:`ofstitch.backends.solve_laplacian`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

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

# Robust placement (the default, :mod:`ofstitch.robust`): how each pair was placed.
STAGE_ONLY, TRUSTED, RESEARCHED = 0, 1, 2


@dataclass(frozen=True)
class PlacementReport:
    """How far a placement can be trusted, in plain words.

    Attributes
    ----------
    n_pairs : int
    n_located : int
        Pairs placed by a reading localised in both directions.
    n_one_way : int
        Pairs whose overlap holds only a straight edge: located across it, not along it.
    n_tiles : int
    n_tiles_correlated : int
        Tiles located in both directions by their overlaps.
    n_tiles_one_way : int
        Tiles located by their overlaps in one direction only (the stage gives the other).
    n_tiles_stage_only : int
        Tiles placed by stage only (no overlap located them).
    stage_sigma_px : float
        The stage's repeatability (NaN when too few pairs could measure it).
    max_loop_residual_px : float
        The largest residual of a used pair at the final positions.
    chance_level : float
        The overlap NCC a reading had to beat (chance exceeds it with probability
        ``fpr`` per pair).
    affine_fitted : bool
        Whether the stage-to-image affine was fitted (else the stage's own matrix).
    fell_back : bool
        The correlations disagreed with the stage far beyond its repeatability, and the
        result was moved back to the stage.
    doubts : tuple of str
        Why the result is doubtful (empty when it is not).
    advice : str
        What to try when it is.
    """

    n_pairs: int
    n_located: int
    n_one_way: int
    n_tiles: int
    n_tiles_correlated: int
    n_tiles_one_way: int
    n_tiles_stage_only: int
    stage_sigma_px: float
    max_loop_residual_px: float
    chance_level: float
    affine_fitted: bool
    fell_back: bool = False
    doubts: tuple[str, ...] = ()
    advice: str = ""

    @property
    def doubtful(self) -> bool:
        return bool(self.doubts)

    def lines(self) -> list[str]:
        """The summary, a few lines for a person."""
        sigma = (f"{self.stage_sigma_px:.1f} px" if np.isfinite(self.stage_sigma_px)
                 else "not measured")
        out = [f"{self.n_located} of {self.n_pairs} pairs located by correlation"
               + (f", {self.n_one_way} across a straight edge only" if self.n_one_way else "")
               + f" (chance level: overlap NCC {self.chance_level:.2f}).",
               f"{self.n_tiles_correlated} of {self.n_tiles} tiles placed by correlation, "
               + (f"{self.n_tiles_one_way} by correlation in one direction only, "
                  if self.n_tiles_one_way else "")
               + f"{self.n_tiles_stage_only} placed by stage only; stage repeatability "
               f"{sigma}; largest loop residual {self.max_loop_residual_px:.2f} px.",
               ("Stage model: affine fitted on the located pairs." if self.affine_fitted else
                "Stage model: the stage's own matrix (an affine needs enough located pairs "
                "along both axes, and must fit them clearly better).")]
        if self.doubts:
            out.append(self.warning())
        return out

    def warning(self) -> str:
        """One line: why the result is doubtful and what to try."""
        return ("placement is doubtful: " + "; ".join(self.doubts)
                + (f". Try {self.advice}" if self.advice else ""))


class PairCounts(NamedTuple):
    """How the pairs of a placement were used."""

    trusted: int  # placed by their correlation
    researched: int  # by a candidate found again near the stage model's prediction
    stage_only: int  # placed by the stage only


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
        Reference placement: the thresholds used (NaN for robust placement, whose
        thresholds are ``score_threshold`` and ``gate_px``).
    affine : ndarray, shape (2, 2)
        ``T`` such that ``stage_shift_px @ T`` best matches the correlation
        shifts (identity when it could not be fitted).
    csm : ndarray, shape (2, 2)
        The improved effective camera-to-sample matrix ``inv(T) @ M``.
    rms_error_px : float
        RMS residual of the trusted pairs at the final positions (robust: in the
        directions each reading locates).
    located : ndarray, shape (m,), bool, optional
        Robust: pairs placed by a reading localised in both directions.
    weight : ndarray, shape (m, 2, 2), optional
        Robust: the inverse covariance each used reading was weighted by, in units of a
        located reading (the identity); an edge-only reading weighs across the edge only.
    report : PlacementReport, optional
        Robust: how far the result can be trusted, in plain words, with the reasons it is
        doubtful (:meth:`PlacementReport.warning`).
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
    # Robust: per pair, the overlap NCC of the chosen peak, and the best of each chance-level
    # pair; an overlap smaller than the scan's typical one is marked down to the NCC its
    # evidence is worth at the typical size (significance.area_scaled).
    score: np.ndarray | None = None
    null_score: np.ndarray | None = None
    score_threshold: float = float("nan")  # chance level: what a reading had to beat
    stage_sigma_px: float = float("nan")  # the stage's repeatability (robust)
    residual_px: np.ndarray | None = None  # per pair: |x_b - x_a - shift| at the result
    located: np.ndarray | None = None  # per pair: reading localised in both directions
    weight: np.ndarray | None = None  # per pair (2, 2): inverse covariance of the reading
    report: PlacementReport | None = None  # robust placement: how far it can be trusted
    gate_px: float = float("nan")  # robust: a reading this far from the stage model is a repeat
    # Robust: (n, 2) each tile's offset from the stage model's position (stage backlash,
    # :mod:`ofstitch.backlash`; zeros when none was fitted).
    stage_offset_px: np.ndarray | None = None

    @property
    def n_accepted(self) -> int:
        return int(self.accepted.sum())

    def counts(self) -> PairCounts:
        """How many pairs were trusted, re-searched near the stage, or placed by the stage."""
        if self.status is None:
            n = len(self.accepted)
            return PairCounts(self.n_accepted, 0, n - self.n_accepted)
        return PairCounts(int(np.sum(self.status == TRUSTED)),
                          int(np.sum(self.status == RESEARCHED)),
                          int(np.sum(self.status == STAGE_ONLY)))


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


def place(pairs: np.ndarray, shift: np.ndarray, quality: np.ndarray, stage_px: np.ndarray,
          csm: np.ndarray, *, method: str | None = None, candidates: np.ndarray | None = None,
          null_candidates: np.ndarray | None = None,
          null_stage_shift: np.ndarray | None = None, search_radius: float | None = None,
          tile_shape: tuple[int, int] | None = None, warn: bool = True,
          local: Any = None, local_chance: Any = None, travel: np.ndarray | None = None,
          **reference_options: Any) -> Placement:
    """Place every tile from pair correlations and stage positions.

    ``method="robust"`` (the default when ``candidates`` are given) is
    :func:`place_robust`; ``"reference"`` is the threshold search of OpenFlexure
    Stitching (:func:`place_reference`, which takes ``reference_options``).
    ``tile_shape`` bounds the stage error robust placement believes (a fraction of the
    tile); with ``warn``, a doubtful robust result emits its report's one-line
    :class:`~ofstitch.errors.OfstitchWarning`.
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
    from .robust import place_robust

    result = place_robust(pairs, candidates, stage_px, csm, null_candidates=null_candidates,
                          null_stage_shift=null_stage_shift, search_radius=search_radius,
                          tile_shape=tile_shape, local=local, local_chance=local_chance,
                          travel=travel)
    if warn and result.report is not None and result.report.doubtful:
        warnings.warn(result.report.warning(), OfstitchWarning, stacklevel=2)
    return result


# Robust placement lives in its own module (which imports this one); its names are part of
# this module's API, looked up on first use.
_ROBUST_NAMES = ("NULL_FPR", "MIN_SCORE", "fit_stage_model", "null_threshold", "place_robust")


def __getattr__(name: str) -> Any:
    if name in _ROBUST_NAMES:
        from . import robust

        return getattr(robust, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
