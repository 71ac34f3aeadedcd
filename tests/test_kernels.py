"""Kernel tests: correlation, peak finding, placement solves and the streaming working set.

Every device-side test runs on each backend of the ``backend`` fixture (numpy,
array-api-strict on the non-default ``device1``, and CuPy when a GPU is
present). Inputs go onto the device with ``backend.asarray`` and results come
back with :func:`ofstitch.backends.to_host`. Conventions: ``(row, col)`` =
``(y, x)``; the shift of a pair ``(a, b)`` is ``position[b] - position[a]``.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from array_helpers import assert_array, texture

import ofstitch
from ofstitch import correlate, overlap, place
from ofstitch.backends import Backend, solve_laplacian, to_device, to_host
from ofstitch.graph import find_pairs

TILE = (64, 80)
FFT = (128, 160)  # >= 2x the tile: a linear correlation
PACKAGE_DIR = Path(ofstitch.__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers


def _crop(image: np.ndarray, top_left, shape=TILE) -> np.ndarray:
    """The tile whose top-left corner sits at a (possibly fractional) ``top_left``."""
    y, x = float(top_left[0]), float(top_left[1])
    iy, ix = math.floor(y), math.floor(x)
    fy, fx = y - iy, x - ix
    if fy or fx:
        # ndi.shift: out(p) = in(p - s), so s = -frac gives out(p) = in(p + frac).
        image = ndi.shift(image, (-fy, -fx), order=3, mode="nearest")
    return np.ascontiguousarray(image[iy:iy + shape[0], ix:ix + shape[1]], dtype=np.float32)


def _pair_stacks(image: np.ndarray, shifts, origin=(120, 140)):
    """Tiles ``a`` at ``origin`` and ``b`` at ``origin + shift`` for each shift."""
    a = np.stack([_crop(image, origin) for _ in shifts])
    b = np.stack([_crop(image, (origin[0] + s[0], origin[1] + s[1])) for s in shifts])
    return a, b


def _correlate(backend: Backend, a: np.ndarray, b: np.ndarray, *, fft_shape=FFT,
               high_pass_sigma=10.0):
    spec_a = correlate.tile_spectra(backend.asarray(a), fft_shape=fft_shape,
                                    high_pass_sigma=high_pass_sigma)
    spec_b = correlate.tile_spectra(backend.asarray(b), fft_shape=fft_shape,
                                    high_pass_sigma=high_pass_sigma)
    return spec_a, spec_b, correlate.cross_correlate(spec_a, spec_b, fft_shape=fft_shape)


def _signed(n: int) -> np.ndarray:
    i = np.arange(n)
    return np.where(i >= (n + 1) // 2, i - n, i)


def _host_quality(corr: np.ndarray, exclude_radius: int) -> np.ndarray:
    """Reference peak quality (no mask): fraction of values below 90% of the range."""
    corr = np.array(corr, copy=True)
    if exclude_radius > 0:
        near = ((np.abs(_signed(corr.shape[1]))[:, None] < exclude_radius)
                & (np.abs(_signed(corr.shape[2]))[None, :] < exclude_radius))
        corr = np.where(near, corr.mean(axis=(1, 2), keepdims=True), corr)
    lo = corr.min(axis=(1, 2), keepdims=True)
    hi = corr.max(axis=(1, 2), keepdims=True)
    return (corr < lo + 0.9 * (hi - lo)).mean(axis=(1, 2))


# ----------------------------------------------------------------------------- correlation

INTEGER_SHIFTS = [(10, 20), (-15, 25), (12, -30), (-20, -18), (0, 35), (-28, 0), (5, -40)]
SUBPIXEL_SHIFTS = [(10.5, 20.25), (-15.3, 24.6), (12.75, -30.4), (-20.2, -17.7), (3.4, -17.7),
                   (-0.6, 30.3)]


@pytest.mark.parametrize("shifts", [INTEGER_SHIFTS, SUBPIXEL_SHIFTS], ids=["integer", "subpixel"])
def test_recovers_known_shifts(backend, shifts):
    image = texture()
    a, b = _pair_stacks(image, shifts)
    spec_a, spec_b, corr = _correlate(backend, a, b)
    peaks = correlate.locate_peaks(corr)
    got = to_host(peaks.shift)
    assert got.shape == (len(shifts), 2)
    np.testing.assert_allclose(got, np.asarray(shifts, dtype=float), atol=0.2)
    assert np.all(to_host(peaks.quality) > 0.999)


def test_outputs_stay_on_device_and_float32(backend):
    image = texture()
    a, b = _pair_stacks(image, INTEGER_SHIFTS[:3])
    spec_a, spec_b, corr = _correlate(backend, a, b)
    peaks = correlate.locate_peaks(corr)
    expected = backend.asarray(np.asarray(INTEGER_SHIFTS[:3], np.float32))
    masked = correlate.locate_peaks(corr, expected_shift=expected, mask_radius=5.0)
    assert_array(backend, spec_a, corr, *peaks, *masked)
    xp = backend.xp
    assert spec_a.shape == (3, FFT[0], FFT[1] // 2 + 1)
    assert spec_a.dtype == xp.complex64
    assert corr.shape == (3, *FFT)
    assert corr.dtype == xp.float32
    for p in (peaks, masked):
        assert p.shift.dtype == xp.float32
        assert p.quality.dtype == xp.float32
        assert p.shift.shape == (3, 2) and p.index.shape == (3, 2) and p.quality.shape == (3,)
    # The integer index is the correlation displacement -shift, wrapped into the array.
    index = to_host(peaks.index)
    want = np.mod(-np.round(to_host(peaks.shift)).astype(int), np.array(FFT))
    np.testing.assert_array_equal(index, want)


def test_unfiltered_spectra_and_correlation(backend):
    """high_pass_sigma=0 skips the filter; the mean is still removed (DC = 0)."""
    image = texture(seed=3)
    a, b = _pair_stacks(image, [(14, -22), (-9, 31)])
    spec_a, _, corr = _correlate(backend, a, b, high_pass_sigma=0)
    dc = to_host(spec_a)[:, 0, 0]
    np.testing.assert_allclose(np.abs(dc), 0, atol=1e-2)
    np.testing.assert_allclose(to_host(correlate.locate_peaks(corr).shift),
                               [(14, -22), (-9, 31)], atol=0.2)


def _periodic_texture(period=40, shape=(320, 400), seed=5) -> np.ndarray:
    """A texture periodic along x only: shifts differing by one period look alike."""
    rng = np.random.default_rng(seed)
    cell = ndi.gaussian_filter(rng.normal(size=(shape[0], period)), 1.0, mode="wrap")
    return np.tile(cell, (1, shape[1] // period)).astype(np.float32)


def test_mask_radius_selects_candidate_near_expected_shift(backend):
    image = _periodic_texture()
    # Shifts (12, 20) and (12, -20) give the same overlap area and the same content:
    # two equally strong peaks. The mask around the expected shift decides.
    a, b = _pair_stacks(image, [(12, 20), (12, 20), (-8, 15), (-8, 15)], origin=(100, 120))
    _, _, corr = _correlate(backend, a, b)
    unmasked = to_host(correlate.locate_peaks(corr).shift)
    candidates = np.array([[12, 20], [12, -20], [-8, 15], [-8, -25]], float)
    for k in range(4):  # without a mask, one of the periodic readings wins
        pair_candidates = candidates[:2] if k < 2 else candidates[2:]
        assert np.min(np.linalg.norm(pair_candidates - unmasked[k], axis=1)) < 0.3
    # Expected shifts a few pixels off each candidate; a 6 px mask picks the nearby one.
    expected = np.array([[14, 18], [10, -23], [-6, 17], [-10, -22]], float)
    masked = correlate.locate_peaks(corr, expected_shift=backend.asarray(expected),
                                    mask_radius=6.0)
    np.testing.assert_allclose(to_host(masked.shift), candidates, atol=0.3)
    q = to_host(masked.quality)
    assert np.all((q > 0.9) & (q <= 1.0))


def test_empty_mask_searches_everywhere(backend):
    image = texture(seed=7)
    a, b = _pair_stacks(image, [(10, 25)])
    _, _, corr = _correlate(backend, a, b)
    far = backend.asarray(np.array([[1e6, 1e6]]))  # the mask covers no correlation pixel
    peaks = correlate.locate_peaks(corr, expected_shift=far, mask_radius=3.0)
    np.testing.assert_allclose(to_host(peaks.shift), [[10, 25]], atol=0.2)


def test_subpixel_not_biased_by_mask_edge(backend):
    image = texture(seed=1)
    a, b = _pair_stacks(image, [(10, 25)] * 3)
    _, _, corr = _correlate(backend, a, b)
    free = to_host(correlate.locate_peaks(corr).shift)
    # The peak lies exactly on the edge of each 5 px mask (in x, in -x, in y).
    expected = backend.asarray(np.array([[10, 30], [10, 20], [15, 25]], float))
    masked = to_host(correlate.locate_peaks(corr, expected_shift=expected,
                                            mask_radius=5.0).shift)
    np.testing.assert_allclose(masked, free, atol=0.05)


def test_peak_quality_real_overlap_vs_unrelated_noise(backend):
    rng = np.random.default_rng(11)
    image = texture(seed=11)
    shifts = [(10, 25), (-14, 30), (20, -12), (-25, -20)]
    a, b = _pair_stacks(image, shifts)
    unrelated = ndi.gaussian_filter(rng.normal(size=b.shape), (0, 1, 1)).astype(np.float32)
    _, _, corr_real = _correlate(backend, a, b)
    _, _, corr_noise = _correlate(backend, a, unrelated)
    q_real = to_host(correlate.locate_peaks(corr_real).quality)
    q_noise = to_host(correlate.locate_peaks(corr_noise).quality)
    n = FFT[0] * FFT[1]
    # A real overlap: one sharp peak, nothing else within 10% of the top of the range.
    assert np.all(q_real > 1 - 3 / n)
    # Unrelated noise: many values near the top; quality clearly lower on every pair.
    assert np.all(q_noise < q_real.min())
    assert np.all((1 - q_noise) * n >= 5 * np.maximum((1 - q_real) * n, 1))


@pytest.mark.parametrize("exclude_radius", [0, correlate.ZERO_SHIFT_EXCLUSION_PX])
def test_peak_quality_is_fraction_below_90_percent_of_range(backend, exclude_radius):
    rng = np.random.default_rng(2)
    image = texture(seed=2)
    a, b = _pair_stacks(image, [(10, 25), (-14, 30)])
    b = np.concatenate([b, ndi.gaussian_filter(rng.normal(size=b.shape), (0, 1, 1))
                        .astype(np.float32)])
    a = np.concatenate([a, a])
    _, _, corr = _correlate(backend, a, b)
    peaks = correlate.locate_peaks(corr, exclude_radius=exclude_radius)
    want = _host_quality(to_host(corr), exclude_radius)
    # Equal up to one value sitting exactly on the level (float32 rounding).
    np.testing.assert_allclose(to_host(peaks.quality), want, atol=1.5 / (FFT[0] * FFT[1]))
    assert np.all(want[:2] > want[2:].max())  # and it tells the real pairs from noise


def test_peak_quality_hand_made_correlation(backend):
    """Exact quality on a correlation with a known value distribution."""
    n_h, n_w = 16, 20
    corr = np.zeros((1, n_h, n_w), np.float32)
    corr[0, 5, 7] = 10.0  # the peak; every other value is 0 or 1, far below 9
    corr[0, 2:4, :] = 1.0
    peaks = correlate.locate_peaks(backend.asarray(corr), exclude_radius=0)
    assert to_host(peaks.quality)[0] == pytest.approx(1 - 1 / (n_h * n_w))
    assert to_host(peaks.index).tolist() == [[5, 7]]
    np.testing.assert_allclose(to_host(peaks.shift), [[-5, -7]])


def test_masked_quality_uses_searched_region_only(backend):
    rng = np.random.default_rng(4)
    n_h, n_w = 32, 40
    corr = rng.uniform(0, 1, size=(1, n_h, n_w)).astype(np.float32)
    corr[0, 20, 30] = -50.0  # a deep trough far outside the mask
    expected = np.array([[-5.0, -6.0]])  # peak search around displacement (5, 6)
    radius = 4.0
    peaks = correlate.locate_peaks(backend.asarray(corr), expected_shift=backend.asarray(expected),
                                   mask_radius=radius, exclude_radius=0)
    dy = _signed(n_h)[:, None] + expected[0, 0]
    dx = _signed(n_w)[None, :] + expected[0, 1]
    values = corr[0][dy**2 + dx**2 <= radius**2]
    lo, hi = values.min(), values.max()
    want = np.mean(values < lo + 0.9 * (hi - lo))
    assert to_host(peaks.quality)[0] == pytest.approx(want, abs=1e-6)


def test_high_pass_filter(backend):
    xp = backend.xp
    hp, wp = 96, 130
    filt = correlate.high_pass_filter((hp, wp), 4.0, xp=xp, device=backend.device)
    assert_array(backend, filt)
    assert filt.shape == (hp, wp // 2 + 1)
    assert filt.dtype == xp.float32
    f = to_host(filt)
    assert f[0, 0] == 0.0
    assert np.all((f >= 0) & (f <= 1))
    assert f[hp // 2, wp // 2] > 0.999  # Nyquist corner: ~1
    assert f[0, -1] > 0.999 and f[hp // 2, 0] > 0.999
    # Rises monotonically with frequency along both axes (saturating at 1 in float32);
    # symmetric in +-fy.
    assert np.all(np.diff(f[0, :]) >= 0) and np.all(np.diff(f[0, :8]) > 0)
    assert np.all(np.diff(f[: hp // 2 + 1, 0]) >= 0) and np.all(np.diff(f[:8, 0]) > 0)
    np.testing.assert_allclose(f[1:, :], f[1:, :][::-1, :], atol=1e-6)
    # The formula 1 - exp(-2 pi^2 sigma^2 |f|^2).
    fy = np.fft.fftfreq(hp)[:, None]
    fx = np.fft.rfftfreq(wp)[None, :]
    np.testing.assert_allclose(f, 1 - np.exp(-2 * np.pi**2 * 16 * (fy**2 + fx**2)), atol=1e-6)
    f64 = correlate.high_pass_filter((hp, wp), 4.0, xp=xp, device=backend.device,
                                     dtype=xp.float64)
    assert f64.dtype == xp.float64


# ----------------------------------------------------------------------------- no-pad ambiguity


def test_unwrap_candidates():
    assert overlap.unwrap_candidates((0, 0), (64, 80)) == [(0, 0)]
    assert sorted(overlap.unwrap_candidates((44, 50), (64, 80))) == sorted(
        [(-44, -50), (-44, 30), (20, -50), (20, 30)])
    assert sorted(overlap.unwrap_candidates((0, 10), (64, 80))) == [(0, -10), (0, 70)]


@pytest.mark.parametrize("true_shift", [(20, -50), (-12, 45), (30, 10), (-25, -35)])
def test_no_pad_ambiguity_breaking(backend, true_shift):
    image = texture(seed=13)
    a, b = _pair_stacks(image, [true_shift], origin=(120, 140))
    _, _, corr = _correlate(backend, a, b, fft_shape=TILE)  # circular correlation
    peaks = correlate.locate_peaks(corr)
    index = tuple(int(v) for v in to_host(peaks.index)[0])
    candidates = overlap.unwrap_candidates(index, TILE)
    assert tuple(true_shift) in candidates
    tile_a, tile_b = backend.asarray(a[0]), backend.asarray(b[0])
    scores = [overlap.overlap_similarity(tile_a, tile_b, c) for c in candidates]
    assert all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert candidates[int(np.argmax(scores))] == tuple(true_shift)
    assert max(scores) > 0.99


def test_overlap_similarity_edge_cases(backend):
    image = texture(seed=17)
    a = backend.asarray(_crop(image, (50, 60)))
    b = backend.asarray(_crop(image, (60, 90)))
    assert overlap.overlap_similarity(a, b, (10, 30)) == pytest.approx(1.0, abs=1e-5)
    assert overlap.overlap_similarity(a, b, (64, 0)) == 0.0  # no overlap
    assert overlap.overlap_similarity(a, b, (0, -80)) == 0.0
    flat = backend.asarray(np.ones(TILE, np.float32))
    assert overlap.overlap_similarity(flat, b, (10, 30)) == 0.0


@pytest.mark.parametrize("offset", [0.0, 40.0], ids=["zero-mean", "offset"])
def test_overlap_sums_give_the_overlap_ncc(backend, offset):
    """The NCC from the five overlap sums (host, float64) is overlap_ncc's, to float32
    rounding for filtered (zero-mean) tiles, and within 5e-5 for tiles 40 standard
    deviations from zero mean (rows of float32 products); flat and empty overlaps score 0."""
    image = texture(seed=5) + offset
    a = backend.asarray(_crop(image, (50, 60)))
    b = backend.asarray(_crop(image, (62, 85)))
    flat = backend.asarray(np.full(TILE, 3.0, np.float32))
    cases = [(a, b, (12, 25)), (a, b, (-7, 40)), (a, b, (30, -50)), (b, a, (-12, -25)),
             (a, b, (64, 0)), (flat, b, (12, 25)), (a, flat, (3, 3))]
    sums = [overlap.overlap_sums(x, y, s) for x, y, s in cases]
    assert_array(backend, *sums, shape=(5,))
    areas = [overlap.overlap_area(TILE, s) for _, _, s in cases]
    got = overlap.ncc_from_sums(np.stack([to_host(v) for v in sums]), np.asarray(areas))
    kernel = [float(to_host(overlap.overlap_ncc(x, y, s))) for x, y, s in cases]
    exact = [overlap.overlap_similarity(to_host(x).astype(np.float64),
                                        to_host(y).astype(np.float64), s) for x, y, s in cases]
    np.testing.assert_allclose(got, exact, atol=5e-5 if offset else 1e-6)
    np.testing.assert_allclose(got, kernel, atol=1e-4 if offset else 2e-6)
    assert got[0] == pytest.approx(1.0, abs=1e-4) and abs(got[2]) < 0.3
    np.testing.assert_array_equal(got[4:], 0.0)
    # All at once (padded stacks off NumPy; a tiny chunk size makes several chunks).
    for max_values in (2**22, 3000):
        many = overlap.overlap_sums_many([x for x, _, _ in cases], [y for _, y, _ in cases],
                                         [s for _, _, s in cases], max_values=max_values)
        assert_array(backend, many, shape=(len(cases), 5))
        np.testing.assert_allclose(to_host(many), np.stack([to_host(v) for v in sums]),
                                   rtol=1e-6, atol=1e-6 * (1 + offset**2) * TILE[0] * TILE[1])


# ----------------------------------------------------------------------------- placement kernels


def _grid_graph(rows: int, cols: int):
    """Positions of a rows x cols grid and its right/down edges."""
    rng = np.random.default_rng(rows * 10 + cols)
    truth = np.array([(r * 45.0, c * 56.0) for r in range(rows) for c in range(cols)])
    truth = truth + rng.normal(0, 2.0, truth.shape)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols:
                edges.append((i, i + 1))
            if r + 1 < rows:
                edges.append((i, i + cols))
    return truth, np.asarray(edges, np.int64)


def _dense_weighted_solution(pairs, weights, shifts, n):
    """Reference: weighted least squares with a zero-mean gauge, on the host."""
    inc = np.zeros((len(pairs), n))
    inc[np.arange(len(pairs)), pairs[:, 1]] += 1
    inc[np.arange(len(pairs)), pairs[:, 0]] -= 1
    sw = np.sqrt(weights)[:, None]
    x, *_ = np.linalg.lstsq(np.vstack([inc * sw, np.ones((1, n))]),
                            np.vstack([shifts * sw, np.zeros((1, shifts.shape[1]))]), rcond=None)
    return x


def test_fit_affine_recovers_matrix(backend):
    rng = np.random.default_rng(21)
    t_true = np.array([[1.03, 0.04], [-0.02, 0.97]])
    stage = rng.uniform(-200, 200, size=(60, 2))
    image = stage @ t_true + rng.normal(0, 0.2, size=stage.shape)
    fitted = place.fit_affine(backend.asarray(stage), backend.asarray(image))
    assert_array(backend, fitted)
    assert fitted.shape == (2, 2)
    np.testing.assert_allclose(to_host(fitted), t_true, atol=2e-3)


def test_solve_positions_exact_with_repeated_weighted_edges(backend):
    truth, edges = _grid_graph(3, 4)
    n = len(truth)
    # Repeat some edges, in both directions, with different weights.
    pairs = np.concatenate([edges, edges[[0, 3, 5]], edges[[2, 7]][:, ::-1]])
    weights = np.concatenate([np.ones(len(edges)), [0.5, 2.0, 0.04], [3.0, 0.7]])
    shifts = truth[pairs[:, 1]] - truth[pairs[:, 0]]
    got = place.solve_positions(backend.asarray(pairs), backend.asarray(shifts),
                                backend.asarray(weights), n)
    assert_array(backend, got)
    got = to_host(got)
    assert got.shape == (n, 2)
    np.testing.assert_allclose(got.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(got, truth - truth.mean(axis=0), atol=1e-8)


def test_solve_laplacian_weighted_inconsistent_repeats(backend):
    """Repeated edges with different measurements are weighted-averaged, not dropped."""
    rng = np.random.default_rng(8)
    truth, edges = _grid_graph(3, 3)
    n = len(truth)
    pairs = np.concatenate([edges, edges[[1, 4, 4]]])
    weights = rng.uniform(0.1, 3.0, len(pairs))
    shifts = truth[pairs[:, 1]] - truth[pairs[:, 0]] + rng.normal(0, 1.5, (len(pairs), 2))
    # Three right-hand-side columns (the solver takes k columns).
    rhs = np.concatenate([shifts, shifts[:, :1] * 2], axis=1)
    got = solve_laplacian(backend.asarray(pairs[:, 0]), backend.asarray(pairs[:, 1]),
                          backend.asarray(weights), backend.asarray(rhs), n)
    assert_array(backend, got)
    want = _dense_weighted_solution(pairs, weights, rhs, n)
    np.testing.assert_allclose(to_host(got), want, atol=1e-8)


def test_fit_error_zero_for_consistent_grows_with_inconsistency(backend):
    rng = np.random.default_rng(9)
    truth, pairs = _grid_graph(4, 4)
    n = len(truth)
    exact = truth[pairs[:, 1]] - truth[pairs[:, 0]]
    weights = np.ones(len(pairs))

    def error(shifts, n_stage=0, penalty=0.0):
        p, s = backend.asarray(pairs), backend.asarray(shifts)
        pos = place.solve_positions(p, s, backend.asarray(weights), n)
        return place.fit_error(pos, p, s, n_stage, penalty)

    e0 = error(exact)
    assert isinstance(e0, float)
    assert e0 < 1e-8
    noise = rng.normal(0, 1.0, exact.shape)
    e1 = error(exact + 0.5 * noise)
    e2 = error(exact + 2.0 * noise)
    assert 0.1 < e1 < e2
    assert e2 == pytest.approx(4 * e1, rel=1e-6)  # linear in the inconsistency
    # The stage penalty adds penalty * n_stage / m.
    assert error(exact, n_stage=6, penalty=3.0) == pytest.approx(3.0 * 6 / len(pairs), abs=1e-8)


# ----------------------------------------------------------------------------- place (host)


def _synthetic_pairs(seed=3, rows=4, cols=5):
    rng = np.random.default_rng(seed)
    truth = np.array([(r * 45.0, c * 56.0) for r in range(rows) for c in range(cols)])
    truth = truth + rng.normal(0, 2.0, truth.shape)
    stage = truth + rng.normal(0, 3.0, truth.shape)
    pairs = find_pairs(stage, TILE, 0.05).pairs
    shift = truth[pairs[:, 1]] - truth[pairs[:, 0]] + rng.normal(0, 0.1, (len(pairs), 2))
    quality = 0.99995 - rng.uniform(0, 2e-5, len(pairs))
    return rng, truth, stage, pairs, shift, quality


def _relative_error(positions: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs((positions - positions[0]) - (truth - truth[0])).max())


def test_place_rejects_outliers_and_recovers_positions():
    rng, truth, stage, pairs, shift, quality = _synthetic_pairs()
    outliers = np.array([2, 9, 17, 30])
    shift[outliers] += np.array([[25, -10], [-18, 30], [15, 15], [0, -40]])
    quality[outliers] = 0.995
    result = place.place(pairs, shift, quality, stage, np.eye(2))
    assert result.positions_px.shape == truth.shape
    assert not result.accepted[outliers].any()
    assert result.accepted.sum() >= len(pairs) - len(outliers) - 2
    np.testing.assert_allclose(result.positions_px.min(axis=0), 0, atol=1e-9)
    assert _relative_error(result.positions_px, truth) < 0.5
    assert result.rms_error_px < 0.5
    # Stage error (3 px on ~50 px steps) only lets the stage->image affine be ~identity.
    np.testing.assert_allclose(result.affine, np.eye(2), atol=0.05)


def test_place_with_nan_pair_places_every_tile():
    rng, truth, stage, pairs, shift, quality = _synthetic_pairs(seed=4)
    shift[5] = np.nan
    quality[5] = np.nan
    shift[11] = np.nan  # NaN shift with a finite quality
    result = place.place(pairs, shift, quality, stage, np.eye(2))
    assert np.all(np.isfinite(result.positions_px))
    assert not result.accepted[[5, 11]].any()
    assert _relative_error(result.positions_px, truth) < 0.5


def test_place_every_pair_of_one_tile_failed():
    """A tile with only NaN pairs is still placed, from the (affine-corrected) stage."""
    rng, truth, stage, pairs, shift, quality = _synthetic_pairs(seed=5)
    lone = 7
    bad = (pairs[:, 0] == lone) | (pairs[:, 1] == lone)
    shift[bad] = np.nan
    quality[bad] = np.nan
    result = place.place(pairs, shift, quality, stage, np.eye(2))
    assert np.all(np.isfinite(result.positions_px))
    others = np.arange(len(truth)) != lone
    assert _relative_error(result.positions_px[others], truth[others]) < 0.5
    # The lone tile is within the stage error of its true place.
    rel = (result.positions_px - result.positions_px[0]) - (truth - truth[0])
    assert np.linalg.norm(rel[lone]) < 15


# ----------------------------------------------------------------------------- static checks


def _module_level_imports(tree: ast.Module):
    """Import nodes executed at import time (not inside functions or classes)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def _imported_roots(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.level:  # relative import: inside the package
        return []
    return [(node.module or "").split(".")[0]]


def test_correlate_does_not_import_numpy_at_module_level():
    tree = ast.parse((PACKAGE_DIR / "correlate.py").read_text())
    roots = [r for node in _module_level_imports(tree) for r in _imported_roots(node)]
    assert "numpy" not in roots
    assert "scipy" not in roots  # the numpy fast path imports scipy lazily


def test_no_cupy_import_outside_backends():
    offenders = []
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "correlate.py" in files
    for path in files:
        if "backends" in path.relative_to(PACKAGE_DIR).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                if {"cupy", "cupyx"} & set(_imported_roots(node)):
                    offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
    assert not offenders, f"CuPy imported outside ofstitch/backends: {offenders}"


def test_to_device_roundtrip(backend):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    dev = to_device(host, backend)
    assert_array(backend, dev)
    assert to_device(host, backend, dtype=backend.xp.float64).dtype == backend.xp.float64
    back = to_host(dev)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)


