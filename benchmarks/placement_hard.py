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
    python benchmarks/placement_hard.py --issue14 --label before --ref-python ...
    python benchmarks/placement_hard.py --issue14 --label after --robust-only

The issue-14 scans (:data:`ISSUE14`: small tiles, a strip, a straight tissue edge, texture
near one corner, small grids; each also against the stage alone) go to
``results/placement14_<label>.json`` and a before/after table in ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import ofstitch
from ofstitch.place import place
from ofstitch.scan import load_scan
from ofstitch.settings import StitchSettings
from ofstitch.synthetic import (
    HARD_SCAN,
    corner_content,
    edge_content,
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


# Scans for each failure of issue 14 (small tiles, a strip, a straight edge, texture near
# one corner, small grids), cut from the harder source (blank areas, dim content).
ISSUE14 = {
    "tiles 48x64, 10x12": dict(grid=(10, 12), tile_shape=(48, 64), stage_error_px=4.0),
    "tiles 120x160, 10x12": dict(grid=(10, 12), tile_shape=(120, 160), stage_error_px=10.0),
    "tiles 240x320, 6x8": dict(grid=(6, 8), tile_shape=(240, 320), stage_error_px=20.0),
    "strip 1x17, 120x160": dict(grid=(1, 17), tile_shape=(120, 160), stage_error_px=10.0,
                                plain=True),
    "straight edge, 5x6, 240x320": dict(grid=(5, 6), tile_shape=(240, 320),
                                        stage_error_px=10.0, content="edge"),
    "texture near one corner, 5x8, 240x320": dict(grid=(5, 8), tile_shape=(240, 320),
                                                  stage_error_px=10.0, content="corner"),
    "3x3, 240x320": dict(grid=(3, 3), tile_shape=(240, 320), stage_error_px=10.0),
    "5x6, 240x320": dict(grid=(5, 6), tile_shape=(240, 320), stage_error_px=10.0),
}
CONTENT = {"edge": edge_content, "corner": corner_content}


def make_issue14_scan(folder: Path, src: np.ndarray, options: dict, seed: int = 0):
    """One of :data:`ISSUE14`'s scans (the hard scan's settings, its own size)."""
    options = dict(options)
    content = options.pop("content", None)
    if content is not None:
        options["content"] = CONTENT[content]()
        options.setdefault("blank_fraction", 0.0)
    if options.pop("plain", False):  # the source as it is (a strip through its middle)
        return make_scan(folder, source=src, seed=seed, **{**HARD_SCAN, **options})
    return make_hard_scan(folder, source=src, seed=seed, **options)


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
    if len(err) == 0:
        return {"error": "no textured pair"}
    return {"textured_pairs": int(len(err)), "max_px": float(err.max()),
            "rms_px": float(np.sqrt(np.mean(err**2))), "over_2px": int((err > 2).sum()),
            "errors_px": [round(float(e), 3) for e in err]}


def stage_errors(scan) -> dict:
    """The same errors for the stage positions alone."""
    s = load_scan(scan.folder)
    out = errors_of(scan, {f.name: tuple(p) for f, p in zip(s.files, s.stage_px.tolist(),
                                                             strict=True)})
    out["wall_s"] = 0.0
    return out


def run_ofstitch(scan, method: str, **correlation) -> dict:
    # A fresh copy each time: no correlation cache from the other method.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / scan.folder.name
        shutil.copytree(scan.folder, folder)
        t0 = time.perf_counter()
        settings = StitchSettings(placement=method)
        if correlation:
            settings = settings.with_correlation(**correlation)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ofstitch.OfstitchWarning)
            reg = ofstitch.register(folder, settings)
        caught = [w for w in caught if issubclass(w.category, ofstitch.OfstitchWarning)]
        wall = time.perf_counter() - t0
    out = errors_of(scan, reg.positions())
    out.update(wall_s=wall, place_s=reg.timings_s.get("place"),
               counts=reg.placement.counts()._asdict())
    if caught:
        out["warning"] = str(caught[-1].message)
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


BEGIN14, END14 = "<!-- placement14:begin -->", "<!-- placement14:end -->"


def fmt_short(res: dict | None) -> str:
    if res is None:
        return "—"
    if "error" in res:
        return f"failed: {res['error']}"
    return f"{res['max_px']:.2f} / {res['rms_px']:.2f} / {res['over_2px']}"


