"""Figures for docs/scale-out.md: placement time and memory at 10,000 and 100,000 tiles,
the bytes of one correlation task, and a local run against a LocalCluster of 2 workers.

Usage::

    python benchmarks/scale_out.py            # all of it (100,000 tiles takes a minute)
    python benchmarks/scale_out.py --quick    # 10,000 tiles only, no cluster
"""

from __future__ import annotations

import argparse
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

import ofstitch
from ofstitch.place import place
from ofstitch.settings import CorrelationSettings, StitchSettings
from ofstitch.stream import CANDIDATES
from ofstitch.synthetic import make_scan, synthetic_pair_results


def placement(grid: tuple[int, int]) -> None:
    r = synthetic_pair_results(grid, seed=1)
    nan = np.full((len(r.pairs), 2), np.nan)
    t0 = time.perf_counter()
    place(r.pairs, nan, nan[:, 0], r.stage_px, np.eye(2), method="robust",
          candidates=r.candidates, null_candidates=r.null_candidates,
          null_stage_shift=r.null_stage_shift, tile_shape=(624, 832), warn=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"placement: {grid[0] * grid[1]} tiles, {len(r.pairs)} pairs: "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {rss:.0f} MB")


def task_bytes() -> None:
    paths = [f"/shared/scans/slide_0001/images/tile_{k:06d}.jpg" for k in range(40)]
    rng = np.random.default_rng(0)
    args = pickle.dumps((paths, rng.integers(0, 40, (64, 2)), rng.normal(size=(64, 2)),
                         CorrelationSettings(), (624, 832), None, None))
    result = pickle.dumps((np.arange(64), np.zeros((64, 2)), np.zeros(64),
                           np.zeros((64, CANDIDATES, 3))))
    print(f"one task of 64 pairs: arguments {len(args)} bytes, results {len(result)} bytes")


def cluster_against_local() -> None:
    from dask.distributed import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        scan = make_scan(Path(tmp) / "scan", grid=(4, 5), tile_shape=(240, 320), seed=3)
        t0 = time.perf_counter()
        local = ofstitch.register(scan.folder, StitchSettings(), use_cache=False)
        t_local = time.perf_counter() - t0
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
            settings = StitchSettings(scheduler=c.scheduler_address)
            ofstitch.register(scan.folder, settings, use_cache=False)  # warm the workers
            t0 = time.perf_counter()
            remote = ofstitch.register(scan.folder, settings, use_cache=False)
            t_remote = time.perf_counter() - t0
        diff = float(np.abs(remote.positions_px - local.positions_px).max())
        print(f"20 tiles of 320x240: local {t_local:.2f} s, LocalCluster of 2 workers "
              f"{t_remote:.2f} s; positions differ by {diff:.1e} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    placement((100, 100))
    task_bytes()
    if not args.quick:
        placement((316, 317))
        cluster_against_local()


if __name__ == "__main__":
    main()