# ----------------------------------------------------------------------------- peak search


def _greedy_peaks_by_repeated_argmax(corr, k, separation, exclude, expected=None, radius=None):
    """Reference for correlate.top_peaks: argmax, suppress a box around it, repeat."""
    n, hp, wp = corr.shape
    dy, dx = _signed(hp)[:, None], _signed(wp)[None, :]
    out = np.full((n, k, 2), np.nan)
    for i in range(n):
        lowest = corr[i].min()
        work = corr[i].copy()
        if exclude > 0:
            work[(np.abs(dy) <= exclude) & (np.abs(dx) <= exclude)] = lowest
        if radius is not None:
            work[(dy + expected[i, 0]) ** 2 + (dx + expected[i, 1]) ** 2 > radius**2] = lowest
        for c in range(k):
            py, px = np.unravel_index(np.argmax(work), work.shape)
            if work[py, px] > lowest and corr[i].max() - lowest > 1e-6 * np.abs(corr[i]).max():
                out[i, c] = -np.array([dy[py, 0], dx[0, px]])  # integer part only
            ddy = np.abs(dy[:, 0] - dy[py, 0])
            ddx = np.abs(dx[0, :] - dx[0, px])
            ddy, ddx = np.minimum(ddy, hp - ddy), np.minimum(ddx, wp - ddx)
            work[np.ix_(ddy <= separation, ddx <= separation)] = lowest
    return out


