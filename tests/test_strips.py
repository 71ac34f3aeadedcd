"""Correlating only the predicted overlap strips (``search_margin``), against whole tiles."""

from __future__ import annotations

import numpy as np
import pytest

import ofstitch
from ofstitch import CorrelationSettings, StitchSettings
from ofstitch.backends import backend_of
from ofstitch.graph import find_pairs
from ofstitch.stream import (
    MIN_MARGIN_PX,
    CorrelationPlan,
    correlate_pairs,
    strip_boxes,
    strip_fft_length,
)
from ofstitch.synthetic import make_scan, pair_errors, textured_pairs

TILE = (120, 160)
STRIPS = CorrelationSettings(search_margin=0.1)


@pytest.mark.parametrize("expected", [(3.0, 110.0), (84.0, -4.0), (-85.4, 2.6), (-2.0, -112.0),
                                      (80.0, 100.0)])
def test_strip_boxes_cover_the_predicted_overlap(expected):
    h, w = TILE
    margin = 20
    a_box, b_box = strip_boxes(np.array(expected), TILE, margin)
    sy, sx = (round(v) for v in expected)
    for y0, y1, x0, x1 in (a_box, b_box):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    # The overlap, in a's pixels, is inside a's crop, and the same sample pixels are
    # inside b's crop (shifted by the prediction).
    oy0, oy1, ox0, ox1 = max(0, sy), min(h, h + sy), max(0, sx), min(w, w + sx)
    assert a_box[0] <= oy0 and oy1 <= a_box[1] and a_box[2] <= ox0 and ox1 <= a_box[3]
    assert b_box[0] <= oy0 - sy and oy1 - sy <= b_box[1]
    assert b_box[2] <= ox0 - sx and ox1 - sx <= b_box[3]
    # Grown by the margin where the tile allows, and no more.
    assert a_box[0] == max(0, oy0 - margin) and a_box[3] == min(w, ox1 + margin)
    # Much smaller than a whole tile for a side neighbour.
    if abs(sy) < 10 or abs(sx) < 10:
        area = (a_box[1] - a_box[0]) * (a_box[3] - a_box[2])
        assert area < 0.6 * h * w


def test_strip_boxes_none_without_overlap():
    assert strip_boxes(np.array([0.0, 170.0]), TILE, 20) is None
    assert strip_boxes(np.array([-121.0, 0.0]), TILE, 20) is None


@pytest.mark.parametrize("len_a,len_b,centre,margin", [
    (120, 120, 0.0, 16), (68, 68, -20.0, 20), (68, 52, 20.0, 20), (300, 40, -7.5, 30)])
def test_strip_fft_length_is_free_of_wrap_around(len_a, len_b, centre, margin):
    """Circular correlation equals the linear one over the searched window."""
    rng = np.random.default_rng(len_a + len_b)
    n = strip_fft_length(len_a, len_b, centre, margin)
    assert n >= max(len_a, len_b)
    a, b = rng.normal(size=len_a), rng.normal(size=len_b)
    circ = np.fft.irfft(np.conj(np.fft.rfft(a, n)) * np.fft.rfft(b, n), n)
    # Linear: c(d) = sum_x a(x) b(x + d).
    for d in range(int(np.floor(centre - margin - 1)), int(np.ceil(centre + margin + 1)) + 1):
        lin = sum(a[x] * b[x + d] for x in range(len_a) if 0 <= x + d < len_b)
        assert circ[d % n] == pytest.approx(lin, abs=1e-8)


@pytest.fixture(scope="module")
def scan_4x4(tmp_path_factory):
    from ofstitch.synthetic import load_source

    return make_scan(tmp_path_factory.mktemp("strips") / "scan", source=load_source(),
                     grid=(4, 4), tile_shape=TILE, overlap=0.3, stage_error_px=3.0, seed=5)


def _correlate(scan, settings, backend, expected=None, batch_pairs=None):
    paths = [scan.folder / n for n in scan.names]
    pairs = find_pairs(scan.truth_px, TILE, 0.15).pairs
    truth = scan.truth_px[pairs[:, 1]] - scan.truth_px[pairs[:, 0]]
    expected = truth if expected is None else expected(truth)
    plan = CorrelationPlan.make(TILE, settings)
    shift = np.full((len(pairs), 2), np.nan)
    quality = np.full(len(pairs), np.nan)
    stats: dict = {}
    for batch in correlate_pairs(paths, pairs, expected, settings, plan, backend,
                                 batch_pairs=batch_pairs, workers=2, stats=stats):
        shift[batch.pair_ids] = batch.shift_px
        quality[batch.pair_ids] = batch.quality
    return pairs, truth, shift, quality, stats


def _textured(scan, pairs):
    from ofstitch.synthetic import textured_pairs

    return textured_pairs(scan, pairs)


