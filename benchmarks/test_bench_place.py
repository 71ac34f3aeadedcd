"""Placement for 100, 1,000 and 10,000 tiles: the reference method (automatic threshold
search + least squares) and robust placement (the default: candidates, null, loops)."""

from __future__ import annotations

import numpy as np
import pytest

from ofstitch.graph import find_pairs
from ofstitch.place import place
from ofstitch.synthetic import pair_errors, synthetic_pair_results

TILE = (624, 832)


def _problem(n_tiles: int, seed: int = 0):
    """A square grid with 30% overlap, stage error, 0.2 px correlation noise and 5%
    wrong correlations (low quality, far from the stage)."""
    rng = np.random.default_rng(seed)
    side = int(round(np.sqrt(n_tiles)))
    rows, cols = np.divmod(np.arange(side * side), side)
    stage = np.stack([rows * TILE[0] * 0.7, cols * TILE[1] * 0.7], axis=1)
    truth = stage + rng.normal(0, 5, size=stage.shape)
    pairs = find_pairs(stage, TILE, 0.2).pairs
    shift = truth[pairs[:, 1]] - truth[pairs[:, 0]] + rng.normal(0, 0.2, size=(len(pairs), 2))
    quality = 1 - rng.uniform(1e-5, 1e-3, size=len(pairs))
    bad = rng.random(len(pairs)) < 0.05
    shift[bad] += rng.uniform(-200, 200, size=(bad.sum(), 2))
    quality[bad] = 1 - rng.uniform(1e-2, 1e-1, size=bad.sum())
    return pairs, shift, quality, stage, truth


@pytest.mark.parametrize("n_tiles", [100, 1_000, 10_000])
def test_place_robust(benchmark, n_tiles):
    side = int(round(np.sqrt(n_tiles)))
    r = synthetic_pair_results((side, side), seed=0)
    nan = np.full((len(r.pairs), 2), np.nan)
    result = benchmark.pedantic(
        place, args=(r.pairs, nan, nan[:, 0], r.stage_px, np.eye(2)),
        kwargs=dict(candidates=r.candidates, null_candidates=r.null_candidates,
                    null_stage_shift=r.null_stage_shift), rounds=3, iterations=1)
    err = pair_errors(result.positions_px, r.truth_px, r.pairs)
    assert err[r.kind != "blank"].max() < 1.0


@pytest.mark.parametrize("n_tiles", [100, 1_000, 10_000])
def test_place(benchmark, n_tiles):
    pairs, shift, quality, stage, truth = _problem(n_tiles)
    rounds = 3 if n_tiles <= 1_000 else 1
    result = benchmark.pedantic(place, args=(pairs, shift, quality, stage, np.eye(2)),
                                rounds=rounds, iterations=1)
    got = result.positions_px
    err = (got[pairs[:, 1]] - got[pairs[:, 0]]) - (truth[pairs[:, 1]] - truth[pairs[:, 0]])
    assert np.median(np.linalg.norm(err, axis=1)) < 1.0