@pytest.mark.parametrize("shape", [(2, 48, 64), (1, 240, 300)], ids=["small", "subsampled"])
@pytest.mark.parametrize("windowed", [False, True], ids=["anywhere", "near-prediction"])
def test_top_peaks_matches_repeated_argmax(backend, shape, windowed):
    """The one-pass candidate search picks what repeated argmax and suppression pick."""
    rng = np.random.default_rng(sum(shape) + windowed)
    for trial in range(6):
        corr = rng.standard_normal(shape).astype(np.float32)
        corr = corr + np.roll(corr, 1, axis=1) + np.roll(corr, 1, axis=2)  # peaks with shoulders
        if trial == 0:
            corr[0, 1, 2] = 100.0  # the highest value sits in the excluded zero-shift box
        k, separation, exclude = 2 + trial, 1 + trial % 4, 2 * (trial % 3)
        expected = rng.uniform(-20, 20, (shape[0], 2))
        radius = float(rng.uniform(4, 18)) if windowed else None
        kwargs = dict(separation=separation, exclude_radius=exclude)
        if windowed:
            kwargs.update(expected_shift=backend.asarray(expected.astype(np.float32)),
                          radius=radius)
        shift, index = correlate.top_peaks(backend.asarray(corr), k, **kwargs)
        want = _greedy_peaks_by_repeated_argmax(corr, k, separation, exclude, expected, radius)
        got = to_host(shift)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        # Sub-pixel offsets are within half a pixel of the integer peak.
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=0.5)
        assert_array(backend, shift, index)