def test_strips_find_the_same_shifts_as_whole_tiles(backend, scan_4x4):
    """On every backend, strips agree with whole padded tiles on the textured pairs,
    each tile is uploaded once, and the results do not depend on the batch size."""
    pairs, truth, whole, _, _ = _correlate(scan_4x4, CorrelationSettings(),
                                           backend)
    _, _, strip, quality, stats = _correlate(scan_4x4, STRIPS, backend)
    _, _, strip1, _, _ = _correlate(scan_4x4, STRIPS, backend, batch_pairs=1)
    textured = _textured(scan_4x4, pairs)
    assert textured.sum() >= 12
    assert stats["tiles_transformed"] == len(scan_4x4.names)
    np.testing.assert_allclose(strip[textured], truth[textured], atol=0.6)
    # Where whole tiles find the true shift, strips find the same sub-pixel peak (whole
    # tiles can be caught by the vignetting's peak near zero shift; strips never see it).
    whole_ok = textured & (np.linalg.norm(whole - truth, axis=1) < 1)
    assert whole_ok.sum() >= textured.sum() - 2
    np.testing.assert_allclose(strip[whole_ok], whole[whole_ok], atol=0.3)
    np.testing.assert_allclose(strip1, strip, atol=1e-3)
    assert np.all(quality[textured] > 0.9)


def test_strips_find_shifts_within_the_margin(scan_4x4):
    """A stage prediction off by less than the margin: every textured pair is found. Off
    by more: a larger margin finds more of them."""
    numpy_backend = backend_of(np.empty(0))

    def correct(off, margin):
        pairs, truth, shift, _, _ = _correlate(
            scan_4x4, CorrelationSettings(search_margin=margin), numpy_backend,
            expected=lambda t: t + np.asarray(off, dtype=float))
        textured = _textured(scan_4x4, pairs)
        err = np.linalg.norm(shift - truth, axis=1)[textured]
        return int((err < 0.6).sum()), int(textured.sum())

    found, textured = correct([0.0, 12.0], 0.1)  # margin 16 px on 160-px tiles
    assert found == textured >= 12
    narrow, _ = correct([0.0, 40.0], 0.1)
    wide, _ = correct([0.0, 40.0], 0.4)  # 64 px
    assert wide >= textured - 2
    assert narrow < wide


def test_register_with_strips_is_accurate_and_cached_per_prediction(tmp_path, source_image):
    scan = make_scan(tmp_path / "scan", source=source_image, grid=(3, 4), tile_shape=TILE,
                     seed=9)
    settings = StitchSettings(correlation=STRIPS, placement="reference")
    reg = ofstitch.register(scan.folder, settings)
    order = [scan.names.index(n) for n in reg.names]
    accepted = reg.placement.accepted
    assert accepted.sum() >= 10
    errors = pair_errors(reg.positions_px, scan.truth_px[order], reg.graph.pairs)
    assert errors[accepted].max() < 1.0
    again = ofstitch.register(scan.folder, settings)
    assert again.n_cached == len(reg.graph.pairs) and again.n_correlated == 0
    # Another camera-to-sample matrix moves the predicted overlaps: correlate again.
    moved = ofstitch.register(scan.folder, StitchSettings(
        correlation=STRIPS, placement="reference",
        csm_matrix=tuple(map(tuple, (scan.csm * 1.1).tolist())), csm_calibration_width=0))
    assert moved.n_correlated == len(moved.graph.pairs) > 0


def test_register_with_strips_and_robust_placement(tmp_path, source_image):
    """Strips carry candidate peaks and null pairs like whole tiles: robust placement
    trusts the textured pairs and places them as accurately, and a second run takes
    the candidates from the cache."""
    # Tiles of 240x320: on 120x160 ones the overlap NCC (on 60x80 binned tiles) prefers
    # a reading 4.7 px off on three pairs, with whole tiles as with strips.
    scan = make_scan(tmp_path / "scan", source=source_image, grid=(3, 4),
                     tile_shape=(240, 320), seed=9)
    reg = ofstitch.register(scan.folder, StitchSettings(correlation=STRIPS))
    assert reg.placement.method == "robust"
    order = [scan.names.index(n) for n in reg.names]
    errors = pair_errors(reg.positions_px, scan.truth_px[order], reg.graph.pairs)
    textured = textured_pairs(scan, np.asarray(order)[reg.graph.pairs])
    assert textured.sum() >= 8
    assert errors[textured].max() < 0.5
    assert reg.placement.counts()["trusted"] >= textured.sum() - 1
    assert np.isfinite(reg.placement.null_score).sum() >= 5  # the null pairs were scored
    again = ofstitch.register(scan.folder, StitchSettings(correlation=STRIPS))
    assert again.n_correlated == 0
    np.testing.assert_allclose(again.positions_px, reg.positions_px, atol=1e-6)


def test_search_margin_must_be_a_fraction():
    StitchSettings(correlation=STRIPS)  # with robust placement too
    StitchSettings(correlation=STRIPS, placement="reference")
    with pytest.raises(ofstitch.OfstitchError, match="--search-margin"):
        CorrelationSettings(search_margin=1.5)
    with pytest.raises(ofstitch.OfstitchError, match="--search-margin"):
        CorrelationSettings(search_margin=-0.1)
    assert CorrelationPlan.make(TILE, CorrelationSettings()).margin_px is None  # default
    no_pad = CorrelationSettings(pad=False, search_margin=0.1)
    assert CorrelationPlan.make(TILE, no_pad).margin_px is None
    assert CorrelationPlan.make(TILE, STRIPS).margin_px == MIN_MARGIN_PX
    assert CorrelationPlan.make((1232, 1640), STRIPS).margin_px == 164
