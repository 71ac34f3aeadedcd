r"""Correlation kernels: batched FFT cross-correlation and peak finding.

Pure functions on device arrays shaped ``(n, H, W)``, written against the
Python array API: the namespace ``xp`` is derived from the inputs and every
output stays on the input's device. No file I/O and no host transfer happen
here (see :mod:`ofstitch.stream` for batching and transfer).

Maths
-----
For two tiles :math:`a` and :math:`b` whose top-left corners sit at
:math:`p_a` and :math:`p_b` in the mosaic, the cross-correlation

.. math:: c(d) = \sum_x a(x)\, b(x + d) = \mathcal{F}^{-1}\big[\overline{A}\, B\big](d)

peaks at :math:`d = p_a - p_b`, so the shift of :math:`b` relative to
:math:`a` is :math:`s = p_b - p_a = -d`. Each tile is first filtered by the
square root of a Gaussian high-pass filter
:math:`H(f) = 1 - \exp(-2\pi^2\sigma^2|f|^2)`, extended by reflection so that its
borders add no steps (:func:`remove_background`), so the product of two spectra
carries :math:`H` once. Then it is mean-subtracted and zero-padded to at least twice
its size, so that :math:`c` is a linear, not circular, correlation. Each tile is
transformed once
(:func:`tile_spectra`) and reused for all of its pairs; each pair costs one
inverse transform (:func:`cross_correlate`).

The peak quality is the fraction of correlation values below 90% of the way
from the minimum to the maximum of the searched region, the scale used by
OpenFlexure Stitching: a sharp, unique peak gives values close to 1.

All shifts are ``(y, x)`` = ``(row, col)``.
"""

from __future__ import annotations