@pytest.mark.parametrize("exclude", [0, 3])
def test_top_peaks_near_is_the_two_searches_in_one(backend, exclude):
    """``near=`` returns the peaks anywhere, then those near the prediction: what two calls
    return, concatenated (a flat correlation has none)."""
    rng = np.random.default_rng(exclude)
    corr = rng.standard_normal((3, 60, 90)).astype(np.float32)
    corr = corr + np.roll(corr, 1, axis=1)
    corr[2] = 0.25  # flat
    expected = backend.asarray(rng.uniform(-25, 25, (3, 2)).astype(np.float32))
    dev = backend.asarray(corr)
    kw = dict(exclude_radius=exclude, separation=2)
    both, index = correlate.top_peaks(dev, 4, near=2, expected_shift=expected, radius=9.0, **kw)
    anywhere, index_a = correlate.top_peaks(dev, 4, **kw)
    close, index_c = correlate.top_peaks(dev, 2, expected_shift=expected, radius=9.0, **kw)
    assert_array(backend, both, index, shape=(3, 6, 2))
    np.testing.assert_array_equal(to_host(both), np.concatenate([to_host(anywhere),
                                                                 to_host(close)], axis=1))
    np.testing.assert_array_equal(to_host(index)[:2], np.concatenate(
        [to_host(index_a), to_host(index_c)], axis=1)[:2])
    assert np.isnan(to_host(both)[2]).all() and np.isfinite(to_host(both)[:2]).all()
    with pytest.raises(ValueError, match="near"):
        correlate.top_peaks(dev, 4, near=2)


