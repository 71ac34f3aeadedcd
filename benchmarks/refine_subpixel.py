"""Sub-pixel estimators for binned overlap strips, against the truth of a compare.py scan.

For the first ``--pairs`` pairs of a scan built by ``benchmarks/compare.py`` (default the
100 x 820x616 one), each pair's shift is read by

- ``full``: the full-resolution strip FFT and a parabola (what main did before binning),
- ``binned``: the 2x2-binned strip FFT and a parabola, times 2,
- ``binned-dft``: the binned strip, its peak upsampled 20x by a matrix DFT of the product
  spectrum (as skimage's ``phase_cross_correlation`` does), times 2,
- ``refined``: the binned strip's reading refined at full resolution by
  :func:`ofstitch.refine.refine_shifts` on :func:`ofstitch.refine.detail` (what main does),

and prints the RMS and largest error over the pairs with a peak (within 5 px), then the
refinement's error at several ``refine.MAX_PIXELS`` (row subsampling of large overlaps)
from starts within 0.6 px of the truth.

Usage::

    python benchmarks/compare.py --scans 100x820x616 --programs floor   # builds the scan
    python benchmarks/refine_subpixel.py [--scan benchmarks/work/scans/100x820x616] [--pairs 60]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ofstitch import correlate, refine, stream, tiles

HERE = Path(__file__).resolve().parent


def binned(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[0] // 2, x.shape[1] // 2
    return x[:2 * h, :2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))


def strip_reading(fa, fb, expected, margin):
    """The strip correlation's peak (shift, index, product spectrum, FFT shape, offset)."""
    (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = stream.strip_boxes(expected, fa.shape, margin)
    offset = np.array([ay0 - by0, ax0 - bx0], float)
    centre = offset - expected
    fft = (stream.strip_fft_length(ay1 - ay0, by1 - by0, centre[0], margin),
           stream.strip_fft_length(ax1 - ax0, bx1 - bx0, centre[1], margin))
    spec_a = correlate.tile_spectra(fa[None, ay0:ay1, ax0:ax1], fft_shape=fft, high_pass_sigma=0)
    spec_b = correlate.tile_spectra(fb[None, by0:by1, bx0:bx1], fft_shape=fft, high_pass_sigma=0)
    product = np.conj(spec_a) * spec_b
    peaks = correlate.locate_peaks(correlate._irfftn(product, fft, np), exclude_radius=0)
    return np.asarray(peaks.shift[0]) + offset, np.asarray(peaks.index[0]), product[0], fft, offset


def dft_upsampled(product, fft, index, offset, factor=20, half=1.5):
    """The peak of the correlation evaluated around ``index`` on a 1/factor px grid."""
    ny, nx = fft
    ky = np.fft.fftfreq(ny) * ny
    kx = np.arange(nx // 2 + 1)
    weight = np.full(len(kx), 2.0)
    weight[0] = 1.0
    if nx % 2 == 0:
        weight[-1] = 1.0
    signed = np.where(index >= np.array(fft) // 2 + 1, index - np.array(fft), index)
    grid = np.arange(-half, half + 1e-9, 1 / factor)
    dy, dx = signed[0] + grid, signed[1] + grid
    ey = np.exp(2j * np.pi * np.outer(dy, ky) / ny)
    ex = np.exp(2j * np.pi * np.outer(kx, dx) / nx) * weight[:, None]
    corr = (ey @ product @ ex).real
    i, j = np.unravel_index(np.argmax(corr), corr.shape)
    return -np.array([dy[i], dx[j]]) + offset


def summary(errors: list) -> str:
    e = np.hypot(*np.asarray(errors, dtype=float).T)
    ok = np.isfinite(e) & (e < 5)
    return (f"RMS {math.sqrt(np.mean(e[ok] ** 2)):.3f} px, max {e[ok].max():.3f} px "
            f"({(~ok).sum()} without a peak)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=HERE / "work" / "scans" / "100x820x616")
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    truth = json.loads((args.scan / "tiles_truth.json").read_text())
    names, top = truth["names"], np.asarray(truth["truth_px_row_col"], float)
    shape = tuple(truth["tile_shape"])
    pairs = json.loads((args.scan / "tiles_pairs.json").read_text())["pairs"][:args.pairs]
    used = sorted({t for p in pairs for t in p})
    full = {t: tiles.read_grey(args.scan / "tiles" / names[t], 1.0, shape=shape) for t in used}
    coarse = {t: binned(full[t]) for t in used}
    sigma = 10.0
    filt_full = {t: correlate.remove_background(full[t][None], sigma)[0] for t in used}
    filt_coarse = {t: correlate.remove_background(coarse[t][None], sigma / 2)[0] for t in used}
    detail = {t: refine.detail(full[t].copy(), coarse[t], filt_coarse[t], 2) for t in used}
    margin = math.ceil(0.1 * max(shape))
    rng = np.random.default_rng(0)
    errors: dict[str, list] = {"full": [], "binned": [], "binned-dft": [], "refined": []}
    for a, b in pairs:
        s = top[b] - top[a]
        expected = s + rng.normal(0, 10, 2)  # a stage error
        errors["full"].append(strip_reading(filt_full[a], filt_full[b], expected, margin)[0] - s)
        shift, index, product, fft, offset = strip_reading(
            filt_coarse[a], filt_coarse[b], expected / 2, margin // 2)
        errors["binned"].append(2 * shift - s)
        errors["binned-dft"].append(2 * dft_upsampled(product, fft, index, offset) - s)
        fine = refine.refine_shifts(np.array([[a, b]]), (2 * shift)[None], detail, 2)[0]
        errors["refined"].append(fine - s)
    print(f"{len(pairs)} pairs of {args.scan.name}:")
    for name, err in errors.items():
        print(f"  {name:11s} {summary(err)}")
    truths = np.array([top[b] - top[a] for a, b in pairs])
    starts = truths + rng.uniform(-0.6, 0.6, truths.shape)
    print("refinement from within 0.6 px, by refine.MAX_PIXELS:")
    for max_pixels in (250_000, 60_000, 30_000, 15_000):
        refine.MAX_PIXELS = max_pixels
        fine = refine.refine_shifts(np.array(pairs), starts, detail, 2)
        print(f"  {max_pixels:7d} {summary(fine - truths)}")


if __name__ == "__main__":
    main()
