"""Peak search in batches of correlations: the highest peak of each, to sub-pixel
precision, and the candidate peaks robust placement chooses among.

Pure functions on device arrays shaped ``(n, H, W)`` (correlations from
:func:`ofstitch.correlate.cross_correlate`), written against the Python array API, with
NumPy fast paths where a generic form would cost several passes.

The peak quality is the fraction of correlation values below 90% of the way
from the minimum to the maximum of the searched region, the scale used by
OpenFlexure Stitching: a sharp, unique peak gives values close to 1.

All shifts are ``(y, x)`` = ``(row, col)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace, is_numpy_namespace
from array_api_compat import device as device_of

# Correlation values within this many pixels of zero shift are replaced by the
# mean: fixed-pattern features shared by all tiles (vignetting, dust on the
# sensor) correlate there, and neighbouring tiles never sit that close.
ZERO_SHIFT_EXCLUSION_PX = 8
QUALITY_LEVEL = 0.9


class Peaks(NamedTuple):
    """Per-pair correlation results, on the device of the correlation.

    Attributes
    ----------
    shift : array, shape (n, 2), float
        Sub-pixel shift ``(y, x)`` of tile ``b`` relative to tile ``a``, in
        correlation pixels; NaN where there is no peak: a flat correlation (blank
        tiles) or a maximum on the rim of the excluded zero-shift box.
    index : array, shape (n, 2), int
        Integer ``(row, col)`` of the peak in the correlation array.
    quality : array, shape (n,), float
        Peak quality in [0, 1] (see the module docstring).
    """

    shift: Any
    index: Any
    quality: Any


def signed_indices(n: int, *, xp: Any, device: Any = None) -> Any:
    """Displacement of each index of a length-``n`` FFT axis (``i`` or ``i - n``)."""
    i = xp.arange(n, device=device)
    return i - n * xp.astype(i >= (n + 1) // 2, i.dtype)


def locate_peaks(corr: Any, *, expected_shift: Any = None, mask_radius: float | None = None,
                 exclude_radius: int = ZERO_SHIFT_EXCLUSION_PX) -> Peaks:
    """Find the highest peak of each correlation, to sub-pixel precision.

    Parameters
    ----------
    corr : array, shape (n, Hp, Wp)
        Correlations from :func:`cross_correlate`.
    expected_shift : array, shape (n, 2), optional
        Stage-predicted shift ``(y, x)`` of each pair, in correlation pixels.
    mask_radius : float, optional
        With ``expected_shift``, only search within this radius (correlation
        pixels) of it.
    exclude_radius : int
        Ignore displacements with both components within this radius of zero.

    Returns
    -------
    Peaks
    """
    xp = array_namespace(corr)
    dev = device_of(corr)
    n, hp, wp = corr.shape
    e = exclude_radius
    masked = expected_shift is not None and mask_radius is not None
    if not masked and 0 < e and 2 * e + 2 <= min(hp, wp):
        # No full-size temporaries: the statistics of the correlation with its zero-shift
        # box set to the mean, from views around the box (the same numbers as below).
        highest, lowest, quality, py, px, raw_extent = _unmasked_peak(corr, e)
    else:
        dy = xp.astype(signed_indices(hp, xp=xp, device=dev), corr.dtype)[None, :, None]
        dx = xp.astype(signed_indices(wp, xp=xp, device=dev), corr.dtype)[None, None, :]
        searched = corr  # sub-pixel neighbours are read from the unmodified correlation
        if e > 0:
            near_zero = (xp.abs(dy) < e) & (xp.abs(dx) < e)
            searched = xp.where(near_zero, xp.mean(corr, axis=(-2, -1), keepdims=True), corr)
        if masked:
            highest = xp.max(searched, axis=(-2, -1), keepdims=True)
            # The peak sits at d = -shift.
            ey = xp.astype(expected_shift[:, 0], corr.dtype)[:, None, None]
            ex = xp.astype(expected_shift[:, 1], corr.dtype)[:, None, None]
            inside = (dy + ey) ** 2 + (dx + ex) ** 2 <= mask_radius**2
            inside = inside | ~xp.any(inside, axis=(-2, -1), keepdims=True)  # empty: all
            lowest = xp.min(xp.where(inside, searched, highest), axis=(-2, -1), keepdims=True)
            highest = xp.max(xp.where(inside, searched, lowest), axis=(-2, -1), keepdims=True)
            level = lowest + QUALITY_LEVEL * (highest - lowest)
            below = xp.sum(xp.astype(inside & (searched < level), corr.dtype), axis=(-2, -1))
            quality = below / xp.sum(xp.astype(inside, corr.dtype), axis=(-2, -1))
            searched = xp.where(inside, searched, lowest)
        flat = xp.reshape(searched, (n, hp * wp))
        k = xp.argmax(flat, axis=1)
        py, px = k // wp, k % wp
        if not masked:
            # Three passes: the argmax (its value is the highest), the lowest, and the
            # count below the level (no full-size float temporary).
            highest = xp.take_along_axis(flat, k[:, None], axis=1)[:, 0]
            lowest = xp.min(flat, axis=1)
            level = lowest + QUALITY_LEVEL * (highest - lowest)
            quality = xp.astype(_count_below(flat, level), corr.dtype) / (hp * wp)
        if searched is corr:  # the raw correlation's own extremes
            raw_extent = xp.maximum(xp.abs(highest), xp.abs(lowest))
        else:
            raw_extent = xp.max(xp.abs(xp.reshape(corr, (n, hp * wp))), axis=1)
    index = xp.stack([py, px], axis=1)
    int_disp, disp = _subpixel(corr, index)
    shift = -disp
    # A flat correlation (a blank tile) has no peak: NaN, so placement uses the stage.
    span = xp.reshape(highest - lowest, (n,))
    flat = span <= 1e-6 * xp.reshape(raw_extent, (n,))
    # A peak on the rim of the excluded zero-shift box is the tail of the fixed pattern
    # (vignetting, dust) that the box hides, not an alignment: no result either.
    no_peak = flat
    if e > 0:
        no_peak = flat | xp.all(xp.abs(int_disp) <= e, axis=1)
    shift = xp.where(no_peak[:, None], xp.asarray(math.nan, dtype=shift.dtype, device=dev),
                     shift)
    quality = xp.where(flat, xp.zeros_like(quality), quality)
    return Peaks(shift=shift, index=index, quality=quality)


def _unmasked_peak(corr: Any, e: int) -> tuple[Any, Any, Any, Any, Any, Any]:
    """:func:`locate_peaks` without a search mask, its zero-shift box (``|d| < e`` on both
    axes) counted as holding the mean, computed from views of ``corr`` (no copies).

    Returns ``highest, lowest`` (n, 1, 1), ``quality`` (n,), the peak's ``row, col`` (n,)
    and the largest magnitude of the raw correlation (n,).
    """
    xp = array_namespace(corr)
    n, hp, wp = corr.shape
    top, bottom, left, right = e, hp - e + 1, e, wp - e + 1
    # Outside the box, in flat order: above it (between its corners), the full-width
    # middle rows, below it.
    views = [(corr[:, :top, left:right], 0, left), (corr[:, top:bottom, :], top, 0),
             (corr[:, bottom:, left:right], bottom, left)]
    corners = [corr[:, :top, :left], corr[:, :top, right:], corr[:, bottom:, :left],
               corr[:, bottom:, right:]]
    views = [v for v in views if v[0].shape[1] * v[0].shape[2] > 0]
    corners = [c for c in corners if c.shape[1] * c.shape[2] > 0]
    fill = xp.mean(corr, axis=(-2, -1))

    def over(values: list, reduce: Any) -> Any:
        return xp.stack([reduce(v, axis=(-2, -1)) for v in values], axis=1)

    view_max, view_min = over([v for v, _, _ in views], xp.max), over([v for v, _, _ in views],
                                                                         xp.min)
    highest = xp.maximum(xp.max(view_max, axis=1), fill)
    lowest = xp.minimum(xp.min(view_min, axis=1), fill)
    level = lowest + QUALITY_LEVEL * (highest - lowest)
    below = sum(_count_below(v, level) for v, _, _ in views)
    boxed = (2 * e - 1) ** 2
    below = xp.astype(below, corr.dtype) + boxed * xp.astype(fill < level, corr.dtype)
    quality = below / (hp * wp)
    # The first maximum in flat order; the box (from index 0) wins ties with the mean.
    py = xp.zeros((n,), dtype=xp.int64, device=device_of(corr))
    px = xp.zeros_like(py)
    best = fill
    for i, (view, row0, col0) in enumerate(views):
        vh, vw = view.shape[1:]
        j = xp.argmax(xp.reshape(view, (n, vh * vw)), axis=1)
        better = view_max[:, i] > best
        py = xp.where(better, xp.astype(j // vw, py.dtype) + row0, py)
        px = xp.where(better, xp.astype(j % vw, px.dtype) + col0, px)
        best = xp.where(better, view_max[:, i], best)
    raw_extent = xp.maximum(xp.max(xp.abs(view_max), axis=1), xp.max(xp.abs(view_min), axis=1))
    for c in corners:
        raw_extent = xp.maximum(raw_extent, xp.max(xp.abs(c), axis=(-2, -1)))
    return highest[:, None, None], lowest[:, None, None], quality, py, px, raw_extent


def _count_below(x: Any, level: Any) -> Any:
    """Number of values of each ``x[i]`` (any shape) below ``level[i]``: ``(n,)`` ints."""
    xp = array_namespace(x, level)
    if is_numpy_namespace(xp):  # native fast path: per row, 5x faster than along an axis
        import numpy as np

        return np.asarray([np.count_nonzero(x[i] < level[i]) for i in range(x.shape[0])],
                          dtype=np.int64)
    return xp.count_nonzero(x < xp.reshape(level, (-1,) + (1,) * (x.ndim - 1)),
                            axis=tuple(range(1, x.ndim)))


def top_peaks(corr: Any, k: int, *, exclude_radius: int = ZERO_SHIFT_EXCLUSION_PX,
              separation: int = 4, expected_shift: Any = None, radius: float | None = None,
              near: int = 0) -> tuple[Any, Any]:
    """The ``k`` highest separate peaks of each correlation, to sub-pixel precision.

    Peaks are taken greedily from the highest; after each, the values within
    ``separation`` pixels of it (circularly) are suppressed, so the candidates are
    distinct displacements, not the shoulders of one peak. Displacements within
    ``exclude_radius`` of zero are never candidates (see :func:`locate_peaks`).

    The greedy choice only ever looks at the ``(k - 1) (2 separation + 1)^2 + 1``
    highest values (each pick suppresses at most ``(2 separation + 1)^2`` of them), so
    those are found in one pass (``argpartition`` where the namespace has it, else a
    sort) and the picks are made among them. With ``radius``, only the window around
    the prediction is gathered.

    Parameters
    ----------
    corr : array, shape (n, Hp, Wp)
    k : int
    expected_shift : array, shape (n, 2), optional
        With ``radius``: only look within ``radius`` (correlation pixels) of it.
    near : int
        With ``expected_shift`` and ``radius``: the ``k`` peaks are searched anywhere,
        and ``near`` more within ``radius`` of the prediction (the same as two calls,
        concatenated, in one: the correlation's extremes are found once).

    Returns
    -------
    shift : array, shape (n, k + near, 2), float
        Candidate shifts ``(y, x)`` of ``b`` relative to ``a`` (correlation pixels),
        highest peak first; NaN where the correlation has fewer than ``k`` distinct
        values above its minimum (a flat correlation has none).
    index : array, shape (n, k + near, 2), int
        Integer ``(row, col)`` of each candidate in the correlation array.
    """
    xp = array_namespace(corr)
    dev = device_of(corr)
    n, hp, wp = corr.shape
    windowed = expected_shift is not None and radius is not None
    if near and not windowed:
        raise ValueError("top_peaks: near > 0 needs expected_shift and radius")
    lowest = xp.min(corr, axis=(-2, -1), keepdims=True)
    searches = [(k, None), (near, expected_shift)] if near else [(k, expected_shift)]
    found, highest = [], None
    for count, expected in searches:
        # rows, cols: (n, H) and (n, W), the correlation index of each row/col of `work`.
        work, rows, cols, circular, exclude = _peak_search_region(
            corr, exclude_radius, separation, expected, radius, lowest)
        _, h, w = work.shape
        pos, value, top = _greedy_peaks(work, count, separation, circular, exclude, lowest)
        if expected is None:
            highest = top  # the pool holds the correlation's maximum
        row_idx = xp.arange(n, device=dev)[:, None]
        found.append((
            xp.reshape(xp.take(xp.reshape(rows, (-1,)),
                               xp.reshape(row_idx * h + pos // w, (-1,))), (n, count)),
            xp.reshape(xp.take(xp.reshape(cols, (-1,)),
                               xp.reshape(row_idx * w + pos % w, (-1,))), (n, count)),
            value))
    py, px, value = (xp.concat(list(part), axis=1) for part in zip(*found, strict=True))
    if highest is None:
        highest = xp.reshape(xp.max(corr, axis=(-2, -1)), (n,))
    lowest = xp.reshape(lowest, (n,))
    tiny = 1e-6 * xp.maximum(xp.abs(highest), xp.abs(lowest))
    none = (value <= lowest[:, None]) | (highest - lowest <= tiny)[:, None]
    index = xp.stack([py, px], axis=2)
    _, disp = _subpixel(corr, index)
    shift = xp.where(none[:, :, None], xp.asarray(math.nan, dtype=disp.dtype, device=dev),
                     -disp)
    return shift, index


def _peak_search_region(corr: Any, exclude_radius: int, separation: int, expected_shift: Any,
                        radius: float | None, lowest: Any) -> tuple[Any, Any, Any, bool, int]:
    """The values :func:`top_peaks` searches, the excluded ones set to ``lowest``.

    Returns ``(work, rows, cols, circular, exclude)``: ``work`` is the whole
    correlation (``circular``) or, with a radius small enough not to wrap onto itself,
    the square window around each prediction; ``rows[i, r]``/``cols[i, c]`` are the
    correlation's row/column at ``work[i, r, c]``. Without a radius ``work`` is ``corr``
    itself (no full-size copy) and the zero-shift box of half-width ``exclude`` is left
    for :func:`_greedy_peaks` to drop.
    """
    xp = array_namespace(corr)
    dev = device_of(corr)
    n, hp, wp = corr.shape
    windowed = expected_shift is not None and radius is not None
    half = int(math.ceil(radius)) if windowed else 0
    if windowed and 2 * half + 1 + 2 * separation < min(hp, wp):
        ey = xp.astype(expected_shift[:, 0], corr.dtype)
        ex = xp.astype(expected_shift[:, 1], corr.dtype)
        offsets = xp.arange(-half, half + 1, device=dev)
        # The peak for shift s sits at displacement d = -s.
        rows = (xp.astype(xp.round(-ey), offsets.dtype)[:, None] + offsets[None, :]) % hp
        cols = (xp.astype(xp.round(-ex), offsets.dtype)[:, None] + offsets[None, :]) % wp
        flat = xp.reshape(corr, (n * hp * wp,))
        grid = ((xp.arange(n, device=dev) * (hp * wp))[:, None, None]
                + rows[:, :, None] * wp + cols[:, None, :])
        size = 2 * half + 1
        work = xp.reshape(xp.take(flat, xp.reshape(grid, (-1,))), (n, size, size))
        dy = xp.astype(rows - hp * xp.astype(rows >= (hp + 1) // 2, rows.dtype), corr.dtype)
        dx = xp.astype(cols - wp * xp.astype(cols >= (wp + 1) // 2, cols.dtype), corr.dtype)
        keep = ((dy + ey[:, None]) ** 2)[:, :, None] + ((dx + ex[:, None]) ** 2)[:, None, :] \
            <= radius**2
        if exclude_radius > 0:
            keep = keep & ~((xp.abs(dy) <= exclude_radius)[:, :, None]
                            & (xp.abs(dx) <= exclude_radius)[:, None, :])
        return xp.where(keep, work, lowest), rows, cols, False, 0
    dy = signed_indices(hp, xp=xp, device=dev)
    dx = signed_indices(wp, xp=xp, device=dev)
    work = corr
    if windowed:
        if exclude_radius > 0:
            near_zero = ((xp.abs(dy) <= exclude_radius)[:, None]
                         & (xp.abs(dx) <= exclude_radius)[None, :])
            work = xp.where(near_zero[None, ...], lowest, work)
        ey = xp.astype(expected_shift[:, 0], corr.dtype)[:, None, None]
        ex = xp.astype(expected_shift[:, 1], corr.dtype)[:, None, None]
        fy = xp.astype(dy, corr.dtype)[None, :, None]
        fx = xp.astype(dx, corr.dtype)[None, None, :]
        work = xp.where((fy + ey) ** 2 + (fx + ex) ** 2 <= radius**2, work, lowest)
        exclude_radius = 0  # done
    rows = xp.broadcast_to(xp.arange(hp, device=dev)[None, :], (n, hp))
    cols = xp.broadcast_to(xp.arange(wp, device=dev)[None, :], (n, wp))
    return work, rows, cols, True, exclude_radius


def _greedy_peaks(work: Any, k: int, separation: int, circular: bool, exclude: int,
                  fill: Any) -> tuple[Any, Any, Any]:
    """Flat positions and values ``(n, k)`` of the greedy picks of :func:`top_peaks`, and
    the highest value of ``work`` (n,).

    ``exclude > 0`` (circular ``work`` only): the zero-shift box of that half-width
    counts as ``fill`` (shape ``(n, 1, 1)``).
    """
    xp = array_namespace(work)
    dev = device_of(work)
    n, h, w = work.shape
    size = h * w
    flat = xp.reshape(work, (n, size))
    # Each pick suppresses at most (2 separation + 1)^2 values, and the excluded box can
    # hold more of the highest raw values: the picks are among this many.
    pool = min((k - 1) * (2 * separation + 1) ** 2 + 1 + (2 * exclude + 1) ** 2, size)
    pos = _highest(flat, pool)
    value = xp.take_along_axis(flat, pos, axis=1)
    top = xp.max(value, axis=1)
    if exclude > 0:
        sy = xp.abs(pos // w - h * xp.astype(pos // w >= (h + 1) // 2, pos.dtype))
        sx = xp.abs(pos % w - w * xp.astype(pos % w >= (w + 1) // 2, pos.dtype))
        value = xp.where((sy <= exclude) & (sx <= exclude), xp.reshape(fill, (n, 1)), value)
    if is_numpy_namespace(xp):  # native fast path: the same picks in a third of the calls
        return (*_greedy_numpy(pos, value, k, separation, (h, w), circular), top)
    # In ascending position, then stably by descending value: the order in which repeated
    # argmax over the whole array would visit them.
    order = xp.argsort(pos, axis=1, stable=True)
    pos, value = xp.take_along_axis(pos, order, axis=1), xp.take_along_axis(value, order, axis=1)
    order = xp.argsort(value, axis=1, descending=True, stable=True)
    pos, value = xp.take_along_axis(pos, order, axis=1), xp.take_along_axis(value, order, axis=1)
    cy, cx = pos // w, pos % w
    alive = xp.ones((n, pool), dtype=xp.bool, device=dev)
    lowest = xp.min(value, axis=1)
    picks, values = [], []
    for _ in range(k):
        j = xp.argmax(xp.astype(alive, xp.int8), axis=1)[:, None]  # the first one alive
        pick = xp.take_along_axis(pos, j, axis=1)[:, 0]
        # Nothing left alive: report the pool's lowest value, so the pick is "none".
        val = xp.where(xp.any(alive, axis=1), xp.take_along_axis(value, j, axis=1)[:, 0], lowest)
        picks.append(pick)
        values.append(val)
        ddy = xp.abs(cy - (pick // w)[:, None])
        ddx = xp.abs(cx - (pick % w)[:, None])
        if circular:
            ddy = xp.minimum(ddy, h - ddy)
            ddx = xp.minimum(ddx, w - ddx)
        alive = alive & ~((ddy <= separation) & (ddx <= separation))
    return xp.stack(picks, axis=1), xp.stack(values, axis=1), top


def _greedy_numpy(pos: Any, value: Any, k: int, separation: int, shape: tuple[int, int],
                  circular: bool) -> tuple[Any, Any]:
    """:func:`_greedy_peaks`'s picks on NumPy: one ``lexsort`` and flat indexing
    (``take_along_axis`` and the namespace wrappers cost more than the work here)."""
    import numpy as np

    n, pool = pos.shape
    order = np.lexsort((pos, -value), axis=1)  # descending value, then ascending position
    rows = np.arange(n)[:, None]
    pos, value = pos[rows, order], value[rows, order]
    h, w = shape
    cy, cx = np.divmod(pos, w)
    alive = np.ones((n, pool), dtype=bool)
    lowest = value.min(axis=1)
    picks = np.empty((n, k), dtype=pos.dtype)
    values = np.empty((n, k), dtype=value.dtype)
    rows = rows[:, 0]
    for c in range(k):
        j = alive.argmax(axis=1)  # the first one alive
        picks[:, c] = pos[rows, j]
        # Nothing left alive: report the pool's lowest value, so the pick is "none".
        values[:, c] = np.where(alive[rows, j], value[rows, j], lowest)
        ddy = np.abs(cy - cy[rows, j][:, None])
        ddx = np.abs(cx - cx[rows, j][:, None])
        if circular:
            np.minimum(ddy, h - ddy, out=ddy)
            np.minimum(ddx, w - ddx, out=ddx)
        alive &= (ddy > separation) | (ddx > separation)
    return picks, values


def _highest(flat: Any, count: int) -> Any:
    """Positions ``(n, count)`` of the ``count`` highest values of each row (any order)."""
    xp = array_namespace(flat)
    n, size = flat.shape
    if count >= size:
        return xp.broadcast_to(xp.arange(size, device=device_of(flat))[None, :], (n, size))
    if is_numpy_namespace(xp) and size >= 4 * count:
        import numpy as np

        # Split each row into `blocks` strided blocks: the count-th highest block maximum
        # is at most the row's count-th highest value, so every value above it lies in a
        # block whose maximum is above it too. One pass over the row (the block maxima),
        # then only those blocks are read; sqrt(size * count) blocks balance the two.
        blocks = max(count, math.isqrt(size * count))
        length = size // blocks
        maxima = np.max(np.reshape(flat[:, :length * blocks], (n, length, blocks)), axis=1)
        floor = np.partition(maxima, blocks - count, axis=1)[:, blocks - count]
        steps = np.arange(length)[:, None] * blocks
        tail = np.arange(length * blocks, size)  # the partial last block: always read
        out = np.empty((n, count), dtype=np.intp)
        for i in range(n):
            row = flat[i]
            above = np.concatenate([(steps + np.flatnonzero(maxima[i] >= floor[i])).ravel(),
                                    tail])
            above = above[row[above] >= floor[i]]
            out[i] = above[np.argpartition(row[above], above.size - count)[above.size - count:]]
        return xp.asarray(out)
    argpartition = getattr(xp, "argpartition", None)
    if argpartition is not None:
        return argpartition(flat, size - count, axis=1)[:, size - count:]
    return xp.argsort(flat, axis=1, descending=True, stable=True)[:, :count]


def _subpixel(corr: Any, index: Any) -> tuple[Any, Any]:
    """Signed integer displacements ``(..., 2)`` of the peaks at ``index`` (``(n, ..., 2)``
    rows and columns of ``corr``) and their sub-pixel refinements (float), from one
    gather of each peak and its four neighbours."""
    xp = array_namespace(corr, index)
    dev = device_of(corr)
    n, hp, wp = corr.shape
    lead = (n,) + (1,) * (index.ndim - 2)
    size = xp.asarray([hp, wp], dtype=index.dtype, device=dev)
    # The peak, the neighbours before it (row, col), the neighbours after it (row, col).
    step = xp.asarray([[0, 0], [-1, 0], [0, -1], [1, 0], [0, 1]], dtype=index.dtype, device=dev)
    at = (index[..., None, :] + step) % size  # (n, ..., 5, 2)
    base = xp.reshape(xp.arange(n, dtype=index.dtype, device=dev) * (hp * wp), lead + (1,))
    values = xp.take(xp.reshape(corr, (-1,)),
                     xp.reshape(base + at[..., 0] * wp + at[..., 1], (-1,)))
    values = xp.reshape(values, tuple(index.shape[:-1]) + (5,))
    sub = _parabolic_offset(values[..., 1:3], values[..., 0:1], values[..., 3:5], xp)
    signed = index - size * xp.astype(index >= (size + 1) // 2, index.dtype)
    return signed, xp.astype(signed, corr.dtype) + sub


def _parabolic_offset(left: Any, centre: Any, right: Any, xp: Any) -> Any:
    """Vertex of the parabola through three equally spaced samples, in [-0.5, 0.5]."""
    curvature = left - 2 * centre + right
    safe = xp.where(curvature < 0, curvature, xp.ones_like(curvature))
    offset = xp.where(curvature < 0, (left - right) / (2 * safe), xp.zeros_like(curvature))
    return xp.clip(offset, -0.5, 0.5)