import functools
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
        Peak quality in [0, 1] (see module docstring).
    """

    shift: Any
    index: Any
    quality: Any


def high_pass_filter(fft_shape: tuple[int, int], sigma: float, *, xp: Any, device: Any = None,
                     dtype: Any = None) -> Any:
    """Gaussian high-pass filter for a real-FFT spectrum.

    Parameters
    ----------
    fft_shape : (int, int)
        The real-space FFT size ``(Hp, Wp)``.
    sigma : float
        Standard deviation (FFT pixels) of the real-space Gaussian that is removed.
    xp, device, dtype
        Namespace, device and float dtype of the result.

    Returns
    -------
    array, shape (Hp, Wp // 2 + 1)
    """
    dtype = xp.float32 if dtype is None else dtype
    # Frequencies from arange, not fft.fftfreq: array-api-compat's fftfreq refuses any
    # device but the CPU, so it would fail on CuPy.
    hp, wp = fft_shape
    fy = xp.astype(signed_indices(hp, xp=xp, device=device), dtype) / hp
    fx = xp.astype(xp.arange(wp // 2 + 1, device=device), dtype) / wp
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    return 1 - xp.exp(-2 * math.pi**2 * sigma**2 * r2)


def _rfftn(x: Any, fft_shape: tuple[int, int], xp: Any) -> Any:
    if is_numpy_namespace(xp):  # native fast path: multithreaded pocketfft
        import scipy.fft

        return scipy.fft.rfftn(x, s=fft_shape, axes=(-2, -1), workers=-1)
    return xp.fft.rfftn(x, s=fft_shape, axes=(-2, -1))


def _irfftn(x: Any, fft_shape: tuple[int, int], xp: Any) -> Any:
    if is_numpy_namespace(xp):
        import scipy.fft

        return scipy.fft.irfftn(x, s=fft_shape, axes=(-2, -1), workers=-1)
    return xp.fft.irfftn(x, s=fft_shape, axes=(-2, -1))


def tile_spectra(tiles: Any, *, fft_shape: tuple[int, int], high_pass_sigma: float) -> Any:
    """Forward transform of a batch of tiles, ready to correlate.

    Parameters
    ----------
    tiles : array, shape (n, H, W), float32
        Grey tiles.
    fft_shape : (int, int)
        FFT size ``(Hp, Wp)``; ``>= (2H, 2W)`` for a linear correlation.
    high_pass_sigma : float
        See :func:`high_pass_filter` and :func:`remove_background`; 0 disables the
        filter (for tiles filtered already).

    Returns
    -------
    array, shape (n, Hp, Wp // 2 + 1), complex64
    """
    xp = array_namespace(tiles)
    if high_pass_sigma > 0:
        tiles = remove_background(tiles, high_pass_sigma)
    return _rfftn(tiles - xp.mean(tiles, axis=(-2, -1), keepdims=True), fft_shape, xp)


def remove_background(tiles: Any, high_pass_sigma: float) -> Any:
    """Tiles filtered by ``sqrt(H)`` (:func:`high_pass_filter`), without border steps.

    Filtering after zero-padding would leave the step from each tile's border to the
    padding in the spectrum; two tiles' borders then line up at every shift along one
    axis, a ridge in the correlation that can outrank a weak true peak. Here each tile
    is mirrored into a ``(2H, 2W)`` periodic image, filtered, and cropped back, so only
    its content is left (and the correlation of two filtered tiles still carries ``H``
    once). On NumPy that is the DCT-II (the native fast path, a quarter of the points).

    Returns
    -------
    array, shape (n, H, W), same dtype
    """
    xp = array_namespace(tiles)
    return _mirrored_high_pass(tiles - xp.mean(tiles, axis=(-2, -1), keepdims=True),
                               high_pass_sigma, root=True)


def _mirrored_high_pass(x: Any, sigma: float, *, root: bool) -> Any:
    """``x`` (n, H, W) mirrored into a ``(2H, 2W)`` periodic image, filtered by
    :func:`high_pass_filter` (its square root with ``root``) and cropped back. On NumPy
    that is the DCT-II (the native fast path: its coefficient k is frequency k / 2N, in a
    quarter of the points); elsewhere the FFT of the mirrored image."""
    return _mirrored_high_passes(x, ((sigma, root),))[0]


def _mirrored_high_passes(x: Any, filters: tuple[tuple[float, bool], ...]) -> list[Any]:
    """:func:`_mirrored_high_pass` of ``x`` by each ``(sigma, root)`` of ``filters``, from
    one forward transform."""
    xp = array_namespace(x)
    h, w = x.shape[1:]
    if is_numpy_namespace(xp):
        import scipy.fft

        spectrum = scipy.fft.dctn(x, type=2, axes=(-2, -1), workers=-1)
        return [scipy.fft.idctn(spectrum * _dct_high_pass((h, w), float(sigma), str(x.dtype),
                                                          root=root),
                                type=2, axes=(-2, -1), workers=-1)
                for sigma, root in filters]
    ext = xp.concat([x, xp.flip(x, axis=2)], axis=2)
    ext = xp.concat([ext, xp.flip(ext, axis=1)], axis=1)
    shape = (2 * h, 2 * w)
    spectrum = _rfftn(ext, shape, xp)
    out = []
    for sigma, root in filters:
        weight = high_pass_filter(shape, sigma, xp=xp, device=device_of(x), dtype=x.dtype)
        if root:
            weight = xp.sqrt(weight)
        out.append(_irfftn(spectrum * weight, shape, xp)[:, :h, :w])
    return out


def search_and_score_tiles(tiles: Any, *, high_pass_sigma: float, score_sigma: float
                           ) -> tuple[Any, Any]:
    """:func:`remove_background` (by ``high_pass_sigma``; 0 for none) and
    :func:`score_tiles` (by ``score_sigma``, unbinned) of the same tiles, from one
    forward transform."""
    xp = array_namespace(tiles)
    if high_pass_sigma <= 0:
        return tiles, score_tiles(tiles, high_pass_sigma=score_sigma, binning=1)
    search, score = _mirrored_high_passes(
        tiles - xp.mean(tiles, axis=(-2, -1), keepdims=True),
        ((high_pass_sigma, True), (score_sigma, False)))
    return search, score


def score_tiles(tiles: Any, *, high_pass_sigma: float, binning: int = 2) -> Any:
    """Tiles prepared for scoring overlaps: binned, then high-pass filtered without edges.

    The tiles are averaged over ``binning`` x ``binning`` blocks (less noise, and
    fewer pixels to compare), then mirrored into a ``(2H, 2W)`` periodic image, so the
    Gaussian high-pass (:func:`high_pass_filter`, ``high_pass_sigma`` in binned
    pixels) removes shading and vignetting without the ringing a zero-padded edge
    would leave. A raw overlap NCC would match shading anywhere on a blank background.

    Parameters
    ----------
    tiles : array, shape (n, H, W), float32

    Returns
    -------
    array, shape (n, H // binning, W // binning), float32
    """
    return _mirrored_high_pass(bin_tiles(tiles, binning), high_pass_sigma, root=False)


@functools.lru_cache(maxsize=8)
def _dct_high_pass(shape: tuple[int, int], sigma: float, dtype: str, root: bool = False
                   ) -> Any:
    """:func:`high_pass_filter` (its square root with ``root``) of the ``(2H, 2W)``
    mirrored image at the DCT-II coefficients of an ``(H, W)`` one (NumPy; read-only,
    shared between calls)."""
    import numpy as np

    h, w = shape
    fy = np.arange(h, dtype=np.float64) / (2 * h)
    fx = np.arange(w, dtype=np.float64) / (2 * w)
    r2 = fy[:, None] ** 2 + fx[None, :] ** 2
    out = 1 - np.exp(-2 * math.pi**2 * sigma**2 * r2)
    out = (np.sqrt(out) if root else out).astype(dtype)
    out.flags.writeable = False
    return out


def bin_tiles(tiles: Any, binning: int) -> Any:
    """Tiles ``(n, H, W)`` averaged over ``binning`` x ``binning`` blocks (a partial last
    block is dropped): ``(n, H // binning, W // binning)``, same dtype.

    A sum of strided views (a reduction over reshaped block axes is several times
    slower on NumPy)."""
    n, h, w = tiles.shape
    hb, wb = h // binning, w // binning
    total = None
    for i in range(binning):
        for j in range(binning):
            part = tiles[:, i:hb * binning:binning, j:wb * binning:binning]
            total = part if total is None else total + part
    return total * (1.0 / binning**2) if binning > 1 else total


def cross_correlate(spec_a: Any, spec_b: Any, *, fft_shape: tuple[int, int]) -> Any:
    """Correlations of pairs of spectra from :func:`tile_spectra`.

    Returns
    -------
    array, shape (n, Hp, Wp), float32
        ``corr[k, i, j]`` is the correlation at displacement ``(i, j)``
        (circular indices: ``i >= Hp/2`` means ``i - Hp``).
    """
    xp = array_namespace(spec_a, spec_b)
    product = xp.conj(spec_a)
    product *= spec_b  # in place: one spectrum-sized temporary, not two
    return _irfftn(product, fft_shape, xp)


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
