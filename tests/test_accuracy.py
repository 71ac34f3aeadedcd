"""Placement accuracy against exact ground truth on synthetic scans cut from a real image."""

from __future__ import annotations

import numpy as np
import pytest

import ofstitch
from ofstitch.settings import CorrelationSettings, StitchSettings
from ofstitch.synthetic import pair_errors, textured_pairs


def _errors(synth, reg):
    order = [synth.names.index(n) for n in reg.names]
    truth = synth.truth_px[order]
    pairs = reg.graph.pairs
    errors = pair_errors(reg.positions_px, truth, pairs)
    textured = textured_pairs(synth, np.asarray(order)[pairs])
    return errors, textured


CASES = {
    "v3-rotated": dict(grid=(6, 5), stage_error_px=5.0, rotation_deg=1.0, seed=3),
    "legacy-noisy": dict(grid=(5, 5), layout="legacy", stage_error_px=8.0, noise=6.0,
                         vignetting=0.3, jpeg_quality=75, seed=4),
    "v2-calibrated": dict(grid=(5, 4), layout="v2", calibration_width=832, seed=5,
                          rotation_deg=-1.5),
    "filename-grey-png": dict(grid=(4, 4), layout="filename", grey=True, extension=".png",
                              rotation_deg=0.0, seed=6),
}


@pytest.mark.parametrize("case", CASES)
def test_textured_pairs_within_one_pixel(make_synthetic, case):
    synth = make_synthetic(case, tile_shape=(240, 320), **CASES[case])
    reg = ofstitch.register(synth.folder, use_cache=False)
    errors, textured = _errors(synth, reg)
    assert textured.sum() >= len(textured) // 2  # the check has something to check
    assert errors[textured].max() <= 1.0, errors[textured]
    assert np.sqrt(np.mean(errors[textured] ** 2)) <= 0.5


def test_better_than_stage_alone(make_synthetic):
    synth = make_synthetic(grid=(5, 5), tile_shape=(240, 320), stage_error_px=10.0, seed=8)
    reg = ofstitch.register(synth.folder, use_cache=False)
    errors, textured = _errors(synth, reg)
    stage = reg.scan.stage_px
    stage_errors = pair_errors(stage, synth.truth_px[[synth.names.index(n)
                                                      for n in reg.names]], reg.graph.pairs)
    assert np.median(stage_errors[textured]) > 5 * max(np.median(errors[textured]), 0.1)


@pytest.mark.parametrize("correlation", [
    CorrelationSettings(pad=False),
    CorrelationSettings(resize=0.5),
    CorrelationSettings(corr_mask_radius=40),
    CorrelationSettings(high_pass_sigma=5),
], ids=["no-pad", "resize-0.5", "mask-radius", "sigma-5"])
def test_settings_keep_accuracy(make_synthetic, correlation):
    synth = make_synthetic(grid=(4, 4), tile_shape=(240, 320), stage_error_px=4.0, seed=9)
    reg = ofstitch.register(synth.folder, StitchSettings(correlation=correlation),
                            use_cache=False)
    errors, textured = _errors(synth, reg)
    # Half resolution correlation is accurate to about a full-resolution pixel.
    bound = 1.0 / correlation.resize
    assert errors[textured].max() <= bound, errors[textured]


def _write_grid(folder, tiles_by_name):
    import pyvips

    folder.mkdir()
    for name, arr in tiles_by_name.items():
        image = pyvips.Image.new_from_array(arr)
        if arr.dtype == np.uint16:
            image = image.copy(interpretation="grey16")
        image.write_to_file(str(folder / name))


def test_sixteen_bit_grey_scan_stitches(tmp_path):
    from ofstitch.synthetic import load_source

    grey = load_source().mean(axis=2)  # the bundled sample: tissue fills this region
    truth = {}
    tiles = {}
    for r in range(3):
        for c in range(3):
            y, x = 300 + r * 150 + (r * c) % 3, 300 + c * 200 - r
            name = f"t_{c * 200}_{r * 150}.png"
            truth[name] = (y, x)
            tiles[name] = (grey[y:y + 200, x:x + 280] * 16).astype(np.uint16)
    _write_grid(tmp_path / "scan", tiles)
    result = ofstitch.stitch(tmp_path / "scan", output_dir=tmp_path / "out")
    reg = result.registration
    assert reg.scan.bit_depth == 16
    want = np.array([truth[n] for n in reg.names], dtype=float)
    got = reg.positions_px
    assert np.abs((got - got[0]) - (want - want[0])).max() <= 1.0
    import pyvips

    mosaic = pyvips.Image.new_from_file(str(result.outputs["stitched"]))
    # 16-bit values are scaled into 8 bits, not clipped to white.
    assert 50 < mosaic.avg() < 250
    assert (mosaic.height, mosaic.width) == (round(got[:, 0].max()) + 200,
                                             round(got[:, 1].max()) + 280)


