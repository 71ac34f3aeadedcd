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

Peaks are found by :mod:`ofstitch.peaks` (re-exported here: ``correlate.locate_peaks``,
``correlate.top_peaks``).

All shifts are ``(y, x)`` = ``(row, col)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from array_api_compat import array_namespace, is_numpy_namespace
from array_api_compat import device as device_of

from .peaks import (  # noqa: F401  (the kernels' namespace: correlate.locate_peaks...)
    QUALITY_LEVEL,
    ZERO_SHIFT_EXCLUSION_PX,
    Peaks,
    locate_peaks,
    signed_indices,
    top_peaks,
)


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

    Sums of strided views (a reduction over reshaped block axes is several times slower
    on NumPy): the rows of each block first, each a run of whole rows, then the columns
    of those sums, which are ``binning`` times smaller (a 4056x3040 tile, 4x4: 27 against
    11 ms). Integer pixel values (JPEG luma, 16-bit grey) sum exactly in any order."""
    n, h, w = tiles.shape
    hb, wb = h // binning, w // binning
    if binning == 1:
        return tiles
    rows = tiles[:, 0:hb * binning:binning, :wb * binning] + tiles[:, 1:hb * binning:binning,
                                                                   :wb * binning]
    for i in range(2, binning):
        rows += tiles[:, i:hb * binning:binning, :wb * binning]
    total = rows[:, :, 0::binning] + rows[:, :, 1::binning]
    for j in range(2, binning):
        total += rows[:, :, j::binning]
    return total * (1.0 / binning**2)


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
