"""Streaming correlation (:mod:`ofstitch.stream`): bounded working sets, decoding ahead,
batch-size independence, one host transfer per batch, and overlap strips
(``search_margin``) against whole tiles."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from array_helpers import texture

import ofstitch
from ofstitch import CorrelationSettings, StitchSettings, backends, pairs, registration, stream
from ofstitch.backends import NUMPY, backend_of
from ofstitch.errors import OfstitchWarning
from ofstitch.graph import find_pairs
from ofstitch.scan import load_scan
from ofstitch.stream import (
    ARRAYS_PER_PAIR,
    DEFAULT_BUDGET_BYTES,
    MIN_MARGIN_PX,
    CorrelationPlan,
    correlate_pairs,
    strip_boxes,
    strip_fft_length,
)
from ofstitch.synthetic import make_scan, pair_errors, textured_pairs

TILE = (120, 160)
SMALL_TILE = (64, 80)
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
    # Placed by a reading: trusted, or measured again by the local search (small overlaps).
    counts = reg.placement.counts()
    assert counts.trusted + counts.researched >= textured.sum() - 1
    assert np.isfinite(reg.placement.null_score).sum() >= 5  # the null pairs were scored
    again = ofstitch.register(scan.folder, StitchSettings(correlation=STRIPS))
    assert again.n_correlated == 0
    np.testing.assert_allclose(again.positions_px, reg.positions_px, atol=1e-6)


def test_search_margin_must_be_a_fraction():
    StitchSettings(correlation=STRIPS)  # with robust placement too
    StitchSettings(correlation=STRIPS, placement="reference")
    with pytest.raises(ofstitch.OfstitchError, match="^search_margin"):
        CorrelationSettings(search_margin=1.5)
    with pytest.raises(ofstitch.OfstitchError, match="^search_margin"):
        CorrelationSettings(search_margin=-0.1)
    # Strips by default; 0 correlates whole tiles.
    assert CorrelationPlan.make(TILE, CorrelationSettings()).margin_px == MIN_MARGIN_PX
    assert CorrelationPlan.make(TILE, CorrelationSettings(search_margin=0)).margin_px is None
    no_pad = CorrelationSettings(pad=False, search_margin=0.1)
    assert CorrelationPlan.make(TILE, no_pad).margin_px is None
    assert CorrelationPlan.make(TILE, STRIPS).margin_px == MIN_MARGIN_PX
    # Large tiles are searched binned 2x2 (ofstitch.refine): the margin is in binned px.
    assert CorrelationPlan.make((1232, 1640), STRIPS).margin_px == 82


# ----------------------------------------------------------------------------- streaming


def _png_scan(folder: Path, grid: tuple[int, int], source_shape: tuple[int, int], seed: int):
    """A scan of small PNG tiles cut from a smooth texture; pairs in row-major order."""
    tex = texture(shape=source_shape, sigma=1.0, seed=seed)
    grey = np.clip(128 + 40 * tex, 0, 255).astype(np.uint8)
    source = np.repeat(grey[..., None], 3, axis=2)
    scan = make_scan(folder, source=source, grid=grid, tile_shape=SMALL_TILE, overlap=0.3,
                     stage_error_px=2.0, rotation_deg=0.0, vignetting=0.0, noise=0.0,
                     layout="none", extension=".png", seed=seed)
    paths = [scan.folder / name for name in scan.names]
    pairs = find_pairs(scan.truth_px, SMALL_TILE, 0.15).pairs
    expected = scan.truth_px[pairs[:, 1]] - scan.truth_px[pairs[:, 0]]
    return scan, paths, pairs, expected


@pytest.fixture(scope="module")
def tall_scan(tmp_path_factory):
    """A long scan: 20 rows x 3 columns (60 tiles, snake order)."""
    return _png_scan(tmp_path_factory.mktemp("tall") / "scan", (20, 3), (1100, 360), 31)


@pytest.fixture(scope="module")
def strip_scan(tmp_path_factory):
    """A long one-row strip of 40 tiles."""
    return _png_scan(tmp_path_factory.mktemp("strip") / "scan", (1, 40), (130, 2400), 37)


def _stream_tiles(paths, pairs, expected, backend, settings=None, batch_pairs=4, stats=None):
    settings = settings or CorrelationSettings()
    plan = CorrelationPlan.make(SMALL_TILE, settings)
    shift = np.full((len(pairs), 2), np.nan)
    quality = np.full(len(pairs), np.nan)
    seen = np.zeros(len(pairs), int)
    for batch in correlate_pairs(paths, pairs, expected, settings, plan, backend,
                                 batch_pairs=batch_pairs, workers=2, stats=stats):
        assert len(batch.pair_ids) <= batch_pairs
        seen[batch.pair_ids] += 1
        shift[batch.pair_ids] = batch.shift_px
        quality[batch.pair_ids] = batch.quality
    assert np.all(seen == 1)
    return shift, quality


def test_stream_working_set_is_bounded(backend, tall_scan):
    scan, paths, pairs, expected = tall_scan
    n_tiles, cols, batch = len(paths), 3, 4
    stats = {}
    shift, quality = _stream_tiles(paths, pairs, expected, backend, batch_pairs=batch, stats=stats)
    assert stats["tiles_transformed"] == n_tiles == len(np.unique(pairs))
    # About two scan rows plus one batch's new tiles, never the whole scan.
    assert stats["max_live_spectra"] <= 2 * cols + 2 * batch
    assert stats["max_live_spectra"] <= n_tiles // 4
    assert stats["max_prefetched"] <= 8 + 2 * batch
    np.testing.assert_allclose(shift, expected, atol=0.5)
    assert np.all(quality > 0.99)


def test_stream_decodes_a_fixed_distance_ahead(tall_scan):
    """Decoded tiles wait in memory for their pairs: a fixed look-ahead, not the rest of
    the scan. Batches whose tiles are all live already (here every pair comes three
    times) used to move the window on by the look-ahead each time."""
    scan, paths, pairs, expected = tall_scan
    stats = {}
    _stream_tiles(paths, np.repeat(pairs, 3, axis=0), np.repeat(expected, 3, axis=0), NUMPY,
            batch_pairs=1, stats=stats)
    assert stats["max_prefetched"] <= 8 + 2
    assert stats["max_live_spectra"] <= 2 * 3 + 2


def test_stream_working_set_bounded_on_strip(backend, strip_scan):
    scan, paths, pairs, expected = strip_scan
    batch = 4
    stats = {}
    shift, _ = _stream_tiles(paths, pairs, expected, backend, batch_pairs=batch, stats=stats)
    assert stats["tiles_transformed"] == len(paths) == 40
    # One row: only the tiles of the current batch (and the one before it) are live.
    assert stats["max_live_spectra"] <= batch + 2
    np.testing.assert_allclose(shift, expected, atol=0.5)


def test_stream_backend_matches_numpy(backend, tall_scan):
    scan, paths, pairs, expected = tall_scan
    sub = slice(0, 20)
    ref_shift, ref_quality = _stream_tiles(paths, pairs[sub], expected[sub], NUMPY)
    shift, quality = _stream_tiles(paths, pairs[sub], expected[sub], backend)
    np.testing.assert_allclose(shift, ref_shift, atol=2e-3)
    np.testing.assert_allclose(quality, ref_quality, atol=2e-4)


def _settings_id(settings: CorrelationSettings) -> str:
    if not settings.pad:
        return "no-pad"
    return "resize" if settings.resize < 1 else "mask"


@pytest.mark.parametrize("settings", [
    CorrelationSettings(pad=False),
    CorrelationSettings(corr_mask_radius=12.0),
    CorrelationSettings(resize=0.5),
], ids=["no-pad", "mask", "resize"])
def test_stream_settings(backend, tall_scan, settings):
    scan, paths, pairs, expected = tall_scan
    sub = slice(0, 16)
    stats = {}
    shift, quality = _stream_tiles(paths, pairs[sub], expected[sub], backend, settings=settings,
                             stats=stats)
    # Without padding, 70% of each circular correlation is wrapped, unrelated content:
    # the integer reading is still right but the sub-pixel part is noisier on 64x80 tiles.
    tol = {"no-pad": 0.75, "mask": 0.5, "resize": 1.0}[_settings_id(settings)]
    np.testing.assert_allclose(shift, expected[sub], atol=tol)
    assert stats["tiles_transformed"] == len(np.unique(pairs[sub]))


def test_stream_unreadable_tile_gives_nan(backend, tall_scan, tmp_path):
    scan, paths, pairs, expected = tall_scan
    sub = slice(0, 12)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = list(paths)
    victim = int(pairs[0, 1])
    paths[victim] = broken
    with pytest.warns(ofstitch.errors.OfstitchWarning):
        shift, quality = _stream_tiles(paths, pairs[sub], expected[sub], backend)
    hit = (pairs[sub] == victim).any(axis=1)
    assert np.all(np.isnan(shift[hit])) and np.all(np.isnan(quality[hit]))
    np.testing.assert_allclose(shift[~hit], expected[sub][~hit], atol=0.5)


# ----------------------------------------------------------------------------- streaming

STRIP_TILE = (48, 64)


@pytest.fixture(scope="module")
def strip_source() -> np.ndarray:
    rng = np.random.default_rng(12)
    tex = ndi.gaussian_filter(rng.normal(size=(1300, 1300)), 1.5)
    grey = np.clip(128 + 40 * tex / tex.std(), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def strips(tmp_path_factory, strip_source):
    """PNG strips, keyed by grid: paths, pairs (row-major) and expected shifts."""
    root = tmp_path_factory.mktemp("strips")
    out = {}
    for grid in [(6, 2), (24, 2), (2, 6), (2, 24)]:
        scan = make_scan(root / f"s{grid[0]}x{grid[1]}", source=strip_source, grid=grid,
                         tile_shape=STRIP_TILE, overlap=0.3, stage_error_px=1.0,
                         rotation_deg=0.0, vignetting=0.0, noise=0.0, layout="none",
                         extension=".png", seed=grid[0])
        paths = [scan.folder / n for n in scan.names]
        pairs = find_pairs(scan.truth_px, STRIP_TILE, 0.15).pairs
        expected = scan.truth_px[pairs[:, 1]] - scan.truth_px[pairs[:, 0]]
        out[grid] = (paths, pairs, expected)
    return out


def _stream_strip(strip, backend, *, batch_pairs=None, budget_bytes=None, settings=None):
    paths, pairs, expected = strip
    settings = settings or CorrelationSettings()
    plan = CorrelationPlan.make(STRIP_TILE, settings)
    limit = batch_pairs or plan.batch_pairs(budget_bytes or DEFAULT_BUDGET_BYTES["time"])
    stats: dict = {}
    shift = np.full((len(pairs), 2), np.nan)
    quality = np.full(len(pairs), np.nan)
    seen = np.zeros(len(pairs), int)
    for batch in correlate_pairs(paths, pairs, expected, settings, plan, backend,
                                 batch_pairs=batch_pairs, budget_bytes=budget_bytes,
                                 workers=2, stats=stats):
        assert len(batch.pair_ids) <= limit
        assert isinstance(batch.shift_px, np.ndarray) and isinstance(batch.quality, np.ndarray)
        seen[batch.pair_ids] += 1
        shift[batch.pair_ids] = batch.shift_px
        quality[batch.pair_ids] = batch.quality
    assert np.all(seen == 1)
    assert stats["tiles_transformed"] == len(paths)  # each tile transformed once
    return shift, quality, stats


@pytest.mark.parametrize("batch", [1, 4])
def test_live_spectra_do_not_grow_with_the_scan(backend, strips, batch):
    """A 6x2 and a 24x2 strip: four times the tiles, the same live set."""
    _, _, short = _stream_strip(strips[(6, 2)], backend, batch_pairs=batch)
    _, _, long = _stream_strip(strips[(24, 2)], backend, batch_pairs=batch)
    assert len(strips[(24, 2)][0]) == 4 * len(strips[(6, 2)][0])
    assert long["max_live_spectra"] <= short["max_live_spectra"] + 1
    assert long["max_live_spectra"] <= 2 * 2 + 2 * batch  # two scan rows plus a batch
    assert long["max_live_spectra"] < len(strips[(24, 2)][0]) // 4


def test_live_spectra_bounded_by_the_budget_not_the_scan(strips):
    paths, pairs, _ = strips[(24, 2)]
    plan = CorrelationPlan.make(STRIP_TILE, CorrelationSettings())
    per_pair = ARRAYS_PER_PAIR * 4 * plan.fft_shape[0] * plan.fft_shape[1]
    lives = {}
    for k in (1, 3, 8):
        _, _, stats = _stream_strip(strips[(24, 2)], NUMPY, budget_bytes=k * per_pair)
        lives[k] = stats["max_live_spectra"]
        assert lives[k] <= 2 * 2 + 2 * k
    assert lives[1] <= lives[3] <= lives[8] < len(paths)


def test_wide_strip_live_set_is_about_one_row(strips):
    """Row-major order: a wide scan keeps about one scan row live (by design)."""
    for cols, batch in [(6, 1), (24, 1), (24, 4)]:
        _, _, stats = _stream_strip(strips[(2, cols)], NUMPY, batch_pairs=batch)
        assert stats["max_live_spectra"] <= cols + batch + 2


@pytest.mark.parametrize("settings", [CorrelationSettings(), CorrelationSettings(pad=False),
                                      CorrelationSettings(corr_mask_radius=10.0)],
                         ids=["pad", "no-pad", "mask"])
def test_results_do_not_depend_on_the_batch_size(backend, strips, settings):
    strip = strips[(6, 2)]
    s1, q1, _ = _stream_strip(strip, backend, batch_pairs=1, settings=settings)
    s8, q8, _ = _stream_strip(strip, backend, batch_pairs=8, settings=settings)
    sb, qb, _ = _stream_strip(strip, backend, budget_bytes=1, settings=settings)  # batch of one
    np.testing.assert_allclose(s8, s1, atol=1e-4, rtol=0)
    np.testing.assert_allclose(q8, q1, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(sb, s1)
    np.testing.assert_array_equal(qb, q1)
    if settings.pad:  # unpadded 48x64 tiles are too small to be reliable
        _, _, expected = strip
        assert np.abs(s1 - expected).max() < 1.0


def test_results_identical_whatever_the_batch_size_numpy(strips):
    strip = strips[(24, 2)]
    s1, q1, _ = _stream_strip(strip, NUMPY, batch_pairs=1)
    s8, q8, _ = _stream_strip(strip, NUMPY, batch_pairs=8)
    sall, qall, _ = _stream_strip(strip, NUMPY, batch_pairs=len(strip[1]))
    np.testing.assert_array_equal(s8, s1)
    np.testing.assert_array_equal(q8, q1)
    np.testing.assert_array_equal(sall, s1)
    np.testing.assert_array_equal(qall, q1)


def test_batches_on_threads_give_the_same_readings_in_order(strips):
    """On the CPU, batches run on as many threads as there are workers: the readings are
    the same as one batch at a time, and they come back in the pairs' order."""
    paths, pairs, expected = strips[(24, 2)]
    settings = CorrelationSettings()
    plan = CorrelationPlan.make(STRIP_TILE, settings)
    runs = {}
    for workers in (1, 4):
        ids, shifts, candidates = [], [], []
        for batch in correlate_pairs(paths, pairs, expected, settings, plan, NUMPY,
                                     batch_pairs=2, workers=workers):
            ids.append(batch.pair_ids)
            shifts.append(batch.shift_px)
            candidates.append(batch.candidates)
        runs[workers] = (np.concatenate(ids), np.concatenate(shifts),
                         np.concatenate(candidates))
    for ids, _, _ in runs.values():
        np.testing.assert_array_equal(ids, np.arange(len(pairs)))
    np.testing.assert_array_equal(runs[4][1], runs[1][1])
    np.testing.assert_array_equal(runs[4][2], runs[1][2])
    assert np.abs(runs[4][1] - expected).max() < 1.0