def test_blank_scan_falls_back_to_the_stage(tmp_path):
    tiles = {f"b_{c * 80}_{r * 70}.png": np.full((100, 120), 200, np.uint8)
             for r in range(2) for c in range(2)}
    _write_grid(tmp_path / "blank", tiles)
    with pytest.warns(ofstitch.OfstitchWarning, match="stage alone"):
        reg = ofstitch.register(tmp_path / "blank", use_cache=False)
    assert np.isnan(reg.shift_px).all()
    expected = np.array([[float(n.split("_")[2][:-4]), float(n.split("_")[1])]
                         for n in reg.names])
    np.testing.assert_allclose(reg.positions_px, expected - expected.min(axis=0))


def test_blank_region_does_not_pull_in_wrong_pairs(tmp_path):
    """A strip whose ends are blank slide: junk correlations there must not be trusted."""
    from ofstitch.synthetic import load_source, make_scan

    synth = make_scan(tmp_path / "strip", source=load_source(), grid=(2, 10),
                      tile_shape=(120, 160), seed=2)
    reg = ofstitch.register(synth.folder, use_cache=False)
    errors, textured = _errors(synth, reg)
    assert textured.any() and not textured.all()
    assert errors[textured].max() <= 1.0
    # Pairs without texture fall back to the stage: off by the stage error, not by 100+ px.
    assert errors.max() < 40


def test_large_tiles_coarse_to_fine(make_synthetic, source_image):
    """Whole tiles (--search-margin 0) with a short side of 800 px or more are searched
    binned 2x2 and refined on the full-resolution overlaps: as accurate as whole tiles
    at full resolution."""
    from ofstitch.stream import CorrelationPlan
    from ofstitch.synthetic import load_source

    src = load_source(source_image) if not isinstance(source_image, np.ndarray) else source_image
    src = np.concatenate([src, src[:, ::-1]], axis=1)  # wide enough for 2x2 big tiles
    whole = CorrelationSettings(search_margin=0.0)
    plan = CorrelationPlan.make((800, 1000), whole)
    assert plan.refine and plan.scaled_shape == (400, 500) and plan.resize == 0.5
    assert not CorrelationPlan.make((624, 832), whole).refine
    synth = make_synthetic(source=src, grid=(2, 2), tile_shape=(800, 1000),
                           stage_error_px=6.0, rotation_deg=0.7, seed=2)
    reg = ofstitch.register(synth.folder, StitchSettings(correlation=whole), use_cache=False)
    errors, textured = _errors(synth, reg)
    assert textured.sum() >= 2
    # Binned 2x2 alone is off by up to ~0.5 px here; refined, it is full-resolution work.
    assert errors[textured].max() <= 0.15, errors


def test_large_tiles_strips_coarse_to_fine(make_synthetic, source_image):
    """Overlap strips (the default) of tiles with a short side of 480 px or more are
    searched binned 2x2 and refined at full resolution (ofstitch.refine): as accurate as
    full-resolution strips."""
    from ofstitch.stream import CorrelationPlan
    from ofstitch.synthetic import load_source

    src = load_source(source_image) if not isinstance(source_image, np.ndarray) else source_image
    src = np.concatenate([src, src[:, ::-1]], axis=1)
    assert CorrelationPlan.make((624, 832), CorrelationSettings()).binning == 2
    synth = make_synthetic(source=src, grid=(2, 3), tile_shape=(624, 832),
                           stage_error_px=15.0, rotation_deg=0.7, seed=5)
    reg = ofstitch.register(synth.folder, use_cache=False)
    errors, textured = _errors(synth, reg)
    assert textured.sum() >= 4
    # Binned 2x2 alone is off by up to ~0.6 px; refined, it is full-resolution work.
    assert errors[textured].max() <= 0.15, errors