@pytest.mark.parametrize("exclude_radius", [1, 3, correlate.ZERO_SHIFT_EXCLUSION_PX])
def test_locate_peaks_unmasked_matches_the_masked_search(backend, exclude_radius):
    """Without a mask, peaks come from views around the zero-shift box: the same peak,
    quality and flags as the masked search over everything."""
    rng = np.random.default_rng(exclude_radius)
    corr = rng.standard_normal((4, 40, 56)).astype(np.float32)
    corr[1, 2, 3] = 50.0  # a peak inside the excluded box
    corr[2] = 1.5  # flat
    corr[3, 20, 7] = 30.0
    fast = correlate.locate_peaks(backend.asarray(corr), exclude_radius=exclude_radius)
    masked = correlate.locate_peaks(backend.asarray(corr), exclude_radius=exclude_radius,
                                    expected_shift=backend.asarray(np.zeros((4, 2), np.float32)),
                                    mask_radius=1e9)
    np.testing.assert_allclose(to_host(fast.shift), to_host(masked.shift), atol=1e-5)
    np.testing.assert_allclose(to_host(fast.quality), to_host(masked.quality), atol=1e-6)
    np.testing.assert_array_equal(to_host(fast.index), to_host(masked.index))
    np.testing.assert_allclose(to_host(fast.quality), _host_quality(corr, exclude_radius),
                               atol=1e-6)
    assert np.isnan(to_host(fast.shift)[2]).all()


