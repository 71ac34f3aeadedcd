"""Hot kernels of the correlation, swept over tile sizes: per-tile FFT, per-pair
correlation and peak, a batch of pairs, and the streamed correlation of a scan
(decode + strips or whole tiles)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from conftest import TILE_IDS, TILE_SIZES

from ofstitch import CorrelationSettings, correlate
from ofstitch.graph import find_pairs
from ofstitch.stream import CorrelationPlan, correlate_pairs

SIGMA = 10.0


def _padded(shape):
    return (scipy.fft.next_fast_len(2 * shape[0], real=True),
            scipy.fft.next_fast_len(2 * shape[1], real=True))


def _tiles(n, shape, seed=0):
    return np.random.default_rng(seed).normal(128, 30, size=(n, *shape)).astype(np.float32)


@pytest.mark.parametrize("shape", TILE_SIZES, ids=TILE_IDS)
def test_tile_fft(benchmark, shape):
    """One tile's forward transform (filtered, then zero-padded to twice its size)."""
    fft = _padded(shape)
    tile = _tiles(1, shape)
    out = benchmark(correlate.tile_spectra, tile, fft_shape=fft, high_pass_sigma=SIGMA)
    assert out.shape == (1, fft[0], fft[1] // 2 + 1)


@pytest.mark.parametrize("mode", ["whole", "strip"])
@pytest.mark.parametrize("shape", TILE_SIZES, ids=TILE_IDS)
def test_pair_correlation_and_peak(benchmark, shape, mode):
    """One pair: product of spectra, inverse FFT and peak search. 'strip' is a side
    neighbour's predicted overlap (30%) plus the default 10% margin, as stream cuts it."""
    h, w = shape
    if mode == "whole":
        fft, crop = _padded(shape), shape
    else:
        margin = max(16, int(np.ceil(0.1 * max(shape))))
        crop = (h, int(0.3 * w) + margin)
        fft = (scipy.fft.next_fast_len(h + margin + 2, real=True),
               scipy.fft.next_fast_len(crop[1] + margin + 2, real=True))
    tiles = _tiles(2, crop)
    spectra = correlate.tile_spectra(tiles, fft_shape=fft, high_pass_sigma=SIGMA)

    def pair():
        corr = correlate.cross_correlate(spectra[:1], spectra[1:], fft_shape=fft)
        return correlate.locate_peaks(corr)

    peaks = benchmark(pair)
    assert peaks.shift.shape == (1, 2)


@pytest.mark.parametrize("n_pairs", [1, 4, 16])
def test_batch_of_pairs(benchmark, n_pairs):
    """A batch of 832x624 strip pairs through the kernels at once."""
    shape = (624, 832)
    crop = (624, 250 + 84)
    fft = (scipy.fft.next_fast_len(624 + 86, real=True),
           scipy.fft.next_fast_len(crop[1] + 86, real=True))
    a, b = _tiles(n_pairs, crop, 1), _tiles(n_pairs, crop, 2)
    assert shape[0] == crop[0]

    def batch():
        sa = correlate.tile_spectra(a, fft_shape=fft, high_pass_sigma=SIGMA)
        sb = correlate.tile_spectra(b, fft_shape=fft, high_pass_sigma=SIGMA)
        return correlate.locate_peaks(correlate.cross_correlate(sa, sb, fft_shape=fft))

    peaks = benchmark(batch)
    assert peaks.shift.shape == (n_pairs, 2)


@pytest.mark.parametrize("margin", [0.0, 0.1], ids=["whole", "strips"])
@pytest.mark.parametrize("shape", [(624, 832), (1232, 1640)], ids=["832x624", "1640x1232"])
def test_stream_scan(benchmark, scans, numpy_backend, shape, margin):
    """A 4x4 scan through stream.correlate_pairs: decode, upload, FFTs, peaks."""
    scan = scans((4, 4), shape)
    paths = [scan.folder / n for n in scan.names]
    pairs = find_pairs(scan.truth_px, shape, 0.15).pairs
    expected = scan.truth_px[pairs[:, 1]] - scan.truth_px[pairs[:, 0]]
    settings = CorrelationSettings(search_margin=margin)
    plan = CorrelationPlan.make(shape, settings)

    def run():
        out = np.full((len(pairs), 2), np.nan)
        for batch in correlate_pairs(paths, pairs, expected, settings, plan, numpy_backend):
            out[batch.pair_ids] = batch.shift_px
        return out

    shift = benchmark.pedantic(run, rounds=3, iterations=1)
    assert np.isfinite(shift).all(axis=1).sum() >= len(pairs) // 2
