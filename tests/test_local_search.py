"""The constrained local search (issue 14): full-resolution overlap NCC at every integer
shift of a window around the stage prediction, for the pairs placement did not locate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from ofstitch import local_search, overlap
from ofstitch.backends import select_backend


def _texture(shape, seed=0, smooth=1.5):
    rng = np.random.default_rng(seed)
    return scipy.ndimage.gaussian_filter(rng.normal(size=shape), smooth).astype(np.float32)


@pytest.mark.parametrize("centre", [(3, 50), (-20, 7), (30, -41), (-5, -60)])
def test_surface_is_the_overlap_ncc_at_every_shift(centre):
    rng = np.random.default_rng(1)
    h, w = 48, 64
    a = rng.normal(size=(h, w)).astype(np.float32)
    b = rng.normal(size=(h, w)).astype(np.float32)
    fft_shape = (scipy.fft.next_fast_len(2 * h, real=True),
                 scipy.fft.next_fast_len(2 * w, real=True))
    r = 4
    s = np.asarray(local_search._surfaces([a], [b], np.array([centre]), r, fft_shape,
                                          select_backend("cpu").xp))[0]
    for dy in range(-r, r + 1, 2):
        for dx in range(-r, r + 1, 3):
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
