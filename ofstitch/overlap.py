"""Overlap scores: how well two tiles match where they overlap at an integer shift.

:func:`overlap_ncc` is the kernel (a 0-d array on the tiles' device, no host
transfer): the streaming correlation scores each candidate peak with it and brings
a whole batch's scores back in one transfer. :func:`overlap_similarity` is the same
as a Python float, for tests and one-off checks.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of


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
