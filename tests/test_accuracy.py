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
