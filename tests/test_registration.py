"""The registration core: batch and live runs agree, and batches come back in one transfer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import pyvips

import ofstitch
from ofstitch import backends, local_pass, registration
from ofstitch.cache import CorrelationCache
from ofstitch.graph import find_pairs
from ofstitch.live import AddStatus, LiveStitcher
from ofstitch.scan import load_scan
from ofstitch.settings import CorrelationSettings, StitchSettings


def _jpeg_pixels(path) -> np.ndarray:
    return pyvips.Image.new_from_file(str(path)).numpy()


@pytest.mark.parametrize("placement", ["robust", "reference"])
def test_live_and_batch_agree(make_synthetic, tmp_path, placement):
    """Tiles added one by one give the batch positions (1e-6 px) and the batch preview,
    pixel for pixel."""
    source = make_synthetic("source", grid=(3, 4), tile_shape=(200, 260), seed=5)
    folder = tmp_path / "live"
    folder.mkdir()
    settings = StitchSettings(placement=placement)
    with LiveStitcher(folder, settings, settle_time=0) as live:
        for name in source.names:
            shutil.copy(source.folder / name, folder / name)
            assert live.add(folder / name) == AddStatus.ADDED
        live.refine()
        assert live.exact
        live.preview(path=tmp_path / "live-preview.jpg")
    out = tmp_path / "batch"
    result = ofstitch.stitch(folder, StitchSettings(placement=placement,
                                                    stitching_mode="preview"), output_dir=out)
    batch = result.registration
    assert batch.n_correlated == 0  # the live run left every pair in the cache
    got, want = live.positions(), batch.positions()
    assert set(got) == set(want)
    assert max(np.abs(np.subtract(got[n], want[n])).max() for n in got) < 1e-6
    if placement == "robust":  # the live snapshot carries the batch run's report
        assert live.snapshot().report.lines() == batch.placement.report.lines()
    live_pixels = _jpeg_pixels(tmp_path / "live-preview.jpg")
    batch_pixels = _jpeg_pixels(result.outputs["preview"])
    assert live_pixels.shape == batch_pixels.shape
    np.testing.assert_array_equal(live_pixels, batch_pixels)


def test_live_groups_are_placed_where_the_stage_puts_them(make_synthetic, tmp_path):
    """Before the scan connects, each group of tiles is placed on its own by the core."""
    source = make_synthetic("source", grid=(1, 4), tile_shape=(120, 160), seed=3)
    folder = tmp_path / "live"
    folder.mkdir()
    with LiveStitcher(folder, settle_time=0, use_cache=False) as live:
        for name in (source.names[0], source.names[1], source.names[3]):
            shutil.copy(source.folder / name, folder / name)
            live.add(folder / name)
        snap = live.snapshot()
    assert snap.n_components == 2
    stage = load_scan(folder).stage_px
    # The lone tile keeps its stage offset from the pair's centre, within the pair's
    # own correction.
    lone = snap.names.index(source.names[3])
    offset = snap.positions_px[lone] - snap.positions_px[[i for i in range(3) if i != lone]].mean(0)
    stage_offset = stage[lone] - stage[[i for i in range(3) if i != lone]].mean(0)
    assert np.abs(offset - stage_offset).max() < 20


def test_readings_keep_the_order_of_the_pairs(make_synthetic):
    scan_files = make_synthetic(grid=(2, 3), tile_shape=(96, 128), seed=1)
    scan = load_scan(scan_files.folder)
    graph = find_pairs(scan.stage_px, scan.tile_shape, 0.2)
    plan = registration.plan_pairs(scan, graph, StitchSettings())
    assert len(plan.null_pairs)  # robust placement calibrates on tiles that do not overlap
    streamed = registration.correlate(scan, plan.stream_pairs, plan.stream_expected,
                                      StitchSettings(), backends.NUMPY, cache=None)
    graph_readings, null_readings = plan.split(streamed)
    alone = registration.correlate(scan, graph.pairs, plan.expected, StitchSettings(),
                                   backends.NUMPY, cache=None)
    np.testing.assert_array_equal(graph_readings.shift_px, alone.shift_px)
    assert len(null_readings.shift_px) == len(plan.null_pairs)
    assert not graph_readings.cached.any() and alone.n_correlated == len(graph.pairs)


def test_cache_lookup_is_typed(make_synthetic, tmp_path):
    scan_files = make_synthetic(grid=(2, 2), tile_shape=(96, 128), seed=1)
    scan = load_scan(scan_files.folder)
    graph = find_pairs(scan.stage_px, scan.tile_shape, 0.2)
    cache = CorrelationCache(tmp_path / "cache.json")
    expected = registration.expected_shifts(scan, graph.pairs)
    first = registration.correlate(scan, graph.pairs, expected, StitchSettings(),
                                   backends.NUMPY, cache=cache)
    hit = cache.lookup(CorrelationSettings(), [f.key for f in scan.files], graph.pairs,
                       expected, scan.tile_shape)
    assert hit.found.all()
    np.testing.assert_array_equal(hit.shift_px, first.shift_px)
    np.testing.assert_array_equal(hit.candidates[..., 2], first.candidates[..., 2])


def test_only_correlate_fills_the_cache_and_skips_the_local_search(make_synthetic, monkeypatch):
    """A run that only correlates does not run the local search (the run that places
    the tiles does, and caches its results); a later run correlates nothing."""
    scan_files = make_synthetic(grid=(3, 3), tile_shape=(120, 160), seed=2)
    searched = []
    real_search = registration.local_search

    def counting(*args, **kwargs):
        searched.append(1)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(registration, "local_search", counting)
    ofstitch.stitch(scan_files.folder, StitchSettings(stitching_mode="only-correlate"))
    assert not searched
    reg = ofstitch.register(scan_files.folder)
    assert searched and reg.n_correlated == 0 and reg.n_cached == len(reg.graph.pairs)


def test_a_second_run_takes_the_local_search_from_the_cache(make_synthetic, monkeypatch):
    """The local search's results are cached with the correlations: a second run on the
    same tiles searches nothing and places every tile where the first did, as a run
    without the cache does."""
    scan_files = make_synthetic(grid=(3, 3), tile_shape=(120, 160), seed=2)
    searched = []
    real_search = local_pass.search_pairs

    def counting(paths, pairs, *args, **kwargs):
        searched.append(len(pairs))
        return real_search(paths, pairs, *args, **kwargs)

    monkeypatch.setattr(local_pass, "search_pairs", counting)
    first = ofstitch.register(scan_files.folder)
    assert sum(searched) > 0 and first.placement.counts().researched > 0
    searched.clear()
    second = ofstitch.register(scan_files.folder)
    assert sum(searched) == 0
    np.testing.assert_array_equal(second.positions_px, first.positions_px)
    assert second.placement.counts() == first.placement.counts()
    fresh = ofstitch.register(scan_files.folder, use_cache=False)
    assert sum(searched) > 0
    np.testing.assert_array_equal(fresh.positions_px, first.positions_px)
