r"""Stage backlash: an offset of each tile by the direction the stage arrived in.

A stage that reverses along an axis lags by its backlash, so in a snake scan the rows
scanned right to left sit a few pixels off those scanned left to right, the same few
pixels for every tile of them. Pair readings measure it on the pairs that join tiles of
opposite directions; tiles that no reading locates (blank overlaps, chance-level scores)
are placed by the stage, and without this term carry the whole offset.

Model
-----
The direction of travel of tile :math:`i` along stage axis :math:`j` is
:math:`t_{ij} \in \{-1, 0, +1\}`: the sign of the move that brought the stage to the
tile along that axis, or, when that move did not go along it (the first tile of a row),
of the move that leaves it; 0 when neither does, or when the capture order is unknown
(:func:`travel_directions`). The stage model of a pair :math:`k = (a, b)` becomes

.. math:: e_k = s_k T + \tfrac12 (t_b - t_a) B

with :math:`B` (2x2: one pixel offset per stage axis, the offset between arriving
moving :math:`+` and moving :math:`-`) fitted on the located pairs by robust least
squares, only along axes travelled both ways, and kept only when it explains clearly more
than the model without it (the same test as the affine's) and stays within a bound
(:func:`fit_backlash`). The capture order must come from the tiles themselves (EXIF
capture times), never from file order or modification times: positions must not depend
on them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MIN_BACKLASH_PAIRS = 4  # located pairs across the two directions of an axis, at least
MIN_TILES_EACH_WAY = 2  # tiles arrived at moving each way along an axis, at least
BACKLASH_GAIN = 3.0  # residual variance must shrink by this many times the parameters' share
BACKLASH_SIGMAS = 4.0  # ... and an axis' offset be this many standard errors
MOVE_FRACTION = 0.1  # a move shorter than this fraction of the typical step is not a move


class Backlash(NamedTuple):
    """A fitted backlash term (:func:`fit_backlash`)."""

    offset_px: np.ndarray  # (2, 2): per stage axis (x, y), the (row, col) offset + vs -
    tile_px: np.ndarray  # (n, 2): each tile's offset, half of ``offset_px`` by direction

    def pair_px(self, pairs: np.ndarray) -> np.ndarray:
        """``(m, 2)``: the offset of each pair's shift."""
        return self.tile_px[pairs[:, 1]] - self.tile_px[pairs[:, 0]]


def pair_offset(backlash: Backlash | None, pairs: np.ndarray) -> np.ndarray | float:
    """``(m, 2)``: the backlash term of each pair's shift (0 without one)."""
    return 0.0 if backlash is None else backlash.pair_px(pairs)


def travel_directions(stage_xy: np.ndarray) -> np.ndarray:
    """``(n, 2)`` int: the direction of travel of each tile along stage x and y.

    ``stage_xy`` must be in capture order. The sign of the arriving move along the axis,
    else of the leaving move (the first tile of a snake row is scanned in the row's
    direction), else 0. Moves shorter than :data:`MOVE_FRACTION` of the median move
    along the axis are not moves.
    """
    stage_xy = np.asarray(stage_xy, dtype=np.float64)
    n = len(stage_xy)
    out = np.zeros((n, 2), np.int64)
    if n < 2:
        return out
    move = np.diff(stage_xy, axis=0)  # move[k] arrives at tile k + 1
    for j in range(2):
        size = np.abs(move[:, j])
        moving = size[size > 0]
        if not len(moving):
            continue
        step = MOVE_FRACTION * float(np.median(moving))
        sign = np.where(size > step, np.sign(move[:, j]), 0.0).astype(np.int64)
        arrive = np.concatenate([[0], sign])
        leave = np.concatenate([sign, [0]])
        out[:, j] = np.where(arrive != 0, arrive, leave)
    return out


