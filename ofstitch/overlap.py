r"""Overlap scores: how well two tiles match where they overlap at an integer shift.

:func:`overlap_ncc` is the kernel (a 0-d array on the tiles' device, no host
transfer). :func:`overlap_similarity` is the same as a Python float, for tests and
one-off checks. The streaming correlation scores many candidate shifts at once: for
each it takes the five sums of :func:`overlap_sums` on the device (no temporaries but
the sums), brings a whole batch's sums back in one transfer, and
:func:`ncc_from_sums` turns them into the same NCCs on the host, in float64:

.. math:: r = \frac{\sum ab - \sum a \sum b / n}
                   {\sqrt{(\sum a^2 - (\sum a)^2 / n)(\sum b^2 - (\sum b)^2 / n)}}.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, is_numpy_namespace
from array_api_compat import device as device_of

# An overlap whose variance is below this fraction of its mean square is flat: its NCC
# is 0 (the sums of float32 rows cannot tell its variance from their own rounding).
FLAT_VARIANCE_FRACTION = 1e-5


def overlap_area(shape: tuple[int, int], shift_yx: tuple[int, int]) -> int:
    """Pixels two tiles of ``shape`` share at the integer shift ``shift_yx``."""
    h, w = shape
    return max(h - abs(int(shift_yx[0])), 0) * max(w - abs(int(shift_yx[1])), 0)


def overlap_ncc(tile_a: Any, tile_b: Any, shift_yx: tuple[int, int]) -> Any:
    """Normalised cross-correlation of the region two tiles share at an integer shift,
    as a 0-d array on the tiles' device (no host transfer).

    ``shift_yx`` is the position of ``tile_b`` relative to ``tile_a``. In [-1, 1];
    0 when the overlap is flat or empty.
    """
    xp = array_namespace(tile_a, tile_b)
    h, w = tile_a.shape
    sy, sx = int(shift_yx[0]), int(shift_yx[1])
    if overlap_area((h, w), (sy, sx)) == 0:
        return xp.zeros((), dtype=tile_a.dtype, device=device_of(tile_a))
    a = tile_a[max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)]
    b = tile_b[max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
    a = a - xp.mean(a)
    b = b - xp.mean(b)
    denom = xp.sqrt(xp.sum(a * a) * xp.sum(b * b))
    flat = denom == 0
    return xp.where(flat, xp.zeros_like(denom), xp.sum(a * b) / xp.where(flat, 1, denom))


def overlap_sums(tile_a: Any, tile_b: Any, shift_yx: tuple[int, int]) -> Any:
    """The sums ``(a, b, a^2, b^2, ab)`` over the region two tiles share at an integer
    shift (``shift_yx`` of ``tile_b`` relative to ``tile_a``), as a ``(5,)`` float64 array
    on the tiles' device (no host transfer); zeros when the overlap is empty. See
    :func:`ncc_from_sums`."""
    xp = array_namespace(tile_a, tile_b)
    h, w = tile_a.shape
    sy, sx = int(shift_yx[0]), int(shift_yx[1])
    if overlap_area((h, w), (sy, sx)) == 0:
        return xp.zeros((5,), dtype=xp.float64, device=device_of(tile_a))
    a = tile_a[max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)]
    b = tile_b[max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
    # The sums in float64, the products of each row in the tiles' dtype: the NCC keeps
    # float32 precision on filtered (zero-mean) tiles; a mean m standard deviations from
    # zero costs about m^2 float32 epsilons (1e-5 at m = 40).
    f64 = xp.float64
    if is_numpy_namespace(xp):  # native fast path: row dot products, no temporaries
        import numpy as np

        return np.asarray([a.sum(dtype=f64), b.sum(dtype=f64),
                           np.vecdot(a, a).sum(dtype=f64), np.vecdot(b, b).sum(dtype=f64),
                           np.vecdot(a, b).sum(dtype=f64)])
    return xp.stack([xp.sum(a, dtype=f64), xp.sum(b, dtype=f64),
                     xp.sum(xp.vecdot(a, a), dtype=f64), xp.sum(xp.vecdot(b, b), dtype=f64),
                     xp.sum(xp.vecdot(a, b), dtype=f64)])


def overlap_sums_many(tiles_a: list, tiles_b: list, shifts: list[tuple[int, int]], *,
                      max_values: int = 2**22) -> Any:
    """:func:`overlap_sums` of many overlaps: ``(m, 5)`` float64 on the tiles' device.

    ``tiles_a[i]`` and ``tiles_b[i]`` (2-d, all of one shape; the same array may recur)
    overlap at ``shifts[i]``; at least one overlap. On NumPy, one overlap at a time
    (slices and row dot products). Elsewhere the overlaps are gathered, zero-padded to
    the largest of a chunk of about ``max_values`` values, and summed together: a fixed
    number of array operations (kernel launches on a GPU) per chunk, not per overlap;
    overlaps of similar shapes share a chunk, so little is padding.
    """
    xp = array_namespace(*tiles_a, *tiles_b)
    if is_numpy_namespace(xp):
        return xp.stack([overlap_sums(a, b, s) for a, b, s in zip(tiles_a, tiles_b, shifts,
                                                                   strict=True)])
    import numpy as np  # host bookkeeping only: offsets and shapes of the overlaps

    h, w = tiles_a[0].shape
    slot: dict[int, int] = {}  # id of a tile -> its place in the stack
    distinct = []
    for t in [*tiles_a, *tiles_b]:
        if id(t) not in slot:
            slot[id(t)] = len(distinct)
            distinct.append(t)
    values = xp.reshape(xp.stack(distinct), (-1,))
    sy, sx = np.asarray(shifts, dtype=np.int64).reshape(-1, 2).T
    rows, cols = np.maximum(h - np.abs(sy), 0), np.maximum(w - np.abs(sx), 0)
    start_a = (np.asarray([slot[id(t)] for t in tiles_a]) * (h * w)
               + np.maximum(sy, 0) * w + np.maximum(sx, 0))
    start_b = (np.asarray([slot[id(t)] for t in tiles_b]) * (h * w)
               + np.maximum(-sy, 0) * w + np.maximum(-sx, 0))
    chunks: list[list[int]] = [[]]
    r_max = c_max = 0
    for j in np.lexsort((cols, rows)).tolist():  # similar shapes side by side
        r_new, c_new = max(r_max, int(rows[j])), max(c_max, int(cols[j]))
        if chunks[-1] and (len(chunks[-1]) + 1) * r_new * c_new > max_values:
            chunks.append([])
            r_new, c_new = int(rows[j]), int(cols[j])
        chunks[-1].append(j)
        r_max, c_max = r_new, c_new
    sums = xp.concat([_padded_sums(values, np.asarray(jobs), rows, cols, start_a, start_b, w)
                      for jobs in chunks], axis=0)
    order = np.concatenate([np.asarray(jobs) for jobs in chunks])
    return xp.take(sums, xp.asarray(np.argsort(order).tolist(), device=device_of(values)),
                   axis=0)


def _padded_sums(values: Any, jobs: Any, rows: Any, cols: Any, start_a: Any, start_b: Any,
                 w: int) -> Any:
    """:func:`overlap_sums_many` of the overlaps ``jobs`` (host indices into the host
    arrays ``rows, cols, start_a, start_b``) from the flat tile stack ``values``."""
    xp = array_namespace(values)
    dev = device_of(values)
    r, c = max(int(rows[jobs].max()), 1), max(int(cols[jobs].max()), 1)

    def on_device(x: Any) -> Any:
        return xp.asarray(x[jobs].tolist(), dtype=xp.int64, device=dev)[:, None, None]

    ry = xp.arange(r, dtype=xp.int64, device=dev)[None, :, None]
    cx = xp.arange(c, dtype=xp.int64, device=dev)[None, None, :]
    inside = (ry < on_device(rows)) & (cx < on_device(cols))
    step = ry * w + cx
    f64 = xp.float64
    out = []
    for start in (start_a, start_b):
        at = xp.where(inside, on_device(start) + step, xp.zeros_like(step))
        gathered = xp.reshape(xp.take(values, xp.reshape(at, (-1,))), tuple(at.shape))
        out.append(xp.where(inside, gathered, xp.zeros_like(gathered)))
    a, b = out
    return xp.stack([xp.sum(a, axis=(1, 2), dtype=f64), xp.sum(b, axis=(1, 2), dtype=f64),
                     xp.sum(a * a, axis=(1, 2), dtype=f64), xp.sum(b * b, axis=(1, 2), dtype=f64),
                     xp.sum(a * b, axis=(1, 2), dtype=f64)], axis=1)


def ncc_from_sums(sums: Any, area: Any) -> Any:
    """Overlap NCCs ``(m,)`` (host NumPy, float64) from the :func:`overlap_sums` ``(m, 5)``
    of overlaps of ``area`` ``(m,)`` pixels: in [-1, 1]; 0 when an overlap is flat or
    empty (as :func:`overlap_ncc`)."""
    import numpy as np

    sums = np.asarray(sums, dtype=np.float64)
    n = np.maximum(np.asarray(area, dtype=np.float64), 1.0)
    sa, sb, saa, sbb, sab = sums.T
    var_a, var_b = saa - sa * sa / n, sbb - sb * sb / n
    flat = ((var_a <= FLAT_VARIANCE_FRACTION * saa) | (var_b <= FLAT_VARIANCE_FRACTION * sbb)
            | (np.asarray(area) <= 0))
    denom = np.sqrt(np.where(flat, 1.0, var_a * var_b))
    return np.where(flat, 0.0, np.clip((sab - sa * sb / n) / denom, -1.0, 1.0))


def overlap_similarity(tile_a: Any, tile_b: Any, shift_yx: tuple[int, int], *,
                       min_area: int = 1, margin: int = 0) -> float:
    """:func:`overlap_ncc` as a Python float (one host transfer: for tests and one-off
    checks, never in a loop over pairs).

    Returns -1 when the overlap has fewer than ``min_area`` pixels (too small to
    tell anything). ``margin`` pixels at each tile's edges are left out (a filtered
    tile rings there, and the rings of two tiles side by side would match each
    other, not the sample).
    """
    if margin > 0:
        tile_a = tile_a[margin:-margin, margin:-margin]
        tile_b = tile_b[margin:-margin, margin:-margin]
    if overlap_area(tile_a.shape, shift_yx) < max(min_area, 1):
        return -1.0 if min_area > 1 else 0.0
    return float(overlap_ncc(tile_a, tile_b, shift_yx))


def unwrap_candidates(index_yx: tuple[int, int], fft_shape: tuple[int, int]
                      ) -> list[tuple[int, int]]:
    """The shifts ``(y, x)`` an unpadded (circular) correlation peak can stand for."""
    (iy, ix), (hp, wp) = index_yx, fft_shape
    ys = [-iy] if iy == 0 else [-iy, hp - iy]
    xs = [-ix] if ix == 0 else [-ix, wp - ix]
    return [(y, x) for y in ys for x in xs]
