"""Stage backlash (issue 14): tiles placed by the stage alone get the offset of the
direction the stage arrived in, when the capture order is known and the located pairs
show the offset clearly; never from file order."""

from __future__ import annotations

import os

import numpy as np

from ofstitch.backlash import fit_backlash, travel_directions
from ofstitch.place import place_robust
from ofstitch.scan import load_scan
from ofstitch.synthetic import make_scan, pair_errors, synthetic_pair_results

BACKLASH_PX = 12.0


def _snake_xy(rows: int, cols: int, step: float = 100.0) -> np.ndarray:
    order = [(r, c) for r in range(rows)
             for c in (range(cols) if r % 2 == 0 else range(cols - 1, -1, -1))]
    return np.array([(c * step, r * step) for r, c in order], dtype=np.float64)


def test_travel_directions_of_a_snake_scan():
    t = travel_directions(_snake_xy(3, 4))
    # x: each row in its own direction, its first tile included; y: only at row changes.
    assert t[:, 0].tolist() == [1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1]
    assert t[:, 1].tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    assert travel_directions(np.zeros((1, 2))).tolist() == [[0, 0]]


def _snake_results(backlash_px: float, seed: int = 4):
    """Synthetic pair results of a 6x7 scan captured as a snake (rows in index order),
    the reversed rows ``backlash_px`` off along the columns, and an island of two blank
    tiles in a reversed row (placed by the stage)."""
    rows, cols = 6, 7
    r = synthetic_pair_results((rows, cols), blank_fraction=0.0, repeat_fraction=0.0,
                               stage_error_px=1.5, seed=seed)
    reverse = (np.arange(rows * cols) // cols) % 2 == 1
    offset = np.where(reverse[:, None], [0.0, backlash_px], 0.0)
    truth = r.truth_px + offset
    cands = r.candidates.copy()
    cands[..., :2] += (offset[r.pairs[:, 1]] - offset[r.pairs[:, 0]])[:, None, :]
    island = {23, 24}
    touching = np.array([a in island or b in island for a, b in r.pairs.tolist()])
    cands[touching, :, 2] = 0.05
    # Capture order is the index; in reversed rows the stage travels towards -x.
    xy = np.stack([r.stage_px[:, 1], r.stage_px[:, 0]], axis=1)
    order = np.arange(rows * cols).reshape(rows, cols)
    order[1::2] = order[1::2, ::-1]
    capture = order.ravel()
    travel = np.zeros((rows * cols, 2), np.int64)
    travel[capture] = travel_directions(xy[capture])
    return r, cands, truth, touching, travel


def test_backlash_term_places_the_stage_only_tiles_of_reversed_rows():
    r, cands, truth, touching, travel = _snake_results(BACKLASH_PX)
    kwargs = dict(null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    without = place_robust(r.pairs, cands, r.stage_px, np.eye(2), **kwargs)
    with_ = place_robust(r.pairs, cands, r.stage_px, np.eye(2), travel=travel, **kwargs)
    err_without = pair_errors(without.positions_px, truth, r.pairs)[touching]
    err_with = pair_errors(with_.positions_px, truth, r.pairs)[touching]
    assert err_without.max() > 8.0  # the island carries the whole backlash
    assert err_with.max() < 5.0  # ... and only the stage's noise with the term
    # Reversed rows sit BACKLASH_PX along the columns from the others.
    off = with_.stage_offset_px
    assert abs((off[7] - off[0])[1] - BACKLASH_PX) < 1.0
    assert abs((off[7] - off[0])[0]) < 1.0
    assert pair_errors(with_.positions_px, truth, r.pairs)[~touching].max() < 0.5


def test_no_backlash_term_without_backlash_or_capture_order():
    r, cands, truth, touching, travel = _snake_results(0.0)
    p = place_robust(r.pairs, cands, r.stage_px, np.eye(2), travel=travel,
                     null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
    assert np.all(p.stage_offset_px == 0.0)  # it explains nothing: not fitted
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]])
    stage_shift = np.tile([0.0, 100.0], (5, 1))
    shift = stage_shift + [[0.0, 6.0], [0.0, -6.0], [0.0, 6.0], [0.0, -6.0], [0.0, 6.0]]
    alternating = np.array([[1, 0], [-1, 0], [1, 0], [-1, 0], [1, 0], [-1, 0]])
    assert fit_backlash(None, pairs, stage_shift, shift, np.ones(5, bool), 50.0) is None
    found = fit_backlash(alternating, pairs, stage_shift, shift, np.ones(5, bool), 50.0)
    assert np.allclose(found.offset_px, [[0.0, -6.0], [0.0, 0.0]], atol=1e-6)
    assert np.allclose(found.pair_px(pairs), shift - stage_shift, atol=1e-6)
    assert fit_backlash(alternating, pairs, stage_shift, shift, np.ones(5, bool),
                        5.0) is None  # beyond the bound: not believed
    # Travelled one way only: nothing to tell an offset from the stage's own translation.
    one_way = np.tile([1, 0], (6, 1))
    assert fit_backlash(one_way, pairs, stage_shift, shift, np.ones(5, bool), 50.0) is None


def test_capture_order_is_known_only_from_the_tiles_own_times(tmp_path):
    exif = make_scan(tmp_path / "exif", grid=(2, 3), tile_shape=(48, 64), seed=1)
    assert load_scan(exif.folder).capture_order_known
    names = make_scan(tmp_path / "names", grid=(2, 3), tile_shape=(48, 64), seed=1,
                      layout="filename", extension=".png")
    for k, name in enumerate(names.names):  # modification times never count
        os.utime(names.folder / name, (1e9 + k, 1e9 + k))
    assert not load_scan(names.folder).capture_order_known