def fit_backlash(travel: np.ndarray | None, pairs: np.ndarray, stage_shift: np.ndarray,
                 shift: np.ndarray, use: np.ndarray, max_px: float) -> Backlash | None:
    """The backlash term from the located pairs, or ``None``.

    Fitted jointly with a linear stage model (``shift ≈ stage_shift @ T + offset``), by
    least squares refitted on the pairs within 3 robust sigmas: fitted after the affine,
    the affine's shear would take up the offset of half the rows.

    Parameters
    ----------
    travel : ndarray, shape (n, 2), int, or None
        :func:`travel_directions`; ``None`` when the capture order is unknown.
    pairs : ndarray, shape (m, 2), int
    stage_shift, shift : ndarray, shape (m, 2)
        Each pair's stage shift and reading (NaN: no reading).
    use : ndarray, shape (m,), bool
        The located pairs to fit on.
    max_px : float
        No offset beyond this is believed (a term that large is taken for a wrong fit).

    ``None`` when no axis is travelled both ways by enough tiles, fewer than
    :data:`MIN_BACKLASH_PAIRS` located pairs join opposite directions along it, or the
    term does not shrink the robust residual variance of those pairs (against the same
    fit without it) by more than :data:`BACKLASH_GAIN` times its parameters' share of them;
    an axis whose offset is within :data:`BACKLASH_SIGMAS` standard errors of zero has none.
    """
    if travel is None or not use.any():
        return None
    travel = np.asarray(travel)
    half = 0.5 * travel.astype(np.float64)
    diff = half[pairs[:, 1]] - half[pairs[:, 0]]  # (m, 2): per stage axis
    axes = [j for j in range(2)
            if min(int((travel[:, j] > 0).sum()), int((travel[:, j] < 0).sum()))
            >= MIN_TILES_EACH_WAY
            and int((use & (diff[:, j] != 0)).sum()) >= MIN_BACKLASH_PAIRS]
    if not axes:
        return None
    x = diff[:, axes]
    use = use & np.isfinite(shift).all(axis=1)
    y = np.nan_to_num(shift)
    joint = _robust_lstsq(np.concatenate([stage_shift, x], axis=1), y, use)
    if joint is None:
        return None
    linear = _robust_lstsq(stage_shift, y, use)
    coef = joint[2:]
    # Judged on the pairs it changes (those joining opposite directions): on all pairs the
    # robust spread would not see a minority of pairs, however far off.
    base = use & (x != 0).any(axis=1)
    if linear is None or base.sum() < MIN_BACKLASH_PAIRS:
        return None
    sigma_without = _sigma((y - stage_shift @ linear)[base])
    sigma_with = _sigma((y - stage_shift @ joint[:2] - x @ coef)[base])
    gain = 1 + BACKLASH_GAIN * coef.size / int(base.sum())
    if sigma_without**2 < gain * max(sigma_with, 1e-3)**2 or np.abs(coef).max() > max_px:
        return None
    # ... and each axis' offset well beyond its standard error, else that axis has none.
    error = max(sigma_with, 1e-3) / np.sqrt(np.maximum((x[base] ** 2).sum(axis=0), 1e-12))
    significant = np.linalg.norm(coef, axis=1) >= BACKLASH_SIGMAS * error
    if not significant.any():
        return None
    offset = np.zeros((2, 2))
    offset[np.array(axes)[significant]] = coef[significant]
    return Backlash(offset, half @ offset)


def _robust_lstsq(x: np.ndarray, y: np.ndarray, use: np.ndarray,
                  rounds: int = 4) -> np.ndarray | None:
    """Least squares ``x @ coef ≈ y`` refitted on the rows within 3 robust sigmas."""
    keep = use.copy()
    coef = None
    for _ in range(rounds):
        if keep.sum() <= x.shape[1]:
            return coef
        coef = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        left = y - x @ coef
        new = use & np.all(np.abs(left) <= 3 * _sigma(left[keep]) + 0.5, axis=1)
        if np.array_equal(new, keep):
            break
        keep = new
    return coef


def _sigma(residual: np.ndarray) -> float:
    """1.4826 times the median absolute residual (the larger axis), as the stage model's."""
    if len(residual) == 0:
        return float("inf")
    return float(1.4826 * np.max(np.median(np.abs(residual), axis=0)))