# ----------------------------------------------------------------------------- tile borders


def _vignetted_pair(contrast: float, vignetting: float = 0.15, shift=(150, -20), seed=0,
                    noise: float = 2.0):
    """Two 200x260 tiles of a bright, blank, vignetted field whose only texture is a faint
    patch in the corner of their overlap (like tissue at the edge of a slide's background)."""
    rng = np.random.default_rng(seed)
    src = np.full((600, 700), 230.0)
    yy, xx = np.mgrid[0:600, 0:700]
    patch = (yy > 355) & (yy < 395) & (xx > 250) & (xx < 320)
    src[patch] -= contrast * (1 + rng.standard_normal(int(patch.sum())))
    src = ndi.gaussian_filter(src, 1.0)
    h, w = 200, 260
    yv, xv = np.mgrid[0:h, 0:w]
    shade = 1 - vignetting * (((yv - h / 2) / (h / 2)) ** 2 + ((xv - w / 2) / (w / 2)) ** 2) / 2
    (ya, xa), (yb, xb) = (200, 100), (200 + shift[0], 100 + shift[1])
    a = src[ya:ya + h, xa:xa + w] * shade + rng.normal(0, noise, (h, w))
    b = src[yb:yb + h, xb:xb + w] * shade + rng.normal(0, noise, (h, w))
    return np.stack([a, b]).astype(np.float32), shift


