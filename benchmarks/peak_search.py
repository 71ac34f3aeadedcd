"""Peak search and candidate scoring per pair, before and after, side by side.

Correlations of realistic size: the overlap strips (with the stage-error margin) of side
and vertical neighbours among 820x616 tiles, at full resolution (about 360x720 values)
and at half resolution (about 180x360, as the strips are searched now), cut from the
bundled H&E image, in batches of four pairs. On each batch it times what the streamed
correlation does per strip group:

- peak search: ``locate_peaks``, then the 5 highest peaks anywhere and the 3 highest near
  the prediction (before: two ``top_peaks`` calls; after: the same two calls, and one
  call with ``near=``);
- scoring: ``stream._score_candidates`` of those 8 candidates on the score tiles.

The "before" code is read from a git revision (``--before``) and runs in the same
process, alternating with the working tree's, so the ratios are fair on a shared
machine; the outputs must agree (peaks exactly, scores to 1e-5) or it stops.

    python benchmarks/peak_search.py [--before e58e4d1] [--pairs 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from ofstitch import correlate, stream
from ofstitch.stream import CANDIDATES, PRIOR_PEAKS, PRIOR_RADIUS_FRACTION, CorrelationPlan
from ofstitch.synthetic import load_source

ROOT = Path(__file__).resolve().parents[1]
TILE = (616, 820)
OVERLAP = 0.3
BATCH = 4


def module_at(rev: str, name: str) -> types.ModuleType:
    """``ofstitch.<name>`` as it is at git revision ``rev`` (imports resolve to the
    working tree's package)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ofstitch/{name}.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"ofstitch._{name}_at_{rev}")
    mod.__package__ = "ofstitch"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:ofstitch/{name}.py", "exec"), mod.__dict__)
    return mod


def make_batches(n_pairs: int, binning: int, seed: int = 0) -> list[dict]:
    """Batches of strip correlations, their predictions and score tiles, as the stream
    makes them (:func:`stream._correlate_strips`), for tiles binned ``binning`` x."""
    rng = np.random.default_rng(seed)
    grey = load_source().astype(np.float32).mean(axis=2)
    grey = np.pad(grey, ((0, grey.shape[0]), (0, grey.shape[1])), mode="symmetric")
    h, w = TILE[0] // binning, TILE[1] // binning
    margin = max(stream.MIN_MARGIN_PX, math.ceil(0.1 * max(h, w)))
    plan = CorrelationPlan(TILE, (h, w), (2 * h, 2 * w), 1.0 / binning, margin,
                           refine=binning > 1, binning=binning)
    batches = []
    for start in range(0, n_pairs, BATCH):
        side = (start // BATCH) % 2 == 0
        expected = np.array([0.0, (1 - OVERLAP) * TILE[1]]) if side else \
            np.array([(1 - OVERLAP) * TILE[0], 0.0])
        tiles, pairs, exp = [], [], []
        for _ in range(BATCH):
            truth = expected + rng.normal(0, 6, 2)
            y0, x0 = (int(rng.integers(50, size - tile - 800))
                      for size, tile in zip(grey.shape, TILE, strict=True))
            y1, x1 = int(round(y0 + truth[0])), int(round(x0 + truth[1]))
            for y, x in ((y0, x0), (y1, x1)):
                full = grey[y:y + TILE[0], x:x + TILE[1]]
                tiles.append(full.reshape(h, binning, w, binning).mean(axis=(1, 3)))
            pairs.append((len(tiles) - 2, len(tiles) - 1))
            exp.append(expected / binning)
        tiles = np.stack(tiles)
        search = correlate.remove_background(tiles, 10.0 / binning)
        score = correlate.score_tiles(tiles, high_pass_sigma=stream.SCORE_HIGH_PASS_SIGMA,
                                      binning=plan.score_binning)
        (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = stream.strip_boxes(exp[0], (h, w), margin)
        offset = np.array([ay0 - by0, ax0 - bx0], dtype=np.float64)
        centre = offset - exp[0]
        fft = (stream.strip_fft_length(ay1 - ay0, by1 - by0, centre[0], margin),
               stream.strip_fft_length(ax1 - ax0, bx1 - bx0, centre[1], margin))
        crops_a = np.stack([search[a, ay0:ay1, ax0:ax1] for a, _ in pairs])
        crops_b = np.stack([search[b, by0:by1, bx0:bx1] for _, b in pairs])
        corr = correlate.cross_correlate(
            correlate.tile_spectra(crops_a, fft_shape=fft, high_pass_sigma=0),
            correlate.tile_spectra(crops_b, fft_shape=fft, high_pass_sigma=0), fft_shape=fft)
        batches.append(dict(
            corr=corr, prior=np.tile(-centre, (BATCH, 1)).astype(np.float32),
            radius=min(float(margin), PRIOR_RADIUS_FRACTION * min(h, w)), offset=offset,
            pairs=np.array(pairs), expected=np.array(exp), live=dict(enumerate(score)),
            plan=plan))
    return batches


def search(c: types.ModuleType, b: dict, near: bool) -> tuple:
    corr = b["corr"]
    peaks = c.locate_peaks(corr, exclude_radius=0)
    if near:
        found, _ = c.top_peaks(corr, CANDIDATES - PRIOR_PEAKS, exclude_radius=0, near=PRIOR_PEAKS,
                               expected_shift=b["prior"], radius=b["radius"])
    else:
        found = np.concatenate([
            c.top_peaks(corr, CANDIDATES - PRIOR_PEAKS, exclude_radius=0)[0],
            c.top_peaks(corr, PRIOR_PEAKS, exclude_radius=0, expected_shift=b["prior"],
                        radius=b["radius"])[0]], axis=1)
    return peaks, found.astype(np.float64) + b["offset"]


def score(s: types.ModuleType, b: dict, candidates: np.ndarray) -> np.ndarray:
    return s._score_candidates(b["pairs"], candidates, None, b["expected"], b["live"],
                               b["plan"], True)


def check(batches: list[dict], old_c, old_s) -> None:
    for b in batches:
        (p0, f0), (p1, f1), (_, f2) = search(old_c, b, False), search(correlate, b, False), \
            search(correlate, b, True)
        for x, y in zip(p0, p1, strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(f0, f1)
        np.testing.assert_array_equal(f0, f2)
        s0, s1 = score(old_s, b, f0), score(stream, b, f0)
        np.testing.assert_array_equal(s0[..., :2], s1[..., :2])
        np.testing.assert_allclose(s0[..., 2], s1[..., 2], atol=1e-5)


def measure(batches: list[dict], old_c, old_s, rounds: int) -> dict[str, float]:
    """Best time (s) of each job over ``rounds`` rounds, the jobs alternating."""
    cands = [search(correlate, b, True)[1] for b in batches]
    jobs = {
        "search_before": lambda: [search(old_c, b, False) for b in batches],
        "search_after2": lambda: [search(correlate, b, False) for b in batches],
        "search_after": lambda: [search(correlate, b, True) for b in batches],
        "score_before": lambda: [score(old_s, b, c) for b, c in zip(batches, cands, strict=True)],
        "score_after": lambda: [score(stream, b, c) for b, c in zip(batches, cands, strict=True)],
    }
    best = {k: math.inf for k in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            t = time.perf_counter()
            job()
            best[key] = min(best[key], time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="e58e4d1", help="git revision of the 'before' code")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old_c = module_at(args.before, "correlate")
    old_s = module_at(args.before, "stream")
    old_s.overlap = module_at(args.before, "overlap")
    print(f"before: {args.before}; after: working tree; {args.pairs} pairs, batches of "
          f"{BATCH}, best of {args.rounds} alternating rounds (ms per pair)")
    print("| correlation | before: locate + 2 top_peaks | after: same calls | after: "
          "top_peaks(near=) | ratio | before: scoring | after | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for binning, name in ((1, "full resolution"), (2, "half resolution")):
        batches = make_batches(args.pairs, binning)
        check(batches, old_c, old_s)
        ms = {k: 1e3 * v / args.pairs for k, v in measure(batches, old_c, old_s,
                                                           args.rounds).items()}
        shape = "x".join(str(s) for s in batches[0]["corr"].shape[1:]) + " / " + \
            "x".join(str(s) for s in batches[1]["corr"].shape[1:])
        print(f"| {name} ({shape}) | {ms['search_before']:.2f} | {ms['search_after2']:.2f} | "
              f"{ms['search_after']:.2f} | {ms['search_before'] / ms['search_after']:.1f}x | "
              f"{ms['score_before']:.2f} | {ms['score_after']:.2f} | "
              f"{ms['score_before'] / ms['score_after']:.1f}x |")


if __name__ == "__main__":
    main()
