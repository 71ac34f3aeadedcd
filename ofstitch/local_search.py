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

needs :math:`\sum ab` for every shift (one zero-padded cross-correlation, by FFT) and the
sums of :math:`a, a^2, b, b^2` over the shared rectangle (summed-area tables): the exact
overlap NCC of :func:`ofstitch.overlap.overlap_ncc`, at every shift of the window at once.
The surfaces of a whole batch come back to the host in one transfer.

A reading is *located* when its optimum is clear in every direction: it is inside the
window (not on its border), and nothing further than :data:`CLEAR_RADIUS_PX` from it
scores within :data:`significance.RIVAL_Z` (Fisher z) of it: a straight edge leaves a
ridge, a repeat a second peak. Whether it is *significant* is for the caller to judge
against the same search on the chance-level pairs (:func:`search_pairs` does both kinds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft

from . import correlate, tiles
from .backends import Backend, to_device, to_host
from .significance import RIVAL_R, RIVAL_Z, fisher_z

# Tiles are high-pass filtered at this sigma (full-resolution pixels), as the candidates'
# scores are (stream.SCORE_HIGH_PASS_SIGMA binned pixels, binned 2x2).
HIGH_PASS_SIGMA_PX = 4.0
# A shift must leave at least this fraction of the predicted overlap to be scored.
MIN_OVERLAP_FRACTION = 0.2
# Nothing further than this from the optimum may score about as well (a ridge, a repeat).
CLEAR_RADIUS_PX = 3.0
MAX_RADIUS_PX = 96  # the window is never wider than this (a stage sigma of 32 px)
BATCH_BYTES = 64 * 2**20  # device memory for a batch's padded spectra


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

    Tiles are decoded as they are needed (in the order of ``pairs``) and dropped after
    their last pair; a tile that cannot be read leaves its pairs unsearched.
    """
    m = len(pairs)
    out = LocalReadings.empty(m)
    if m == 0:
        return out
    xp = backend.xp
    h, w = tile_shape
    r = int(min(max(math.ceil(radius), 1), MAX_RADIUS_PX))
    fft_shape = (scipy.fft.next_fast_len(2 * h, real=True),
                 scipy.fft.next_fast_len(2 * w, real=True))
    per_pair = 2 * 8 * fft_shape[0] * (fft_shape[1] // 2 + 1) + 16 * h * w
    batch = max(1, min(64, BATCH_BYTES // per_pair))
    last_use = {t: k for k, p in enumerate(pairs.tolist()) for t in p}
    live: dict[int, Any] = {}
    bad: set[int] = set()
    for start in range(0, m, batch):
        stop = min(m, start + batch)
        sel = pairs[start:stop]
        need = [t for t in dict.fromkeys(sel.ravel().tolist()) if t not in live and t not in bad]
        for t in need:
            try:
                grey = tiles.read_grey(paths[t], 1.0, shape=tile_shape)
            except tiles.TileReadError:
                bad.add(t)
                continue
            live[t] = correlate.score_tiles(to_device(grey[None], backend),
                                            high_pass_sigma=HIGH_PASS_SIGMA_PX, binning=1)[0, ...]
        ok = np.array([a not in bad and b not in bad for a, b in sel.tolist()], bool)
        rows = np.flatnonzero(ok)
        if len(rows):
            surfaces = _surfaces([live[int(a)] for a in sel[rows, 0]],
                                 [live[int(b)] for b in sel[rows, 1]],
                                 np.round(centre[start:stop][rows]).astype(np.int64), r,
                                 fft_shape, xp)
            found = _read(to_host(surfaces).astype(np.float64),
                          np.round(centre[start:stop][rows]).astype(np.int64), r, radius,
                          tile_shape, centre[start:stop][rows])
            out.put(start + rows, found)
        for t in list(live):
            if last_use[t] < stop:
                del live[t]
    return out


def _surfaces(tiles_a: list, tiles_b: list, centre: np.ndarray, r: int,
              fft_shape: tuple[int, int], xp: Any) -> Any:
    """``(k, 2r + 1, 2r + 1)`` overlap NCCs around each integer ``centre`` (NaN where the
    shift leaves less than :data:`MIN_OVERLAP_FRACTION` of the centre's overlap)."""
    a = xp.stack(tiles_a)
    b = xp.stack(tiles_b)
    k, h, w = a.shape
    # sum over the overlap of a[y, x] b[y - sy, x - sx], for every shift (negative: wrapped).
    cross = correlate._irfftn(correlate._rfftn(a, fft_shape, xp) *
                              xp.conj(correlate._rfftn(b, fft_shape, xp)), fft_shape, xp)
    offsets = np.arange(-r, r + 1)
    out = []
    for i in range(k):
        sy = centre[i, 0] + offsets
        sx = centre[i, 1] + offsets
        # Rows of a in the overlap: [max(sy, 0), h + min(sy, 0)); of b: shifted by -sy.
        ra0, ra1 = np.clip(sy, 0, h), np.clip(h + np.minimum(sy, 0), 0, h)
        ca0, ca1 = np.clip(sx, 0, w), np.clip(w + np.minimum(sx, 0), 0, w)
        rb0, rb1 = np.clip(-sy, 0, h), np.clip(h + np.minimum(-sy, 0), 0, h)
        cb0, cb1 = np.clip(-sx, 0, w), np.clip(w + np.minimum(-sx, 0), 0, w)
        n = np.maximum(ra1 - ra0, 0)[:, None] * np.maximum(ca1 - ca0, 0)[None, :]
        cy, cx = int(centre[i, 0]), int(centre[i, 1])
        n_centre = max(h - abs(cy), 0) * max(w - abs(cx), 0)
        ai, bi = a[i, ...], b[i, ...]
        sa, saa = _box_sums(ai, ra0, ra1, ca0, ca1, xp), _box_sums(ai * ai, ra0, ra1, ca0, ca1, xp)
        sb, sbb = _box_sums(bi, rb0, rb1, cb0, cb1, xp), _box_sums(bi * bi, rb0, rb1, cb0, cb1, xp)
        rows = to_index(np.mod(sy, fft_shape[0]), xp, ai)
        cols = to_index(np.mod(sx, fft_shape[1]), xp, ai)
        sab = xp.take(xp.take(cross[i, ...], rows, axis=0), cols, axis=1)
        nn = xp.asarray(np.maximum(n, 1).astype(np.float64), device=_device(ai))
        num = xp.astype(sab, xp.float64) - sa * sb / nn
        var = (saa - sa * sa / nn) * (sbb - sb * sb / nn)
        good = xp.asarray(n >= max(MIN_OVERLAP_FRACTION * n_centre, 4), device=_device(ai))
        good = good & (var > 0)
        ncc = num / xp.sqrt(xp.where(good, var, xp.ones_like(var)))
        out.append(xp.where(good, ncc, xp.full_like(ncc, float("nan"))))
    return xp.stack(out)


def _device(x: Any) -> Any:
    from array_api_compat import device

    return device(x)


def to_index(values: np.ndarray, xp: Any, like: Any) -> Any:
    return xp.asarray(values.astype(np.int64), device=_device(like))


def _box_sums(x: Any, r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray,
              xp: Any) -> Any:
    """``(len(r0), len(c0))``: sums of ``x[r0[i]:r1[i], c0[j]:c1[j]]`` (float64)."""
    h, w = x.shape
    table = xp.zeros((h + 1, w + 1), dtype=xp.float64, device=_device(x))
    table[1:, 1:] = xp.cumulative_sum(xp.cumulative_sum(xp.astype(x, xp.float64), axis=0),
                                      axis=1) if hasattr(xp, "cumulative_sum") else \
        xp.cumsum(xp.cumsum(xp.astype(x, xp.float64), axis=0), axis=1)
    r0, r1 = to_index(r0, xp, x), to_index(np.maximum(r1, r0), xp, x)
    c0, c1 = to_index(c0, xp, x), to_index(np.maximum(c1, c0), xp, x)

    def corner(rows: Any, cols: Any) -> Any:
        return xp.take(xp.take(table, rows, axis=0), cols, axis=1)

    return corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)


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
