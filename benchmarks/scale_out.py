"""Figures for docs/scale-out.md: placement time and memory at 10,000 and 100,000 tiles,
the bytes of one correlation task and of one OME-Zarr task, a local run against a
LocalCluster of 2 workers, and a 1,000-tile scan registered and written as OME-Zarr
locally and on a LocalCluster of 2 workers (each run in its own process, so that its
peak RSS is the client's own; local and cluster runs alternate).

Usage::

    python benchmarks/scale_out.py            # all of it (100,000 tiles takes a minute)
    python benchmarks/scale_out.py --quick    # 10,000 tiles only, no cluster
    python benchmarks/scale_out.py --thousand [--repeat 2]   # only the 1,000-tile scan
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
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


THOUSAND_GRID = (25, 40)  # 1,000 tiles of 320x240 at 30% overlap: a 4,300 x 9,100 mosaic


def _big_source() -> np.ndarray:
    """The synthetic scans' source image mirrored out to fit a 1,000-tile scan."""
    from ofstitch.synthetic import load_source

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu1-he" / \
        "CMU-1-Small-Region.jpg"
    src = load_source(shared if shared.is_file() else None)
    need = (4600, 9400)
    pad = [(0, max(0, n - s)) for n, s in zip(need, src.shape[:2], strict=True)] + [(0, 0)]
    return np.pad(src, pad, mode="symmetric")


def one_run(step: str, where: str, folder: Path, work: Path, address: str | None) -> None:
    """In a child process: one registration or one OME-Zarr write, and its figures as JSON."""
    from ofstitch import distributed, formats, render

    t0 = time.perf_counter()
    if step == "register":
        settings = StitchSettings(scheduler=address if where == "cluster" else None)
        reg = ofstitch.register(folder, settings, use_cache=False)
        if where == "local":  # the positions the OME-Zarr runs use
            (work / "placed.json").write_text(json.dumps({
                "paths": [os.fspath(p) for p in reg.scan.paths],
                "positions_px": reg.positions_px.tolist(),
                "tile_shape": list(reg.scan.tile_shape)}))
    else:
        saved = json.loads((work / "placed.json").read_text())
        mosaic = render.Mosaic([Path(p) for p in saved["paths"]],
                               np.asarray(saved["positions_px"]), tuple(saved["tile_shape"]),
                               pixels=render.Pixels.data(np.uint8, 3))
        out = work / f"{where}.zarr"
        if where == "cluster":
            distributed.write_ome_zarr_on_cluster(address, mosaic, out, pixel_size_um=1.0)
        else:
            mosaic.write(lambda im: formats.write_ome_zarr(im, out, pixel_size_um=1.0))
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (``ru_maxrss`` keeps
    the parent's peak across fork and exec, so a child would report its parent's)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _zarr_task_bytes(work: Path) -> None:
    """The pickled size of one OME-Zarr task of the 1,000-tile scan (a region mid-mosaic)."""
    from ofstitch import distributed, omezarr, render

    saved = json.loads((work / "placed.json").read_text())
    paths = [Path(p) for p in saved["paths"]]
    mosaic = render.Mosaic(paths, np.asarray(saved["positions_px"]), tuple(saved["tile_shape"]))
    spec = omezarr.ZarrLayout(tuple(omezarr.level_shapes(mosaic.size, 512)), 3, "|u1", 512)
    boxes = omezarr.regions(spec, 0, 2)
    box = boxes[len(boxes) // 2]
    idx = distributed.tiles_touching(mosaic.layout, box, set())
    args = pickle.dumps(("/shared/scans/slide_0001/out/.m.zarr.x1y2z3", spec, 2, box,
                         [os.fspath(paths[i]) for i in idx], mosaic.layout.top_left[idx],
                         mosaic.layout.centre[idx], mosaic.size, mosaic.layout.tile_shape,
                         1.0, None, "none", 128))
    n_tasks = sum(len(omezarr.regions(spec, b, 2)) for b, _ in omezarr.region_passes(spec, 2))
    print(f"mosaic {mosaic.size[1]} x {mosaic.size[0]} px, {n_tasks} OME-Zarr tasks; one "
          f"(a 2048 px region, {len(idx)} tiles): arguments {len(args)} bytes, result "
          f"{len(pickle.dumps([]))} bytes")


def thousand_tiles(repeat: int) -> None:
    """A 1,000-tile scan: registration and OME-Zarr, local against a LocalCluster of 2."""
    from dask.distributed import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        scan = make_scan(work / "scan", grid=THOUSAND_GRID, tile_shape=(240, 320), seed=3,
                         source=_big_source())
        print(f"made {THOUSAND_GRID[0] * THOUSAND_GRID[1]} tiles of 320x240 in "
              f"{time.perf_counter() - t0:.0f} s")
        figures: dict[tuple[str, str], list[dict]] = {}
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
            address = c.scheduler_address

            def child(step: str, where: str) -> None:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", step, where, str(scan.folder),
                     str(work), address], capture_output=True, text=True, check=True)
                figures.setdefault((step, where), []).append(
                    json.loads(out.stdout.strip().splitlines()[-1]))

            for step in ("register", "zarr"):
                for _ in range(repeat):
                    for where in ("local", "cluster"):
                        child(step, where)
                if step == "register":
                    _zarr_task_bytes(work)
            from dask.distributed import Client

            with Client(c) as client:
                peaks = client.run(_peak_rss_mb)
            print("workers' peak RSS (their correlation and OME-Zarr tasks): "
                  + ", ".join(f"{v:.0f} MB" for v in peaks.values()))
        import zarr

        a, b = zarr.open_group(work / "local.zarr", mode="r"), \
            zarr.open_group(work / "cluster.zarr", mode="r")
        same = all(np.array_equal(a[k][:], b[k][:]) for k in a.array_keys())
    for (step, where), runs in figures.items():
        secs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        rss = max(r["rss_mb"] for r in runs)
        print(f"{step:8s} {where:7s}: {secs} s; client peak RSS {rss:.0f} MB")
    for step in ("register", "zarr"):
        ratio = np.median([r["seconds"] for r in figures[(step, "cluster")]]) / \
            np.median([r["seconds"] for r in figures[(step, "local")]])
        print(f"{step}: cluster / local wall time {ratio:.2f}")
    print(f"OME-Zarr of the cluster identical to the local one: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--thousand", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        step, where, folder, work, address = args.one
        one_run(step, where, Path(folder), Path(work), address)
        return
    if args.thousand:
        thousand_tiles(args.repeat)
        return
    placement((100, 100))
    task_bytes()
    if not args.quick:
        placement((316, 317))
        cluster_against_local()
        thousand_tiles(args.repeat)


if __name__ == "__main__":
    main()
