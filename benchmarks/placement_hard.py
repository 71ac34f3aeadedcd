"""Placement on hard and easy synthetic scans: robust vs reference placement, side by side.

Hard scans (``ofstitch.synthetic.make_hard_scan``, 208 tiles each, cut from the real
CMU-1 H&E image): large blank areas, 10% blank tiles, a dim low-contrast region, stage
noise sigma 20 px, a 2 degree camera rotation, a snake scan with 12 px backlash. Easy
scans: the accuracy cases of ``tests/test_accuracy.py``. For each scan this runs

- ofstitch with ``--placement robust`` (the default, whole tiles),
- the same on overlap strips (``--search-margin 0.1``),
- ofstitch with ``--placement reference`` (the threshold search),
- optionally the reference program itself, openflexure-stitching 0.3.1 (``--ref-python``),

and reports, over the pairs whose true overlap has texture, the largest and RMS error of
the pair's relative placement against the truth, and how many pairs are off by more than
2 px. It also times robust placement alone on synthetic pair results of 100 to 10,000
tiles. Results go to ``benchmarks/results/placement.json`` and, as tables, into
``benchmarks/RESULTS.md`` (between the ``placement`` markers).

Usage::

    python benchmarks/placement_hard.py                      # ofstitch only
    python benchmarks/placement_hard.py --ref-python /opt/refvenv/bin/python
    python benchmarks/placement_hard.py --keep-program       # reuse the program's rows
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ofstitch
from ofstitch.place import place
from ofstitch.settings import StitchSettings
from ofstitch.synthetic import (
    load_source,
    make_hard_scan,
    make_scan,
    pair_errors,
    synthetic_pair_results,
    textured_pairs,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_reference import REFERENCE_RUNNER, check_reference, run_tool  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data" / "cmu1-he" / "CMU-1-Small-Region.jpg"
BEGIN, END = "<!-- placement:begin -->", "<!-- placement:end -->"

EASY = {  # the accuracy cases of tests/test_accuracy.py (tiles of 240x320)
    "v3, rotated, 30 tiles": dict(grid=(6, 5), stage_error_px=5.0, rotation_deg=1.0, seed=3),
    "legacy, noisy, vignetted, JPEG q75, 25 tiles": dict(
        grid=(5, 5), layout="legacy", stage_error_px=8.0, noise=6.0, vignetting=0.3,
        jpeg_quality=75, seed=4),
    "v2, 20 tiles": dict(grid=(5, 4), layout="v2", calibration_width=832, seed=5,
                         rotation_deg=-1.5),
    "file names, grey PNG, 16 tiles": dict(grid=(4, 4), layout="filename", grey=True,
                                           extension=".png", rotation_deg=0.0, seed=6),
}


def errors_of(scan, positions: dict[str, tuple[float, float]]) -> dict:
    names = scan.names
    if any(n not in positions for n in names):
        return {"error": "not every tile was placed"}
    pos = np.array([positions[n] for n in names], dtype=float)
    th, tw = scan.tile_shape
    t = scan.truth_px
    pairs = np.array([(a, b) for a in range(len(names)) for b in range(a + 1, len(names))
                      if abs(t[b, 0] - t[a, 0]) < th and abs(t[b, 1] - t[a, 1]) < tw])
    err = pair_errors(pos, t, pairs)[textured_pairs(scan, pairs)]
    return {"textured_pairs": int(len(err)), "max_px": float(err.max()),
            "rms_px": float(np.sqrt(np.mean(err**2))), "over_2px": int((err > 2).sum())}


def run_ofstitch(scan, method: str, **correlation) -> dict:
    # A fresh copy each time: no correlation cache from the other method.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / scan.folder.name
        shutil.copytree(scan.folder, folder)
        t0 = time.perf_counter()
        settings = StitchSettings(placement=method)
        if correlation:
            settings = settings.with_correlation(**correlation)
        reg = ofstitch.register(folder, settings)
        wall = time.perf_counter() - t0
    out = errors_of(scan, reg.positions())
    out.update(wall_s=wall, place_s=reg.timings_s.get("place"), counts=reg.placement.counts())
    return out


def run_reference_program(scan, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / scan.folder.name
        shutil.copytree(scan.folder, folder)
        res = run_tool(python, REFERENCE_RUNNER, folder, 0.2, {}, "cpu", timeout=3600)
    if "positions" not in res:
        return {"error": res.get("error", "failed")}
    out = errors_of(scan, {k: tuple(v) for k, v in res["positions"].items()})
    out["wall_s"] = res["wall_s"]
    return out


def placement_speed() -> list[dict]:
    rows = []
    for grid in [(10, 10), (32, 32), (100, 100)]:
        r = synthetic_pair_results(grid, seed=0)
        nan = np.full((len(r.pairs), 2), np.nan)
        t0 = time.perf_counter()
        p = place(r.pairs, nan, nan[:, 0], r.stage_px, np.eye(2), candidates=r.candidates,
                  null_candidates=r.null_candidates, null_stage_shift=r.null_stage_shift)
        seconds = time.perf_counter() - t0
        err = pair_errors(p.positions_px, r.truth_px, r.pairs)[r.kind != "blank"]
        rows.append({"tiles": grid[0] * grid[1], "pairs": len(r.pairs), "seconds": seconds,
                     "max_px": float(err.max())})
        print(f"  robust placement, {grid[0] * grid[1]} tiles: {seconds:.2f} s", flush=True)
    return rows


def fmt_row(res: dict | None) -> str:
    if res is None:
        return "—"
    if "error" in res:
        return f"failed: {res['error']}"
    return (f"{res['max_px']:.2f} / {res['rms_px']:.2f} / {res['over_2px']} / "
            f"{res['wall_s']:.1f} s")


def markdown(results: dict) -> str:
    lines = [BEGIN, "", "### Placement on hard and easy scans",
             "", f"`python benchmarks/placement_hard.py` ({results['when']}, "
             f"{results['machine']}). Errors are of each pair's relative placement against "
             "the truth, over every pair of tiles whose true overlap has texture "
             "(`textured_pairs`, diagonal neighbours included); each cell is max px / RMS px "
             "/ pairs off by more than 2 px / wall time (correlation included, cold, on a "
             "2-core machine shared with other jobs).", "",
             "| scan | textured pairs | ofstitch robust (default) | ofstitch robust, overlap "
             "strips (`--search-margin 0.1`) | ofstitch --placement reference | "
             "openflexure-stitching 0.3.1 |",
             "|---|---|---|---|---|---|"]
    for name, row in results["scans"].items():
        lines.append(f"| {name} | {row['robust'].get('textured_pairs', '—')} | "
                     f"{fmt_row(row['robust'])} | {fmt_row(row.get('robust_strips'))} | "
                     f"{fmt_row(row['reference'])} | {fmt_row(row.get('program'))} |")
    lines += ["", "Robust placement alone on synthetic pair results (grid scans, 10% blank "
              "and 2% periodic pairs, stage noise 20 px, 2 degree rotation):", "",
              "| tiles | pairs | seconds | max error, pairs with content (px) |",
              "|---|---|---|---|"]
    for row in results["speed"]:
        lines.append(f"| {row['tiles']} | {row['pairs']} | {row['seconds']:.2f} | "
                     f"{row['max_px']:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_results_md(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-python", help="Python of a venv with openflexure-stitching "
                        "0.3.1, to run the reference program too")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep-program", action="store_true",
                        help="Without --ref-python: keep the reference program's results "
                        "from results/placement.json (the scans are the same for a seed)")
    parser.add_argument("--table-only", action="store_true",
                        help="Rewrite the RESULTS.md tables from results/placement.json")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "placement",
                        help="Where the synthetic scans are written (reused when present)")
    args = parser.parse_args(argv)
    if args.table_only:
        write_results_md(markdown(json.loads((HERE / "results" / "placement.json").read_text())))
        return 0
    if args.ref_python and (problem := check_reference(args.ref_python)):
        print(f"the reference program is not usable: {problem}", file=sys.stderr)
        return 2
    previous = {}
    saved = HERE / "results" / "placement.json"
    if args.keep_program and not args.ref_python and saved.is_file():
        previous = {name: row["program"] for name, row in
                    json.loads(saved.read_text())["scans"].items() if "program" in row}
    src = load_source(SHARED if SHARED.is_file() else None)
    scans = {}
    for seed in args.seeds:
        folder = args.work / f"hard{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        scan = make_hard_scan(folder, source=src, seed=seed)
        scans[f"hard, seed {seed}, {len(scan.names)} tiles"] = scan
    for name, options in EASY.items():
        folder = args.work / ("easy_" + name.split(",")[0].replace(" ", "_"))
        shutil.rmtree(folder, ignore_errors=True)
        scans[f"easy: {name}"] = make_scan(folder, source=src, tile_shape=(240, 320),
                                           **options)
    results = {"when": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {platform.python_version()}", "scans": {}}
    for name, scan in scans.items():
        print(f"{name}", flush=True)
        row = {"robust": run_ofstitch(scan, "robust"),
               "robust_strips": run_ofstitch(scan, "robust", search_margin=0.1),
               "reference": run_ofstitch(scan, "reference")}
        if args.ref_python:
            row["program"] = run_reference_program(scan, args.ref_python)
        elif name in previous:
            row["program"] = previous[name]
        for k, v in row.items():
            print(f"  {k}: {fmt_row(v)}", flush=True)
        results["scans"][name] = row
    results["speed"] = placement_speed()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "placement.json").write_text(json.dumps(results, indent=1))
    write_results_md(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
