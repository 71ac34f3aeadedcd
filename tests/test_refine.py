"""Coarse to fine: binned readings measured again at full resolution (ofstitch.refine)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from ofstitch import correlate, refine
from ofstitch.backends import to_device, to_host
from ofstitch.settings import CorrelationSettings
from ofstitch.stream import CorrelationPlan

SHAPE = (180, 240)


def _pair(shift: tuple[float, float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tiles of a smooth random texture; tile b's pixel p lies on tile a's p + shift
    (sub-pixel shifts by cubic spline interpolation)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=(SHAPE[0] * 2, SHAPE[1] * 2)), 1.5)
    moved = ndi.shift(field, (-shift[0], -shift[1]), order=3, mode="reflect")
    y0, x0 = 20, 20
    a = field[y0:y0 + SHAPE[0], x0:x0 + SHAPE[1]]
    b = moved[y0:y0 + SHAPE[0], x0:x0 + SHAPE[1]]
    return a.astype(np.float32), b.astype(np.float32)


def _live(backend, *tiles_):
    return {k: to_device(t, backend) for k, t in enumerate(tiles_)}


@pytest.mark.parametrize("truth", [(37.3, 151.6), (-12.6, -140.2), (150.45, 3.7)])
def test_refined_reading_is_the_full_resolution_shift(backend, truth):
    a, b = _pair(truth)
    # Coarse readings up to about a bin off (binning 2), in both directions.
    coarse = np.array([truth[0] + 0.9, truth[1] - 0.8])
    fine = refine.refine_shifts(np.array([[0, 1]]), coarse[None], _live(backend, a, b), 2)
    assert np.abs(coarse - truth).max() > 0.7
    assert np.abs(fine[0] - truth).max() < 0.1, fine


def test_large_overlaps_are_summed_over_every_kth_row(backend, monkeypatch):
    truth = (30.7, 60.2)
    a, b = _pair(truth, seed=5)
    monkeypatch.setattr(refine, "MAX_PIXELS", 4000)  # rows 1 in 7 or so
    region = refine.climb_region(a.shape, (31, 60), 3)
    sums = refine.shift_sums(to_device(a, backend), to_device(b, backend), region, [(31, 60)])
    assert len(sums) == 1
    fine = refine.refine_shifts(np.array([[0, 1]]), np.array([[31.2, 60.6]]),
                                _live(backend, a, b), 2)
    assert np.abs(fine[0] - truth).max() < 0.15, fine


def test_refinement_climbs_from_farther_for_larger_bins(backend):
    truth = (40.2, 130.7)
    a, b = _pair(truth, seed=1)
    coarse = np.array([[truth[0] - 2.3, truth[1] + 1.9]])
    live = _live(backend, a, b)
    fine4 = refine.refine_shifts(np.array([[0, 1]]), coarse, live, 4)
    assert np.abs(fine4[0] - truth).max() < 0.1, fine4


def test_refinement_leaves_a_diagonal_ridge_for_its_peak(backend):
    """Texture striped along a diagonal correlates along a diagonal ridge: from a pixel
    on the ridge beside the peak, every neighbour along the axes is lower, and only the
    diagonal step reaches the peak."""
    rng = np.random.default_rng(6)
    n = SHAPE[0] * 2 + SHAPE[1] * 2
    stripes = ndi.gaussian_filter1d(rng.normal(size=n), 1.0)
    yy, xx = np.mgrid[0:SHAPE[0] * 2, 0:SHAPE[1] * 2]
    stripes = stripes[yy + xx] / stripes[yy + xx].std()
    blobs = ndi.gaussian_filter(rng.normal(size=yy.shape), 2.0)
    field = 5 * stripes + 0.8 * blobs / blobs.std()  # the blobs make one peak on the ridge
    truth = (35.0, 120.0)
    a = field[20:20 + SHAPE[0], 20:20 + SHAPE[1]].astype(np.float32)
    b = field[55:55 + SHAPE[0], 140:140 + SHAPE[1]].astype(np.float32)
    start = np.array([[truth[0] - 1.2, truth[1] + 0.9]])  # on the ridge, a step away
    region = refine.climb_region(a.shape, (34, 121), 4)
    v = [float(x) for x in refine.shift_sums(a, b, region, [(34 + dy, 121 + dx) for dy, dx
                                                            in refine.STENCIL])]
    assert v[0] == max(v[:5]) and max(v[5:]) > v[0]  # higher only along the diagonal
    fine = refine.refine_shifts(np.array([[0, 1]]), start, _live(backend, a, b), 2)
    assert np.abs(fine[0] - truth).max() < 0.15, fine


def test_unusable_readings_keep_their_coarse_value(backend):
    a, b = _pair((30.0, 100.0))
    flat = np.full(SHAPE, 7.0, dtype=np.float32)
    live = _live(backend, a, b, flat)
    readings = np.array([[30.4, 100.3],      # refined
                         [np.nan, np.nan],   # no reading: stays NaN
                         [178.2, 238.4],     # an overlap of 1x1 px: too small
                         [30.4, 100.3]])     # flat tile: no peak to climb
    pairs = np.array([[0, 1], [0, 1], [0, 1], [0, 2]])
    fine = refine.refine_shifts(pairs, readings, live, 2)
    assert np.abs(fine[0] - (30.0, 100.0)).max() < 0.1
    assert np.isnan(fine[1]).all()
    np.testing.assert_array_equal(fine[2:], readings[2:])


def test_refine_readings_refines_the_used_candidates_and_the_highest_peak(backend):
    truth = np.array([25.35, 120.6])
    a, b = _pair(tuple(truth), seed=2)
    shift = np.array([[25.8, 120.0]])
    candidates = np.full((1, 4, 3), np.nan)
    candidates[0, 0] = (25.1, 121.2, 0.9)   # used: refined
    candidates[0, 1] = (-60.0, 10.0, 0.1)   # scores too low to be used: left alone
    fine_shift, fine_cand = refine.refine_readings(np.array([[0, 1]]), shift, candidates,
                                                   _live(backend, a, b), 2)
    assert np.abs(fine_shift[0] - truth).max() < 0.1
    assert np.abs(fine_cand[0, 0, :2] - truth).max() < 0.1
    assert fine_cand[0, 0, 2] == 0.9
    np.testing.assert_array_equal(fine_cand[0, 1:], candidates[0, 1:])


def test_detail_removes_what_the_coarse_filter_removed(backend):
    """Where the full tile is constant over each bin, its detail is the coarse filtered
    tile repeated; texture at full resolution is kept."""
    rng = np.random.default_rng(3)
    coarse = rng.normal(100, 20, size=(2, SHAPE[0] // 2, SHAPE[1] // 2)).astype(np.float32)
    coarse[0] += np.linspace(0, 60, SHAPE[1] // 2, dtype=np.float32)  # shading
    blocky = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)
    texture, _ = _pair((0.0, 0.0), seed=3)
    fine = 20 * (texture - texture.reshape(90, 2, 120, 2).mean(axis=(1, 3)).repeat(2, 0)
                 .repeat(2, 1))  # zero mean over each bin: invisible to the coarse tile
    full = blocky + np.stack([np.zeros_like(fine), fine])
    dev = to_device(coarse, backend)
    filtered = correlate.remove_background(dev, 10.0)
    out = np.stack([to_host(refine.detail(to_device(full[i], backend), dev[i, ...],
                                          filtered[i, ...], 2)) for i in range(2)])
    expect = np.repeat(np.repeat(to_host(filtered), 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(out[0], expect[0], atol=1e-3)
    np.testing.assert_allclose(out[1] - expect[1], fine, atol=1e-3)


def test_search_and_score_filters_share_a_transform(backend):
    rng = np.random.default_rng(4)
    tiles = to_device(rng.normal(100, 20, size=(3, 48, 64)).astype(np.float32), backend)
    search, score = correlate.search_and_score_tiles(tiles, high_pass_sigma=6.0, score_sigma=4.0)
    np.testing.assert_allclose(to_host(search), to_host(correlate.remove_background(tiles, 6.0)),
                               atol=1e-3)
    np.testing.assert_allclose(
        to_host(score), to_host(correlate.score_tiles(tiles, high_pass_sigma=4.0, binning=1)),
        atol=1e-3)


def test_plans_bin_the_strips_of_large_tiles():
    default = CorrelationSettings()
    small = CorrelationPlan.make((240, 320), default)
    assert not small.refine and small.binning == 1 and small.resize == 1.0
    v3 = CorrelationPlan.make((616, 820), default)  # the OpenFlexure v3 tile
    assert v3.refine and v3.binning == 2 and v3.scaled_shape == (308, 410)
    assert v3.resize == 0.5 and v3.score_binning == 1
    assert v3.margin_px == 41  # the stage-error margin: 10% of the tile, in binned px
    hq = CorrelationPlan.make((3040, 4056), default)  # the Raspberry Pi HQ camera
    assert hq.binning == 4 and hq.scaled_shape == (760, 1014) and hq.resize == 0.25
    # An explicit --resize, or whole tiles, choose their own scale.
    assert not CorrelationPlan.make((616, 820), CorrelationSettings(resize=0.5)).refine
    assert not CorrelationPlan.make((616, 820), CorrelationSettings(search_margin=0)).refine