# ------------------------------------------------------------------ host transfers


@pytest.mark.parametrize("pad", [True, False])
def test_one_host_transfer_per_batch(make_synthetic, monkeypatch, pad):
    """Scores come back per batch, not per pair: on a device whose scalars refuse to
    convert, the whole correlation runs, and transfers do not grow with the pairs."""
    import array_api_strict as xps

    xps.set_array_api_strict_flags(api_version="2024.12")
    backend = backends.Backend("array_api_strict", xps, xps.Device("device1"))
    Array = type(xps.asarray(0.0))

    def refuse(self, *args):
        raise AssertionError("a per-element host sync (float/int/bool of a device array)")

    for method in ("__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(Array, method, refuse)
    transfers = []
    real = pairs.to_host

    def counting(x):
        transfers.append(x.shape)
        return real(x)

    monkeypatch.setattr(pairs, "to_host", counting)
    scan_files = make_synthetic(grid=(3, 3), tile_shape=(96, 128), seed=2)
    scan = load_scan(scan_files.folder)
    graph = find_pairs(scan.stage_px, scan.tile_shape, 0.2)
    settings = StitchSettings(correlation=CorrelationSettings(pad=pad), batch_pairs=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OfstitchWarning)
        readings = registration.correlate(scan, graph.pairs,
                                          registration.expected_shifts(scan, graph.pairs),
                                          settings, backend, cache=None)
    assert np.isfinite(readings.candidates[..., 2]).any()
    assert len(graph.pairs) == 12  # one batch
    # A few transfers per batch (peaks, candidates, the batch's scores), never one per
    # pair or per candidate.
    assert len(transfers) < len(graph.pairs), transfers


def test_candidates_at_one_overlap_are_scored_once(monkeypatch):
    """Candidates of a pair that round to the same binned shift share one overlap: its sums
    are taken once, each candidate gets the NCC (scaled by the overlap's area) and keeps
    its own sub-pixel shift; a shift leaving too small an overlap scores -1."""
    from ofstitch import overlap

    rng = np.random.default_rng(3)
    field = ndi.gaussian_filter(rng.normal(size=(40, 80)), 1.0).astype(np.float32)
    live = {0: field[:32, :40], 1: field[2:34, 25:65]}  # b at (2, 25) binned px from a
    plan = CorrelationPlan((64, 80), (64, 80), (128, 160), 1.0, margin_px=16)
    assert plan.score_binning == 2
    calls = []
    real = overlap.overlap_sums_many

    def counting(tiles_a, tiles_b, shifts):
        calls.extend(shifts)
        return real(tiles_a, tiles_b, shifts)

    monkeypatch.setattr(overlap, "overlap_sums_many", counting)
    shift = np.full((1, 5, 2), np.nan)
    shift[0, :4] = [(4.3, 50.2), (3.6, 49.8), (4.4, 54.1), (60.0, 75.0)]
    out = stream._score_candidates(np.array([[0, 1]]), shift, None, np.array([[4.0, 50.0]]),
                                   live, plan, True)
    assert sorted(calls) == [(2, 25), (2, 27)]  # the first two share (2, 25)
    np.testing.assert_allclose(out[0, :4, :2], shift[0, :4], atol=1e-12)
    want = overlap.overlap_similarity(live[0], live[1], (2, 25))
    assert want > 0.99 and out[0, 0, 2] == out[0, 1, 2] == pytest.approx(want, abs=1e-5)
    area = overlap.overlap_area((32, 40), (2, 27))
    expected_area = (32 - 2) * (40 - 25)
    assert out[0, 2, 2] == pytest.approx(
        overlap.overlap_similarity(live[0], live[1], (2, 27))
        * min(1.0, np.sqrt(area / expected_area)), abs=1e-5)
    assert out[0, 3, 2] == -1.0
    assert np.isnan(out[0, 4]).all()