def markdown14(before: dict, after: dict | None, start: dict | None = None) -> str:
    """The issue-14 table: robust at the start of the issue, at the start of the last
    session (``start``, optional) and after it, the threshold search, the program, the stage
    alone; and the warning each robust run gave. The threshold search and the program come
    from the latest run that has them (their code did not change)."""
    when = (after or before)["when"]
    lines = [BEGIN14, "", "### Issue 14 scans: before and after", "",
             f"`python benchmarks/placement_hard.py --issue14` ({when}, "
             f"{(after or before)['machine']}). Each cell is max px / RMS px / pairs over 2 px "
             "over the pairs whose true overlap has texture (`textured_pairs`). \"before\" is "
             "the robust placement at the start of issue 14"
             + (", \"session start\" at the start of the last session" if start else "")
             + "; the threshold search and the program are on the same scans.", "",
             "| scan | textured pairs | robust, before | "
             + ("robust, session start | " if start else "")
             + "robust, after | --placement reference | openflexure-stitching 0.3.1 | stage "
             "alone | pairs worse than the stage (after, by > 0.5 px) | warning (after) |",
             "|---|---|---|" + ("---|" if start else "") + "---|---|---|---|---|---|"]
    for name, row in before["scans"].items():
        arow = (after or {}).get("scans", {}).get(name, {})
        srow = (start or {}).get("scans", {}).get(name, {})
        ref = arow.get("reference", srow.get("reference", row.get("reference")))
        program = arow.get("program", srow.get("program", row.get("program")))
        warn = (arow.get("robust") or {}).get("warning", "")
        if warn:  # the reasons, without the advice
            warn = warn.split("doubtful: ", 1)[-1].split(". Try")[0]
        warn = warn or "none"
        worse = "—"
        robust_after, stage = arow.get("robust") or {}, arow.get("stage") or row["stage"]
        if "errors_px" in robust_after and "errors_px" in stage:
            worse = str(int(np.sum(np.asarray(robust_after["errors_px"])
                                   > np.asarray(stage["errors_px"]) + 0.5)))
        middle = f"{fmt_short(srow.get('robust'))} | " if start else ""
        lines.append(f"| {name} | {row['stage'].get('textured_pairs', '—')} | "
                     f"{fmt_short(row['robust'])} | {middle}{fmt_short(arow.get('robust'))} | "
                     f"{fmt_short(ref)} | {fmt_short(program)} | {fmt_short(row['stage'])} | "
                     f"{worse} | {warn} |")
    lines += ["", END14]
    return "\n".join(lines)


def _saved14(label: str) -> dict | None:
    path = HERE / "results" / f"placement14_{label}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_section(section: str, begin: str, end: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main14(args: argparse.Namespace) -> int:
    """The issue-14 scans, saved as ``results/placement14_<label>.json``."""
    src = load_source(SHARED if SHARED.is_file() else None)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    results = {"when": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {platform.python_version()}", "scans": {}}
    for name, options in ISSUE14.items():
        if args.only and not any(o in name for o in args.only):
            continue
        folder = args.work / ("i14_" + "".join(c if c.isalnum() else "_" for c in name))
        shutil.rmtree(folder, ignore_errors=True)
        scan = make_issue14_scan(folder, src, options)
        print(name, flush=True)
        row = {"robust": run_ofstitch(scan, "robust"), "stage": stage_errors(scan)}
        if not args.robust_only:
            row["reference"] = run_ofstitch(scan, "reference")
            if args.ref_python:
                row["program"] = run_reference_program(scan, args.ref_python)
        for k, v in row.items():
            print(f"  {k}: {fmt_short(v)} {v.get('counts', '')} {v.get('warning', '')}",
                  flush=True)
        results["scans"][name] = row
    saved = out / f"placement14_{args.label}.json"
    if args.only and saved.is_file():  # a partial run updates the saved scans
        merged = json.loads(saved.read_text())
        merged["scans"].update(results["scans"])
        results = {**merged, "scans": {n: merged["scans"][n] for n in ISSUE14
                                       if n in merged["scans"]}}
    saved.write_text(json.dumps(results, indent=1))
    before_path = out / "placement14_before.json"
    if before_path.is_file() and args.label == "after":
        write_section(markdown14(json.loads(before_path.read_text()), results,
                                 _saved14("start")), BEGIN14, END14)
    elif args.label == "before":
        write_section(markdown14(results, None), BEGIN14, END14)
    return 0


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
    parser.add_argument("--issue14", action="store_true",
                        help="Run the issue-14 scans (small tiles, strip, edge, corner, small "
                        "grids) instead")
    parser.add_argument("--label", default="after",
                        help="--issue14: before, start (of a session) or after")
    parser.add_argument("--only", nargs="*", help="--issue14: scans whose name holds one of these")
    parser.add_argument("--robust-only", action="store_true",
                        help="--issue14: robust placement and the stage only")
    args = parser.parse_args(argv)
    if args.issue14 and args.table_only:
        saved = HERE / "results"
        after = saved / "placement14_after.json"
        write_section(markdown14(json.loads((saved / "placement14_before.json").read_text()),
                                 json.loads(after.read_text()) if after.is_file() else None,
                                 _saved14("start")), BEGIN14, END14)
        return 0
    if args.issue14:
        if args.ref_python and (problem := check_reference(args.ref_python)):
            print(f"the reference program is not usable: {problem}", file=sys.stderr)
            return 2
        return main14(args)
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
