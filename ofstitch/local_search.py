r"""The constrained local search (as MIST does), for pairs placement could not locate.

The streamed correlation (:mod:`ofstitch.stream`) scores a handful of candidate peaks on
tiles binned 2x2. On small overlaps (a 14 px strip of a 48x64 tile is 7 binned rows) the
best of those can read a few pixels short, or the true shift may not be a candidate at
all. Here a pair's overlap NCC is evaluated at *every* integer shift within a window
(the stage model's repeatability) around the predicted shift, on the full-resolution,
high-pass filtered tiles, and the best is refined to a sub-pixel shift.

The NCC at shift :math:`s` of the region both tiles share,

.. math:: r(s) = \frac{\sum ab - \sum a \sum b / n}
                      {\sqrt{(\sum a^2 - (\sum a)^2 / n)(\sum b^2 - (\sum b)^2 / n)}},

needs :math:`\sum ab` for every shift (one cross-correlation, by FFT) and the sums of
:math:`a, a^2, b, b^2` over the shared rectangle (products with 0/1 matrices): the exact
overlap NCC of :func:`ofstitch.overlap.overlap_ncc`, at every shift of the window at once.
Only what the window can overlap is read (each pair's tiles are cropped to the overlap
at the centre grown by the window), and the FFT is only as long as the window's shifts
need; each tile is filtered once (:func:`high_pass`), only where its pairs read it
(:func:`_needed_boxes`). The surfaces of a whole batch come back to the host in one
transfer.

A reading is *located* when its optimum is clear in every direction: it is inside the
window (not on its border), and nothing further than :data:`CLEAR_RADIUS_PX` from it
scores within :data:`significance.RIVAL_Z` (Fisher z) of it: a straight edge leaves a
ridge, a repeat a second peak. Whether it is *significant* is for the caller to judge
against the same search on the chance-level pairs (:func:`search_pairs` does both kinds).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from array_api_compat import array_namespace, is_numpy_namespace

from . import correlate, tiles
from .backends import Backend, to_device, to_host
from .significance import RIVAL_R, RIVAL_Z, fisher_z

# Tiles are high-pass filtered at this sigma (full-resolution pixels), as the candidates'
# scores are (stream.SCORE_HIGH_PASS_SIGMA binned pixels, binned 2x2).
HIGH_PASS_SIGMA_PX = 4.0
REFLECT_SIGMAS = 6.0  # how far tiles are mirrored before the high-pass (its reach)
# A shift must leave at least this fraction of the predicted overlap to be scored.
MIN_OVERLAP_FRACTION = 0.2
# Nothing further than this from the optimum may score about as well (a ridge, a repeat).
CLEAR_RADIUS_PX = 3.0
MAX_RADIUS_PX = 96  # the window is never wider than this (a stage sigma of 32 px)
BATCH_BYTES = 64 * 2**20  # device memory for a batch's padded spectra
DECODE_AHEAD = 4  # tiles decoded ahead of the batch that needs them


@dataclass(frozen=True)
class LocalReadings:
    """What the local search found for ``m`` pairs.

    Attributes
    ----------
    shift_px : ndarray, shape (m, 2)
        Sub-pixel shift of the best NCC within the window (NaN: not searched, or none).
    score : ndarray, shape (m,)
        Its overlap NCC (full resolution).
    located : ndarray, shape (m,), bool
        A clear optimum in both directions, inside the window.
    area : ndarray, shape (m,)
        Pixels of the overlap at that shift.
    ncc : ndarray, shape (m,)
        The overlap NCC at the reading's integer shift, unscaled (``score`` is scaled to
        the predicted overlap's area, see :func:`_read`).
    """

    shift_px: np.ndarray
    score: np.ndarray
    located: np.ndarray
    area: np.ndarray
    ncc: np.ndarray

    @classmethod
    def empty(cls, m: int) -> LocalReadings:
        return cls(np.full((m, 2), np.nan), np.full(m, np.nan), np.zeros(m, bool),
                   np.zeros(m), np.full(m, np.nan))

    def take(self, index: np.ndarray) -> LocalReadings:
        return LocalReadings(*(getattr(self, name)[index] for name in FIELDS))

    def put(self, index: np.ndarray, other: LocalReadings) -> None:
        for name in FIELDS:
            getattr(self, name)[index] = getattr(other, name)


FIELDS = ("shift_px", "score", "located", "area", "ncc")


def search_pairs(paths: list[Path], pairs: np.ndarray, centre: np.ndarray, radius: float,
                 tile_shape: tuple[int, int], backend: Backend) -> LocalReadings:
    """The local search of ``pairs`` (tile ``b`` relative to tile ``a``) around
    ``centre`` ``(m, 2)`` px, within ``radius`` px, on full-resolution tiles.

    Tiles are decoded (and on the CPU filtered) on a thread per core, in the order of
    ``pairs``, :data:`DECODE_AHEAD` tiles ahead of need, and dropped after their last
    pair; a tile that cannot be read leaves its pairs unsearched.
    """
    m = len(pairs)
    out = LocalReadings.empty(m)
    if m == 0:
        return out
    xp = backend.xp
    h, w = tile_shape
    r = half_width(radius)
    fft_shape = (scipy.fft.next_fast_len(2 * h, real=True),
                 scipy.fft.next_fast_len(2 * w, real=True))
    per_pair = 2 * 8 * fft_shape[0] * (fft_shape[1] // 2 + 1) + 16 * h * w
    batch = max(1, min(64, BATCH_BYTES // per_pair))
    last_use = {t: k for k, p in enumerate(pairs.tolist()) for t in p}
    order = list(dict.fromkeys(pairs.ravel().tolist()))  # tiles in the order first needed
    rank = {t: i for i, t in enumerate(order)}
    on_host = is_numpy_namespace(xp)

    at_all = np.round(centre).astype(np.int64)
    boxes = _needed_boxes(pairs, at_all, r, tile_shape)

    def load(t: int) -> Any:  # on the CPU, filtered on the decoding thread too
        grey = tiles.read_grey(paths[t], 1.0, shape=tile_shape)
        ext, box = _extended(boxes[t], tile_shape, HIGH_PASS_SIGMA_PX)
        crop = grey[ext[0]:ext[1], ext[2]:ext[3]]
        if not on_host:
            return crop, ext, box
        return _cut(high_pass(crop[None], HIGH_PASS_SIGMA_PX)[0, ...], ext, box)

    live: dict[int, Any] = {}
    bad: set[int] = set()
    loading: dict[int, Future] = {}
    submitted = 0
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="ofstitch-local") as pool:
        for start in range(0, m, batch):
            stop = min(m, start + batch)
            sel = pairs[start:stop]
            # This batch's tiles and the next DECODE_AHEAD, decoded on every core.
            until = max(rank[t] for t in sel.ravel().tolist()) + 1 + DECODE_AHEAD
            while submitted < min(until, len(order)):
                loading[order[submitted]] = pool.submit(load, order[submitted])
                submitted += 1
            for t in dict.fromkeys(sel.ravel().tolist()):
                if t not in loading:
                    continue
                try:
                    loaded = loading.pop(t).result()
                except tiles.TileReadError:
                    bad.add(t)
                    continue
                if not on_host:
                    crop, ext, box = loaded
                    loaded = _cut(high_pass(to_device(crop[None], backend),
                                            HIGH_PASS_SIGMA_PX)[0, ...], ext, box)
                live[t] = loaded
            ok = np.array([a not in bad and b not in bad for a, b in sel.tolist()], bool)
            rows = np.flatnonzero(ok)
            if len(rows):
                at = at_all[start:stop][rows]
                surfaces = _surfaces([live[int(a)] for a in sel[rows, 0]],
                                     [live[int(b)] for b in sel[rows, 1]], at, r, xp,
                                     tile_shape)
                out.put(start + rows, _read(to_host(surfaces).astype(np.float64), at, r, radius,
                                            tile_shape, centre[start:stop][rows]))
            for t in list(live):
                if last_use[t] < stop:
                    del live[t]
    return out


def half_width(radius: float) -> int:
    """Half the side of the square window of shifts searched for ``radius`` px."""
    return int(min(max(math.ceil(radius), 1), MAX_RADIUS_PX))


def window(centre: np.ndarray, radius: float) -> tuple[int, int, int]:
    """The integer window a pair is searched in around ``centre`` ``(2,)`` within
    ``radius``: its centre (rounded, as :func:`search_pairs` rounds it) and half side."""
    cy, cx = np.round(np.asarray(centre, dtype=np.float64)).astype(np.int64).tolist()
    return cy, cx, half_width(radius)


Box = tuple[int, int, int, int]  # rows [y0, y1), columns [x0, x1) of a tile


def _needed_boxes(pairs: np.ndarray, centre: np.ndarray, r: int, tile_shape: tuple[int, int]
                  ) -> dict[int, Box]:
    """Per tile, the smallest box holding every crop its pairs' surfaces read
    (:func:`_window_span` at each pair's integer ``centre``); ``(0, 0, 0, 0)`` when
    they read nothing."""
    h, w = tile_shape
    boxes: dict[int, list[Box]] = {}
    for (a, b), (cy, cx) in zip(pairs.tolist(), centre.tolist(), strict=True):
        ya0, ya1, yb0, yb1 = _window_span(int(cy), r, h)
        xa0, xa1, xb0, xb1 = _window_span(int(cx), r, w)
        for t, box in ((a, (ya0, ya1, xa0, xa1)), (b, (yb0, yb1, xb0, xb1))):
            boxes.setdefault(t, [])
            if box[1] > box[0] and box[3] > box[2]:
                boxes[t].append(box)
    return {t: (min(b[0] for b in bs), max(b[1] for b in bs), min(b[2] for b in bs),
                max(b[3] for b in bs)) if bs else (0, 0, 0, 0)
            for t, bs in boxes.items()}


def _extended(box: Box, tile_shape: tuple[int, int], sigma: float) -> tuple[Box, Box]:
    """``(ext, box)``: the part of a tile to filter for ``box``, and ``box`` itself.

    ``ext`` is ``box`` grown by :data:`REFLECT_SIGMAS` sigma on each side (as far as the
    tile goes), then to a fast transform length: the high-pass of ``ext`` equals that of
    the whole tile inside ``box`` (the filter's weight that far out is below 1e-7, and at
    the tile's own borders both are mirrored), for the transform of a crop.
    """
    pad = math.ceil(REFLECT_SIGMAS * sigma)
    ext = []
    for lo, hi, n in ((box[0], box[1], tile_shape[0]), (box[2], box[3], tile_shape[1])):
        lo, hi = max(lo - pad, 0), min(hi + pad, n)
        more = min(n, scipy.fft.next_fast_len(max(hi - lo, 1), real=True)) - (hi - lo)
        grow = min(more, n - hi)
        hi, lo = hi + grow, max(lo - (more - grow), 0)
        ext += [lo, hi]
    return (ext[0], ext[1], ext[2], ext[3]), box


def _cut(filtered: Any, ext: Box, box: Box) -> tuple[Any, tuple[int, int]]:
    """The ``box`` of a filtered ``ext`` (see :func:`_extended`), and where it starts in
    its tile: a live tile of :func:`search_pairs`."""
    return (filtered[box[0] - ext[0]:box[1] - ext[0], box[2] - ext[2]:box[3] - ext[2]],
            (box[0], box[2]))


def high_pass(tiles: Any, sigma: float) -> Any:
    """The Gaussian high-pass of :func:`ofstitch.correlate.score_tiles` (unbinned) at a
    fraction of its cost.

    ``score_tiles`` filters the tiles mirrored into a ``(2H, 2W)`` periodic image; here each
    tile is mirrored only :data:`REFLECT_SIGMAS` sigma beyond each border
    and transformed at a fast FFT size. The filter reaches no further than that (its
    weight there is below 1e-7), so inside the tile the result is the same, for a transform
    of about a quarter of the size (a 1640x1232 tile: 0.1 s instead of 0.9 s).

    Parameters
    ----------
    tiles : array, shape (n, H, W), float32
    sigma : float
        Standard deviation (pixels) of the Gaussian removed.

    Returns
    -------
    array, shape (n, H, W), float32
    """
    xp = array_namespace(tiles)
    if is_numpy_namespace(xp):
        # The DCT of the whole mirrored tile is cheaper still on NumPy (616x820: 31 ms
        # against 53 ms), and the same inside the tile.
        return correlate._mirrored_high_pass(
            tiles - xp.mean(tiles, axis=(-2, -1), keepdims=True), sigma, root=False)
    n, h, w = tiles.shape
    pad_y = min(math.ceil(REFLECT_SIGMAS * sigma), h)
    pad_x = min(math.ceil(REFLECT_SIGMAS * sigma), w)
    ext = tiles - xp.mean(tiles, axis=(-2, -1), keepdims=True)
    # Mirrored about the border itself (the edge pixel repeated), as score_tiles mirrors.
    ext = xp.concat([xp.flip(ext[:, :pad_y, :], axis=1), ext,
                     xp.flip(ext[:, h - pad_y:, :], axis=1)], axis=1)
    ext = xp.concat([xp.flip(ext[:, :, :pad_x], axis=2), ext,
                     xp.flip(ext[:, :, w - pad_x:], axis=2)], axis=2)
    shape = (scipy.fft.next_fast_len(h + 2 * pad_y, real=True),
             scipy.fft.next_fast_len(w + 2 * pad_x, real=True))
    weight = correlate.high_pass_filter(shape, sigma, xp=xp, device=_device(tiles),
                                        dtype=tiles.dtype)
    return correlate._irfftn(correlate._rfftn(ext, shape, xp) * weight, shape,
                             xp)[:, pad_y:pad_y + h, pad_x:pad_x + w]


def _surfaces(parts_a: list, parts_b: list, centre: np.ndarray, r: int, xp: Any,
              tile_shape: tuple[int, int]) -> Any:
    """``(k, 2r + 1, 2r + 1)`` overlap NCCs around each integer ``centre`` (NaN where the
    shift leaves less than :data:`MIN_OVERLAP_FRACTION` of the centre's overlap).

    Each pair is cropped first to what its window can overlap (the overlap at the centre,
    grown by ``r`` on each side): the same pixels enter every NCC as with whole tiles,
    and a side of 10-30% of a large tile costs a few times less to correlate. Each tile
    comes as ``(part, (y0, x0))``: the part of a ``tile_shape`` tile from ``(y0, x0)``
    that holds those crops (:func:`_needed_boxes`; a whole tile from ``(0, 0)``).
    """
    return xp.stack([_surface(a, b, (int(cy), int(cx)), r, xp, tile_shape)
                     for a, b, (cy, cx) in zip(parts_a, parts_b, centre.tolist(), strict=True)])


def _window_span(c: int, r: int, n: int) -> tuple[int, int, int, int]:
    """Along one axis of tiles ``n`` long: the rows ``[a0, a1)`` of tile a and ``[b0, b1)``
    of tile b that overlap at some shift within ``c - r .. c + r``."""
    a0, a1 = min(max(c - r, 0), n), max(min(n + min(c + r, 0), n), 0)
    b0, b1 = min(max(-c - r, 0), n), max(min(n + min(-c + r, 0), n), 0)
    return a0, max(a1, a0), b0, max(b1, b0)


def _surface(a: tuple[Any, tuple[int, int]], b: tuple[Any, tuple[int, int]],
             centre: tuple[int, int], r: int, xp: Any, tile_shape: tuple[int, int]) -> Any:
    """One pair's ``(2r + 1, 2r + 1)`` overlap NCCs around ``centre`` (see :func:`_surfaces`;
    ``a`` and ``b`` are ``(part, origin)``)."""
    h, w = tile_shape
    (a, (ay, ax)), (b, (by, bx)) = a, b
    cy, cx = centre
    ya0, ya1, yb0, yb1 = _window_span(cy, r, h)
    xa0, xa1, xb0, xb1 = _window_span(cx, r, w)
    nan = xp.full((2 * r + 1, 2 * r + 1), float("nan"), dtype=xp.float64, device=_device(a))
    if min(ya1 - ya0, yb1 - yb0, xa1 - xa0, xb1 - xb0) < 2:
        return nan
    ca = a[ya0 - ay:ya1 - ay, xa0 - ax:xa1 - ax]
    cb = b[yb0 - by:yb1 - by, xb0 - bx:xb1 - bx]
    (ha, wa), (hb, wb) = ca.shape, cb.shape
    offsets = np.arange(-r, r + 1)
    # Shifts between the crops: the tiles' shift less the crops' offset.
    sy = cy + offsets - (ya0 - yb0)
    sx = cx + offsets - (xa0 - xb0)
    # A circular cross-correlation of length N holds the sums of the shifts s - N and
    # s + N at s as well; they are empty (no pixel pairs) for the window's shifts when
    # N >= ha - min(s) and N >= max(s) + hb: no need for the full ha + hb.
    fft_shape = (scipy.fft.next_fast_len(max(ha, hb, ha - int(sy[0]), int(sy[-1]) + hb),
                                         real=True),
                 scipy.fft.next_fast_len(max(wa, wb, wa - int(sx[0]), int(sx[-1]) + wb),
                                         real=True))
    # sum over the overlap of ca[y, x] cb[y - sy, x - sx], for the window's shifts
    # (negative ones wrapped).
    cross = correlate._irfftn(correlate._rfftn(ca[None, ...], fft_shape, xp) *
                              xp.conj(correlate._rfftn(cb[None, ...], fft_shape, xp)),
                              fft_shape, xp)[0, ...]
    # Rows of ca in the overlap: [max(sy, 0), min(ha, hb + sy)); of cb: shifted by -sy.
    ra0, ra1 = np.clip(sy, 0, ha), np.clip(hb + sy, 0, ha)
    ca0, ca1 = np.clip(sx, 0, wa), np.clip(wb + sx, 0, wa)
    rb0, rb1 = np.clip(-sy, 0, hb), np.clip(ha - sy, 0, hb)
    cb0, cb1 = np.clip(-sx, 0, wb), np.clip(wa - sx, 0, wb)
    n = np.maximum(ra1 - ra0, 0)[:, None] * np.maximum(ca1 - ca0, 0)[None, :]
    n_centre = max(h - abs(cy), 0) * max(w - abs(cx), 0)
    sa, saa = _box_sums(ca, ra0, ra1, ca0, ca1, xp), _box_sums(ca * ca, ra0, ra1, ca0, ca1, xp)
    sb, sbb = _box_sums(cb, rb0, rb1, cb0, cb1, xp), _box_sums(cb * cb, rb0, rb1, cb0, cb1, xp)
    rows = to_index(np.mod(sy, fft_shape[0]), xp, a)
    cols = to_index(np.mod(sx, fft_shape[1]), xp, a)
    sab = xp.take(xp.take(cross, rows, axis=0), cols, axis=1)
    nn = xp.asarray(np.maximum(n, 1).astype(np.float64), device=_device(a))
    num = xp.astype(sab, xp.float64) - sa * sb / nn
    var = (saa - sa * sa / nn) * (sbb - sb * sb / nn)
    good = xp.asarray(n >= max(MIN_OVERLAP_FRACTION * n_centre, 4), device=_device(a))
    good = good & (var > 0)
    ncc = num / xp.sqrt(xp.where(good, var, xp.ones_like(var)))
    return xp.where(good, ncc, nan)


def _device(x: Any) -> Any:
    from array_api_compat import device

    return device(x)


def to_index(values: np.ndarray, xp: Any, like: Any) -> Any:
    return xp.asarray(values.astype(np.int64), device=_device(like))


def _box_sums(x: Any, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray,
              xp: Any) -> Any:
    """``(len(r0), len(c0))``: sums of ``x[r0[i]:r1[i], c0[j]:c1[j]]`` (float64).

    As two products with 0/1 matrices (rows ``i`` of the first select ``r0[i]:r1[i]``):
    one pass of a matrix product over the tile per window row, rather than two cumulative
    sums of the whole tile (which cost more for the windows of a few pixels used here).
    """
    h, w = x.shape
    rows = (np.arange(h)[None, :] >= r0[:, None]) & (np.arange(h)[None, :] < r1[:, None])
    cols = (np.arange(w)[:, None] >= c0[None, :]) & (np.arange(w)[:, None] < c1[None, :])
    dev = _device(x)
    return xp.asarray(rows.astype(np.float64), device=dev) @ (
        xp.astype(x, xp.float64) @ xp.asarray(cols.astype(np.float64), device=dev))


def _read(surfaces: np.ndarray, centre: np.ndarray, r: int, radius: float,
          tile_shape: tuple[int, int], exact_centre: np.ndarray) -> LocalReadings:
    """Each surface's optimum within ``radius`` of ``exact_centre``: sub-pixel shift,
    score, whether it is located, its overlap area (host side).

    Shifts are compared by significance, not by NCC: a smaller overlap matches better by
    chance (Fisher z spreads as ``1 / sqrt(area)``), so each shift's z is scaled by
    ``sqrt(area / area at the centre)``, and the score is ``tanh`` of the best scaled z
    (an NCC as if at the predicted overlap; the chance-level pairs are scored the same
    way). The reading is then the NCC's own maximum next to it (the scaling would pull
    it towards larger overlaps).
    """
    k = len(surfaces)
    out = LocalReadings.empty(k)
    offsets = np.arange(-r, r + 1)
    gy, gx = np.meshgrid(offsets, offsets, indexing="ij")
    h, w = tile_shape
    for i in range(k):
        s = surfaces[i]
        sy = centre[i, 0] + gy
        sx = centre[i, 1] + gx
        inside = np.hypot(sy - exact_centre[i, 0], sx - exact_centre[i, 1]) <= radius
        valid = inside & np.isfinite(s)
        if not valid.any():
            continue
        area = np.maximum(h - np.abs(sy), 0) * np.maximum(w - np.abs(sx), 0)
        a0 = max(h - abs(int(centre[i, 0])), 1) * max(w - abs(int(centre[i, 1])), 1)
        z = np.where(valid, fisher_z(np.where(valid, s, 0.0)) *
                     np.sqrt(np.minimum(area / a0, 1.0)), -np.inf)
        j0 = np.unravel_index(int(np.argmax(z)), s.shape)
        best_z = float(z[j0])
        near = valid & (np.abs(gy - gy[j0]) <= 1) & (np.abs(gx - gx[j0]) <= 1)
        j = np.unravel_index(int(np.argmax(np.where(near, s, -np.inf))), s.shape)
        y, x = j
        out.score[i] = float(np.tanh(best_z))
        out.ncc[i] = float(s[j])
        out.shift_px[i] = (sy[j], sx[j])
        out.area[i] = area[j]
        # Inside the window: every neighbour scored (not on the border, not cut off).
        if not (0 < y < s.shape[0] - 1 and 0 < x < s.shape[1] - 1 and
                valid[y - 1:y + 2, x - 1:x + 2].all() and
                s[j] >= s[y - 1:y + 2, x - 1:x + 2].max()):
            continue
        dy, dx = _subpixel(s[y - 1:y + 2, x - 1:x + 2])
        out.shift_px[i] = (sy[j] + dy, sx[j] + dx)
        far = valid & (np.hypot(gy - gy[j], gx - gx[j]) > CLEAR_RADIUS_PX)
        rival = far & ((z >= best_z - RIVAL_Z) | (np.tanh(z) >= np.tanh(best_z) - RIVAL_R))
        out.located[i] = best_z > 0 and not rival.any()
    return out


def _subpixel(patch: np.ndarray) -> tuple[float, float]:
    """Sub-pixel offset of a 3x3 patch's maximum (a parabola along each axis)."""
    def vertex(left: float, centre: float, right: float) -> float:
        denom = left - 2 * centre + right
        return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5)) if denom < 0 else 0.0

    return vertex(*patch[:, 1]), vertex(*patch[1, :])
