"""The constrained local search (issue 14): full-resolution overlap NCC at every integer
shift of a window around the stage prediction, for the pairs placement did not locate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from ofstitch import local_search, overlap
from ofstitch.backends import select_backend, to_host


def _texture(shape, seed=0, smooth=1.5):
    rng = np.random.default_rng(seed)
    return scipy.ndimage.gaussian_filter(rng.normal(size=shape), smooth).astype(np.float32)


@pytest.mark.parametrize(("centre", "r"), [((3, 50), 4), ((-20, 7), 4), ((30, -41), 4),
                                           ((-5, -60), 4), ((40, 2), 9), ((0, -58), 7),
                                           ((2, 30), 20), ((-25, 0), 24)])
def test_surface_is_the_overlap_ncc_at_every_shift(centre, r):
    # The surface is computed on crops of the tiles (what the window can overlap): every
    # shift must still score exactly the overlap NCC of the whole tiles, also where the
    # window runs past the tiles' borders.
    rng = np.random.default_rng(1)
    h, w = 48, 64
    a = rng.normal(size=(h, w)).astype(np.float32)
    b = rng.normal(size=(h, w)).astype(np.float32)
    s = np.asarray(local_search._surfaces([(a, (0, 0))], [(b, (0, 0))], np.array([centre]), r,
                                          select_backend("cpu").xp, (h, w)))[0]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shift = (centre[0] + dy, centre[1] + dx)
            if np.isnan(s[dy + r, dx + r]):  # too small an overlap: not scored
                assert overlap.overlap_area((h, w), shift) < 0.2 * overlap.overlap_area(
                    (h, w), centre) + 4
                continue
            assert s[dy + r, dx + r] == pytest.approx(
                overlap.overlap_similarity(a, b, shift), abs=1e-4)


def _tile_pair(tmp_path, image, shift, shape, name):
    """Two tiles cut from ``image``; tile b sits ``shift`` from tile a."""
    import imageio.v3 as iio

    h, w = shape
    y0, x0 = 20, 20
    a = image[y0:y0 + h, x0:x0 + w]
    b = image[y0 + shift[0]:y0 + shift[0] + h, x0 + shift[1]:x0 + shift[1] + w]
    paths = []
    for tag, tile in (("a", a), ("b", b)):
        grey = np.clip(128 + 40 * tile / (tile.std() + 1e-9), 0, 255).astype(np.uint8)
        path = tmp_path / f"{name}_{tag}.png"
        iio.imwrite(path, grey)
        paths.append(path)
    return paths


def test_located_optimum_at_the_true_shift_and_a_straight_edge_is_not_located(tmp_path):
    shape = (48, 64)
    truth = (34, 3)  # a 14 x 61 px overlap, as on the 48x64 benchmark scan
    textured = _texture((200, 200), seed=2)
    edge = np.zeros((200, 200), np.float32)
    edge[:, 60:] = 1.0  # a vertical edge: located across (x), not along (y)
    edge += 0.01 * _texture((200, 200), seed=3)
    paths = _tile_pair(tmp_path, textured, truth, shape, "tex") + \
        _tile_pair(tmp_path, edge, truth, shape, "edge")
    pairs = np.array([[0, 1], [2, 3]])
    centre = np.array([[29.6, 7.2], [29.6, 7.2]])  # the stage, 4-6 px off
    found = local_search.search_pairs(paths, pairs, centre, 9.0, shape,
                                      select_backend("cpu"))
    assert found.located.tolist() == [True, False]
    assert np.abs(found.shift_px[0] - truth).max() <= 0.5
    assert found.score[0] > 0.8


def test_one_host_transfer_per_batch(tmp_path, monkeypatch):
    shape = (48, 64)
    image = _texture((200, 200), seed=4)
    paths = []
    for k in range(4):
        paths += _tile_pair(tmp_path, image, (34, 2 * k), shape, f"p{k}")
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    centre = np.array([[32.0, 0.0]] * 4)
    calls = []
    real = local_search.to_host

    def counting(x):
        calls.append(1)
        return real(x)

    monkeypatch.setattr(local_search, "to_host", counting)
    monkeypatch.setattr(local_search, "BATCH_BYTES", 1)  # one pair per batch
    found = local_search.search_pairs(paths, pairs, centre, 8.0, shape, select_backend("cpu"))
    assert len(calls) == 4
    assert found.located.all()
    assert np.abs(found.shift_px - np.array([[34, 2 * k] for k in range(4)])).max() <= 0.5


@pytest.mark.parametrize("shape", [(48, 64), (150, 97), (311, 410)])
def test_high_pass_matches_the_mirrored_filter_of_score_tiles(backend, shape):
    # The local search filters each tile mirrored only 6 sigma beyond its borders (a
    # quarter of the transform): inside the tile it must equal score_tiles' filter of the
    # whole mirrored image, on every backend, and stay where the tile is.
    from array_helpers import assert_array

    from ofstitch import correlate

    tiles = np.stack([_texture(shape, seed=5), 10 + 3 * _texture(shape, seed=6, smooth=4)])
    x = backend.asarray(tiles)
    got = local_search.high_pass(x, local_search.HIGH_PASS_SIGMA_PX)
    assert_array(backend, got, dtype=x.dtype, shape=tiles.shape)
    want = correlate.score_tiles(x, high_pass_sigma=local_search.HIGH_PASS_SIGMA_PX, binning=1)
    got, want = to_host(got), to_host(want)
    assert np.abs(got - want).max() <= 1e-4 * want.std()


@pytest.mark.parametrize("box", [(40, 110, 60, 140), (0, 30, 0, 197), (120, 150, 170, 197),
                                 (0, 150, 0, 197), (70, 73, 10, 190)])
def test_a_tile_filtered_in_part_equals_the_whole_tile_there(backend, box):
    # The local search filters only the part of each tile its pairs read (grown by six
    # sigma): inside that part it must equal the filter of the whole tile.
    shape = (150, 197)
    tile = 10 + 3 * _texture(shape, seed=7)
    ext, kept = local_search._extended(box, shape, local_search.HIGH_PASS_SIGMA_PX)
    pad = local_search.REFLECT_SIGMAS * local_search.HIGH_PASS_SIGMA_PX
    assert kept == box
    for lo, hi, b0, b1, n in ((ext[0], ext[1], box[0], box[1], shape[0]),
                              (ext[2], ext[3], box[2], box[3], shape[1])):
        assert 0 <= lo <= b0 and b1 <= hi <= n
        assert (lo == 0 or b0 - lo >= pad) and (hi == n or hi - b1 >= pad)
    crop = backend.asarray(tile[None, ext[0]:ext[1], ext[2]:ext[3]])
    part, origin = local_search._cut(
        local_search.high_pass(crop, local_search.HIGH_PASS_SIGMA_PX)[0, ...], ext, box)
    whole = to_host(local_search.high_pass(backend.asarray(tile[None]),
                                           local_search.HIGH_PASS_SIGMA_PX))[0]
    assert origin == (box[0], box[2])
    want = whole[box[0]:box[1], box[2]:box[3]]
    assert np.abs(to_host(part) - want).max() <= 1e-4 * whole.std()


def test_each_tile_is_filtered_only_where_its_pairs_read_it():
    # Tile 1 is in two pairs (below tile 0, right of tile 2): its part holds both crops.
    shape, r = (100, 120), 3
    pairs = np.array([[0, 1], [2, 1], [3, 4]])
    centre = np.array([[80, 2], [-1, -100], [500, 0]])  # the last overlaps nowhere
    boxes = local_search._needed_boxes(pairs, centre, r, shape)
    assert boxes[0] == (77, 100, 0, 120)
    assert boxes[2] == (0, 100, 0, 23)
    assert boxes[1] == (0, 100, 0, 120)  # rows 0-23 from tile 0, columns 97-120 from tile 2
    assert boxes[3] == boxes[4] == (0, 0, 0, 0)


def test_every_backend_searches_alike(tmp_path, backend):
    """The device path (tiles filtered after their one transfer, only where their pairs
    read them) reads what the host path reads."""
    shape = (48, 64)
    image = _texture((200, 200), seed=8)
    paths = []
    for k, truth in enumerate([(34, 3), (30, -8), (2, 40)]):
        paths += _tile_pair(tmp_path, image, truth, shape, f"b{k}")
    pairs = np.array([[0, 1], [2, 3], [4, 5], [0, 3]])  # the last: no overlap there
    centre = np.array([[31.6, 5.2], [27.5, -6.0], [4.4, 37.8], [31.6, 5.2]])
    host = local_search.search_pairs(paths, pairs, centre, 9.0, shape, select_backend("cpu"))
    found = local_search.search_pairs(paths, pairs, centre, 9.0, shape, backend)
    assert host.located[:3].all()
    np.testing.assert_array_equal(found.located, host.located)
    np.testing.assert_allclose(found.shift_px, host.shift_px, atol=1e-3)
    np.testing.assert_allclose(found.score, host.score, atol=1e-4)
