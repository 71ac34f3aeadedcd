"""Robust placement: candidate peaks, null pairs, the stage model, loops and islands."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import run_main

import ofstitch
from ofstitch import correlate, graph, overlap
from ofstitch.backends import to_host
from ofstitch.place import (
    RESEARCHED,
    STAGE_ONLY,
    TRUSTED,
    fit_stage_model,
    null_threshold,
    place,
    place_robust,
)
from ofstitch.settings import StitchSettings
from ofstitch.synthetic import (
    make_hard_scan,
    pair_errors,
    synthetic_pair_results,
    textured_pairs,
)

# ----------------------------------------------------------------------------- kernels


def test_top_peaks_finds_distinct_peaks_in_order(backend):
    xp = backend.xp
    rng = np.random.default_rng(0)
    corr = rng.normal(0, 0.05, (2, 64, 80)).astype(np.float32)
    corr[0, 10, 20] = 5.0
    corr[0, 11, 20] = 4.5  # the shoulder of the first peak: not a candidate
    corr[0, 64 - 15, 3] = 4.0
    corr[0, 2, 3] = 9.0  # inside the zero-shift exclusion: never a candidate
    corr[1] = 0.0  # flat: no candidates at all
    shift = to_host(correlate.top_peaks(xp.asarray(corr, device=backend.device), 3)[0])
    assert shift.shape == (2, 3, 2)
    np.testing.assert_allclose(shift[0, 0], [-10, -20], atol=0.5)  # shift = -displacement
    np.testing.assert_allclose(shift[0, 1], [15, -3], atol=0.5)
    assert np.linalg.norm(shift[0, 2] - shift[0, 0]) > 4  # not the shoulder
    assert np.isnan(shift[1]).all()


def test_overlap_similarity_leaves_out_the_margin():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 80)).astype(np.float32)
    b = np.zeros_like(a)
    b[:, :60] = a[:, 20:]  # b is a shifted right by 20
    b[:4, :] = 50.0  # a bright edge band on b only
    assert overlap.overlap_similarity(a, b, (0, 20), margin=6) == pytest.approx(1.0,
                                                                                   abs=1e-5)
    assert overlap.overlap_similarity(a, b, (0, 20)) < 0.9
    # Too small an overlap is no evidence.
    assert overlap.overlap_similarity(a, b, (0, 78), min_area=200) == -1.0


# ----------------------------------------------------------------------------- null pairs


def test_null_pairs_do_not_overlap_and_imitate_real_pairs():
    tile = (100, 120)
    step = (70, 84)
    stage = np.array([(r * step[0], c * step[1]) for r in range(4) for c in range(5)], float)
    g = graph.find_pairs(stage, tile, 0.1)
    null, searched = graph.null_pairs(stage, tile, g.pairs)
    assert len(null) >= 10
    known = {tuple(p) for p in g.pairs.tolist()}
    for (a, c), e in zip(null.tolist(), searched, strict=True):
        assert (a, c) not in known and (c, a) not in known
        gap = np.abs(stage[c] - stage[a])
        assert gap[0] >= tile[0] or gap[1] >= tile[1]  # no overlap
        # Searched around the shift of a real pair of the same tile a.
        assert any(np.allclose(stage[b] - stage[a], e) for a2, b in g.pairs.tolist()
                   if a2 == a)
    order = graph.interleave(g.pairs, null)
    assert sorted(order.tolist()) == list(range(len(g.pairs) + len(null)))
    combined = np.concatenate([g.pairs, null])[order]
    first = {}
    for k, (a, b) in enumerate(combined.tolist()):
        if k < len(combined) and order[k] >= len(g.pairs):  # a null pair ...
            assert a in first and b in first  # ... comes after both tiles are in use
        first.setdefault(a, k)
        first.setdefault(b, k)


def test_null_threshold_is_a_high_quantile_with_a_floor():
    # Chance-level scores whose Fisher z follows a Gumbel law: the threshold is its
    # (1 - fpr) quantile, above nearly every chance score.
    rng = np.random.default_rng(0)
    z = rng.gumbel(0.3, 0.05, 2000)
    thr = null_threshold(np.tanh(z), fpr=0.01)
    assert np.arctanh(thr) == pytest.approx(0.3 - 0.05 * np.log(-np.log(0.99)), abs=0.01)
    assert np.mean(np.tanh(z) > thr) < 0.02
    assert null_threshold(np.array([0.01, 0.02, 0.0])) == pytest.approx(0.2)  # the floor
    assert null_threshold(np.array([np.nan, 0.7])) == pytest.approx(0.2)  # too few: floor


def test_stage_model_ignores_a_few_wrong_pairs():
    rng = np.random.default_rng(3)
    stage = rng.uniform(-600, 600, (200, 2))
    affine = np.array([[0.99, 0.035], [-0.035, 0.99]])
    shift = stage @ affine + rng.normal(0, 2.0, stage.shape)
    shift[:10] += 150.0  # wrong correlations
    fitted, sigma = fit_stage_model(stage, shift)
    np.testing.assert_allclose(fitted, affine, atol=0.01)
    assert 1.0 < sigma < 4.0


# ----------------------------------------------------------------------------- placement


def _errors(result, placement):
    truth = result.truth_px
    return pair_errors(placement.positions_px, truth, result.pairs)


def test_robust_placement_of_synthetic_results_is_exact_where_there_is_content():
    r = synthetic_pair_results((12, 14), seed=5)
    p = place_robust(r.pairs, r.candidates, r.stage_px, np.eye(2),
                     null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    err = _errors(r, p)
    content = r.kind != "blank"
    assert err[content].max() < 1.0
    assert (r.kind == "repeat").sum() >= 1 and err[r.kind == "repeat"].max() < 1.0
    # Blank pairs are placed by the stage model: within the stage's error, not lost.
    assert err[~content].max() < 6 * 20
    counts = p.counts()
    assert counts.trusted > 0.8 * len(r.pairs)
    assert sum(counts) == len(r.pairs)
    assert set(np.unique(p.status)) <= {TRUSTED, RESEARCHED, STAGE_ONLY}


def test_a_wrong_pair_that_beats_the_null_is_dropped_by_its_loops():
    r = synthetic_pair_results((6, 6), blank_fraction=0.0, repeat_fraction=0.0, seed=2)
    cands = r.candidates.copy()
    k = 7
    true_shift = r.truth_px[r.pairs[k, 1]] - r.truth_px[r.pairs[k, 0]]
    cands[k, :, 2] = np.minimum(cands[k, :, 2], 0.1)
    cands[k, 0] = [true_shift[0] + 9.0, true_shift[1] - 6.0, 0.55]  # wrong, but above chance
    p = place_robust(r.pairs, cands, r.stage_px, np.eye(2),
                     null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    assert p.status[k] == STAGE_ONLY
    assert _errors(r, p).max() < 1.0


def test_one_far_wrong_pair_costs_no_right_pairs():
    """A wrong pair far off bends the loops around it: the echoes in its neighbours'
    residuals go away once it is dropped, and no right pair is dropped with it."""
    r = synthetic_pair_results((8, 8), blank_fraction=0.0, repeat_fraction=0.0, seed=3)
    cands = r.candidates.copy()
    k = 40
    true_shift = r.truth_px[r.pairs[k, 1]] - r.truth_px[r.pairs[k, 0]]
    cands[k, :, 2] = np.minimum(cands[k, :, 2], 0.1)
    cands[k, 0] = [true_shift[0] + 30.0, true_shift[1] - 30.0, 0.5]  # wrong by 42 px
    p = place_robust(r.pairs, cands, r.stage_px, np.eye(2),
                     null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    dropped = np.flatnonzero(p.status == STAGE_ONLY)
    assert dropped.tolist() == [k]
    assert _errors(r, p).max() < 1.0


def test_a_blank_island_is_placed_by_the_stage_and_does_not_bend_the_rest():
    r = synthetic_pair_results((6, 7), blank_fraction=0.0, repeat_fraction=0.0, seed=4)
    cands = r.candidates.copy()
    island = {15, 16}  # two tiles with no content: every pair touching them is blank
    touching = np.array([a in island or b in island for a, b in r.pairs.tolist()])
    cands[touching, :, 2] = 0.05
    p = place_robust(r.pairs, cands, r.stage_px, np.eye(2),
                     null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    err = _errors(r, p)
    assert (p.status[touching] == STAGE_ONLY).all()
    assert err[~touching].max() < 0.5  # the rest is not pulled by the island's stage links
    assert np.isfinite(p.positions_px).all()


def test_placement_dispatch_and_errors():
    r = synthetic_pair_results((3, 3), seed=0)
    nan_shift = np.full((len(r.pairs), 2), np.nan)
    quality = np.full(len(r.pairs), np.nan)
    with pytest.raises(ofstitch.OfstitchError, match="unknown placement"):
        place(r.pairs, nan_shift, quality, r.stage_px, np.eye(2), method="magic")
    with pytest.raises(ofstitch.OfstitchError, match="candidate peaks"):
        place(r.pairs, nan_shift, quality, r.stage_px, np.eye(2), method="robust")
    empty = np.full_like(r.candidates, np.nan)
    with pytest.warns(ofstitch.OfstitchWarning, match="stage alone"):
        p = place(r.pairs, nan_shift, quality, r.stage_px, np.eye(2), candidates=empty)
    assert p.n_accepted == 0


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def hard_scan(tmp_path_factory):
    from conftest import SHARED_DATA

    from ofstitch.synthetic import load_source

    shared = SHARED_DATA / "cmu1-he" / "CMU-1-Small-Region.jpg"
    if not shared.is_file():
        pytest.skip("the hard scan is cut from the full-size CMU-1 image in "
                    "../shared/data/cmu1-he (the bundled copy is downscaled)")
    src = load_source(shared)
    folder = tmp_path_factory.mktemp("hard") / "scan"
    # The hard scan of the benchmarks (blank areas, 10% blank tiles, dim content, stage
    # noise 20 px, 2 degree rotation, snake with backlash), on a smaller grid.
    return make_hard_scan(folder, source=src, grid=(8, 8), seed=1)


def _textured_errors(scan, reg):
    order = [scan.names.index(n) for n in reg.names]
    pairs = reg.graph.pairs
    mapped = np.array([[order[a], order[b]] for a, b in pairs])
    err = pair_errors(reg.positions_px, scan.truth_px[order], pairs)
    return err[textured_pairs(scan, mapped)]


def test_robust_placement_meets_the_target_on_a_hard_scan(hard_scan):
    reg = ofstitch.register(hard_scan.folder, StitchSettings())
    assert reg.placement.method == "robust"
    err = _textured_errors(hard_scan, reg)
    assert len(err) >= 20
    assert err.max() <= 2.0 and np.sqrt(np.mean(err**2)) <= 0.5, err.round(2)
    ref = ofstitch.register(hard_scan.folder, StitchSettings(placement="reference"))
    ref_err = _textured_errors(hard_scan, ref)
    assert np.sqrt(np.mean(err**2)) <= np.sqrt(np.mean(ref_err**2)) + 0.05


def test_cli_placement_option_and_summary(hard_scan, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_main(hard_scan.folder, "--stitching-mode", "preview", "-o", out,
                      "--placement", "reference", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "trusted" in result.stdout and "placed by stage only" in result.stdout
    assert "Thresholds: peak quality" in result.stdout
    assert (out / "stitching_residuals.png").stat().st_size > 1000
    result = run_main(hard_scan.folder, "--stitching-mode", "preview", "-o", out, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "re-searched" in result.stdout and "chance level" in result.stdout
    assert "placed by stage only" in result.stdout and "stage-only" not in result.stdout


def test_island_pairs_join_islands_by_their_smaller_overlaps():
    from ofstitch.registration import ISLAND_MIN_OVERLAP, island_pairs

    class Grid:  # the parts of a Scan that island_pairs reads
        tile_shape = (100, 120)
        stage_px = np.array([(r * 70.0, c * 84.0) for r in range(3) for c in range(3)])

        def __len__(self):
            return 9

    scan = Grid()
    g = graph.find_pairs(scan.stage_px, scan.tile_shape, 0.2)
    used = np.ones(len(g.pairs), bool)
    assert len(island_pairs(scan, g, used)) == 0  # one group: nothing to add
    # Tile 4 (the centre) is an island: none of its pairs was used.
    used = ~np.any(g.pairs == 4, axis=1)
    extra = island_pairs(scan, g, used)
    assert len(extra) == 4  # its four diagonal neighbours
    assert all(4 in p for p in extra.tolist())
    overlap = graph.predicted_overlap(scan.stage_px, scan.tile_shape, extra[:, 0], extra[:, 1])
    assert np.all((overlap > ISLAND_MIN_OVERLAP) & (overlap < 0.2))