def test_remove_background_adds_nothing_at_the_borders(backend):
    """A blank, vignetted tile filters to almost nothing, right up to its borders (the
    filter sees a reflection beyond them, not a step down to zero)."""
    tiles, _ = _vignetted_pair(contrast=0.0, noise=0.0)
    out = to_host(correlate.remove_background(backend.asarray(tiles), 10.0))
    assert out.shape == tiles.shape
    # What is left of the ~17 grey levels of vignetting is as smooth as the vignetting
    # itself, up to the borders: no step, no ringing.
    assert np.ptp(tiles) > 15
    assert np.abs(out).max() < np.ptp(tiles)
    for axis in (1, 2):
        assert np.abs(np.diff(out, axis=axis)).max() <= np.abs(np.diff(tiles, axis=axis)).max()
    # Noise keeps its level everywhere, borders included.
    noisy, _ = _vignetted_pair(contrast=0.0)
    out = to_host(correlate.remove_background(backend.asarray(noisy), 10.0))
    border = np.concatenate([out[:, :3, :].ravel(), out[:, -3:, :].ravel(),
                             out[:, :, :3].ravel(), out[:, :, -3:].ravel()])
    assert border.std() < 1.3 * out[:, 50:-50, 50:-50].std()


def test_weak_overlap_on_a_vignetted_blank_field_is_found(backend):
    """Zero-padding before filtering leaves the tiles' border steps in the spectra, and the
    shared vignetting then peaks near zero shift, above this faint patch; filtering each
    tile on its own first finds the patch's true shift."""
    tiles, shift = _vignetted_pair(contrast=20.0)
    fft = (400, 540)
    spectra = correlate.tile_spectra(backend.asarray(tiles), fft_shape=fft, high_pass_sigma=10.0)
    corr = correlate.cross_correlate(spectra[:1, ...], spectra[1:, ...], fft_shape=fft)
    found = to_host(correlate.locate_peaks(corr).shift)[0]
    np.testing.assert_allclose(found, shift, atol=0.5)
