"""Compare ofstitch with the reference, openflexure-stitching 0.3.1, on real and synthetic scans.

For each data set both programs run in their own cold subprocess (fresh Python, a fresh copy
of the tiles, no correlation cache) on identical copies of the tiles. The copies are renamed
``tile-<letters>_<X>_<Y>.<ext>`` with the nominal pixel position of each tile (no camera-to-
sample matrix: X is the column and Y the row), which both programs read; the synthetic scan
carries OpenFlexure EXIF metadata instead, which both read too.

Accuracy is the error of each overlapping pair's relative displacement (``position[b] -
position[a]``; pairs whose nominal footprints overlap) against reference positions: Fiji's
registered TileConfiguration, stitch2d's test positions, or the synthetic ground truth. The
mean offset of a mosaic therefore does not matter. Wall time is that of the whole subprocess
(interpreter start, imports, loading, correlation, placement); "register s" is the time of the
call that returns positions (``ofstitch.register`` / ``load_tile_and_stitch(...,
stitching_mode="return_positions")``, which also draws its stitching_inputs.png).

Usage::

    python benchmarks/compare_reference.py --ref-python /opt/refvenv/bin/python
    python benchmarks/compare_reference.py --synthetic --write    # append to RESULTS.md

The reference lives in its own virtual environment (it pins other library versions)::

    python -m venv /opt/refvenv
    /opt/refvenv/bin/pip install 'openflexure-stitching[libvips]==0.3.1'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("OFSTITCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_REF_PYTHON = "/opt/refvenv/bin/python"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
REF_INSTALL = ("python -m venv /opt/refvenv && "
               "/opt/refvenv/bin/pip install 'openflexure-stitching[libvips]==0.3.1'")
MARK = "@@RESULT@@"

# Run inside the subprocesses. argv[1]: JSON {"folder", "minimum_overlap", "corr", ...}.
OFSTITCH_RUNNER = r"""
import json, sys, time
t0 = time.perf_counter()
import ofstitch
from ofstitch import StitchSettings
cfg = json.loads(sys.argv[1])
settings = StitchSettings(minimum_overlap=cfg["minimum_overlap"], device=cfg["device"])
if cfg["corr"]:
    settings = settings.with_correlation(**cfg["corr"])
t1 = time.perf_counter()
reg = ofstitch.register(cfg["folder"], settings)
t2 = time.perf_counter()
print("@@RESULT@@", json.dumps({"positions": reg.positions(), "import_s": t1 - t0,
                                "register_s": t2 - t1, "device": reg.device}))
"""

REFERENCE_RUNNER = r"""
import json, os, sys, time
t0 = time.perf_counter()
from openflexure_stitching import load_tile_and_stitch
from openflexure_stitching.settings import CorrelationSettings, OutputSettings
cfg = json.loads(sys.argv[1])
corr = CorrelationSettings(minimum_overlap=cfg["minimum_overlap"], **cfg["corr"])
out = OutputSettings(output_dir=cfg["folder"] + "_out", stitching_mode="return_positions")
t1 = time.perf_counter()
_, positions = load_tile_and_stitch(cfg["folder"], correlation_settings=corr,
                                    output_settings=out)
t2 = time.perf_counter()
pos = {name: [float(p[0]), float(p[1])] for name, p in positions.items()}
print("@@RESULT@@", json.dumps({"positions": pos, "import_s": t1 - t0, "register_s": t2 - t1,
                                "device": "cpu"}))
"""


# ----------------------------------------------------------------------------- data sets


@dataclass
class Prepared:
    """A data set copied into ``folder`` as ``tile-<id>_<X>_<Y>.<ext>`` files.

    ``nominal`` and ``reference`` are ``{file name: (row, col)}``; ``reference_name`` says
    where the reference positions come from.
    """

    folder: Path
    tile_shape: tuple[int, int]
    nominal: dict[str, tuple[float, float]]
    reference: dict[str, tuple[float, float]]
    reference_name: str
    pairs: list[tuple[str, str]] | None = None  # default: all nominally overlapping pairs
    pairs_note: str = ""


@dataclass
class DataSet:
    name: str
    prepare: Callable[[Path, Path], Prepared]  # (data folder, work folder) -> Prepared
    # Variants: (label, minimum_overlap, correlation settings shared by both programs).
    variants: list[tuple[str, float, dict]] = field(default_factory=list)


def letters(k: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'ba': a tile id without digits, so that neither program
    mistakes it for part of the ``_X_Y`` position in the file name."""
    out = ""
    while True:
        out = chr(ord("a") + k % 26) + out
        k //= 26
        if k == 0:
            return out


def read_fiji(path: Path) -> dict[str, tuple[float, float]]:
    """``{file name: (row, col)}`` from a Fiji TileConfiguration (which stores (x, y))."""
    pattern = re.compile(r"^\s*([^;#]+?)\s*;\s*[^;]*;\s*\(\s*([^,]+?)\s*,\s*([^,)]+?)\s*\)")
    out = {}
    for line in path.read_text().splitlines():
        match = pattern.match(line)
        if match:
            out[match.group(1)] = (float(match.group(3)), float(match.group(2)))
    return out


def copy_renamed(work: Path, sources: list[tuple[Path, tuple[float, float], tuple[float, float]]],
                 ext: str) -> tuple[Path, dict, dict]:
    """Copy ``(file, nominal (row, col), reference (row, col))`` as ``tile-<id>_<X>_<Y><ext>``.

    Nominal positions must be integers (the reference ignores fractional ones in names).
    """
    folder = work / "tiles"
    folder.mkdir(parents=True)
    nominal, reference = {}, {}
    for k, (src, (row, col), ref) in enumerate(sources):
        if row != int(row) or col != int(col):
            raise ValueError(f"nominal position of {src.name} is not whole pixels")
        name = f"tile-{letters(k)}_{int(col)}_{int(row)}{ext}"
        shutil.copyfile(src, folder / name)
        nominal[name] = (float(row), float(col))
        reference[name] = ref
    return folder, nominal, reference


def prepare_fiji_set(subdir: str, nominal_file: str, registered_file: str,
                     tile_shape: tuple[int, int]) -> Callable[[Path, Path], Prepared]:
    def prepare(data: Path, work: Path) -> Prepared:
        src = data / subdir
        nominal = read_fiji(src / nominal_file)
        registered = read_fiji(src / registered_file)
        order = sorted(nominal, key=lambda n: nominal[n])  # ids a, b, ... in raster order
        sources = [(src / n, nominal[n], registered[n]) for n in order]
        folder, nom, ref = copy_renamed(work, sources, ".tiff")  # the reference needs .tiff
        return Prepared(folder, tile_shape, nom, ref, "Fiji")

    return prepare


def prepare_sem(data: Path, work: Path) -> Prepared:
    src = data / "stitch2d-sem-2x3"
    info = json.loads((src / "reference_positions_stitch2d.json").read_text())
    sources = []
    for name, yx in info["coords_yx"].items():
        col, row = map(int, re.search(r"Grid@(\d+) (\d+)", name).groups())
        # Nominal grid steps from PROVENANCE.txt: rows ~396 px, columns ~385 px apart.
        sources.append((src / "tiles" / name, (row * 396.0, col * 385.0), tuple(yx)))
    sources.sort(key=lambda s: s[1])
    folder, nom, ref = copy_renamed(work, sources, ".jpg")
    return Prepared(folder, tuple(info["tile_shape_hw"]), nom, ref, "stitch2d")


def prepare_synthetic(data: Path, work: Path) -> Prepared:
    from ofstitch.synthetic import load_source, make_scan, textured_pairs

    shared = data / "cmu1-he" / "CMU-1-Small-Region.jpg"
    source = load_source(shared if shared.is_file() else None)
    tile_shape = (480, 640)
    scan = make_scan(work / "tiles", source=source, grid=(6, 4), tile_shape=tile_shape,
                     overlap=0.3, seed=1)
    reference = {n: (float(r), float(c))
                 for n, (r, c) in zip(scan.names, scan.truth_px, strict=True)}
    # Where overlaps fall on blank slide both programs fall back on the stage (errors of
    # several px that no correlation can fix): score the pairs whose true overlap has texture.
    index = {n: k for k, n in enumerate(scan.names)}
    pairs = overlapping_pairs(reference, tile_shape)
    textured = textured_pairs(scan, np.array([[index[a], index[b]] for a, b in pairs]))
    kept = [p for p, t in zip(pairs, textured, strict=True) if t]
    return Prepared(scan.folder, tile_shape, reference, reference, "truth", kept,
                    f" (textured, of {len(pairs)})")


REAL_SETS = [
    DataSet("lscm-speckle-3x4",
            prepare_fiji_set("lscm-speckle-3x4", "TileConfiguration.txt",
                             "TileConfiguration.registered.txt", (1024, 1024)),
            [("minimum_overlap=0.05", 0.05, {})]),
    DataSet("fiji-graph-paper-strip",
            prepare_fiji_set("fiji-graph-paper-strip", "tile_config.txt",
                             "tile_config.registered.txt", (929, 594)),
            [("defaults", 0.2, {}),
             ("corr_mask_radius=100", 0.2, {"corr_mask_radius": 100}),
             ("corr_mask_radius=70", 0.2, {"corr_mask_radius": 70})]),
    DataSet("stitch2d-sem-2x3", prepare_sem, [("minimum_overlap=0.05", 0.05, {})]),
]
SYNTHETIC = DataSet("synthetic 6x4 (CMU-1 H&E, 480x640)", prepare_synthetic,
                    [("defaults", 0.2, {})])


# ----------------------------------------------------------------------------- metrics


def overlapping_pairs(nominal: dict, tile_shape: tuple[int, int]) -> list[tuple[str, str]]:
    """Pairs of tiles whose nominal footprints overlap."""
    names = sorted(nominal)
    size = np.asarray(tile_shape, dtype=float)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            extent = size - np.abs(np.subtract(nominal[b], nominal[a]))
            if (extent > 0).all():
                out.append((a, b))
    return out


def pair_errors(positions: dict, reference: dict, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Error (px) of each pair's displacement against the reference displacement."""
    got = np.array([np.subtract(positions[b], positions[a]) for a, b in pairs])
    want = np.array([np.subtract(reference[b], reference[a]) for a, b in pairs])
    return np.linalg.norm(got - want, axis=1)


# ----------------------------------------------------------------------------- running


def run_tool(python: str, runner: str, folder: Path, minimum_overlap: float, corr: dict,
             device: str, timeout: float) -> dict:
    cfg = {"folder": str(folder), "minimum_overlap": minimum_overlap, "corr": corr,
           "device": device}
    env = {**os.environ, "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", runner, json.dumps(cfg)], capture_output=True,
                          text=True, timeout=timeout, cwd=folder.parent, env=env)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            result["wall_s"] = wall
            return result
    tail = (proc.stdout + proc.stderr)[-2000:]
    return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail else ''}",
            "log": tail, "wall_s": wall}


def check_reference(python: str) -> str | None:
    """None when the reference can be imported with ``python``, else why not."""
    if not Path(python).exists() and shutil.which(python) is None:
        return f"{python} does not exist"
    proc = subprocess.run([python, "-c", "import openflexure_stitching"], capture_output=True,
                          text=True)
    if proc.returncode:
        return f"{python} cannot import openflexure_stitching: {proc.stderr.strip()[-300:]}"
    return None


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def benchmark(sets: list[DataSet], data: Path, tools: list[tuple[str, str, str]],
              device: str, timeout: float, keep: bool, repeats: int = 1) -> list[dict]:
    rows = []
    work_root = Path(tempfile.mkdtemp(prefix="ofstitch-compare-"))
    try:
        for dataset in sets:
            prepared = dataset.prepare(data, work_root / re.sub(r"\W+", "_", dataset.name))
            pairs = prepared.pairs or overlapping_pairs(prepared.nominal, prepared.tile_shape)
            for label, min_overlap, corr in dataset.variants:
                results = {}
                for tool, python, runner in tools:
                    print(f"  {dataset.name} [{label}] {tool} ...", file=sys.stderr, flush=True)
                    runs = []
                    for rep in range(repeats):
                        # Cold: a fresh process and a fresh copy of the tiles (no correlation
                        # cache, no outputs) every time.
                        run_dir = work_root / f"run{len(rows)}_{tool.split()[0]}_{rep}"
                        shutil.copytree(prepared.folder, run_dir)
                        runs.append(run_tool(python, runner, run_dir, min_overlap, corr, device,
                                             timeout))
                        if "error" in runs[-1]:
                            break
                    res = runs[-1]
                    res["wall_s"] = float(np.median([r["wall_s"] for r in runs]))
                    if "register_s" in res:
                        res["register_s"] = float(np.median([r["register_s"] for r in runs]))
                    if "positions" in res:
                        missing = [n for n in prepared.reference if n not in res["positions"]]
                        if missing:
                            res["error"] = f"{len(missing)} tiles not placed"
                        else:
                            res["errors"] = pair_errors(res["positions"], prepared.reference,
                                                        pairs)
                    results[tool] = res
                ok = [r for r in results.values() if "errors" in r]
                between = None
                if len(ok) == 2:
                    between = float(pair_errors(ok[0]["positions"], ok[1]["positions"],
                                                pairs).max())
                for tool, res in results.items():
                    errs = res.get("errors")
                    rows.append({
                        "set": dataset.name, "tiles": len(prepared.nominal), "settings": label,
                        "tool": tool, "reference": prepared.reference_name,
                        "pairs": f"{len(pairs)}{prepared.pairs_note}", "wall_s": res["wall_s"],
                        "register_s": res.get("register_s"),
                        "max_px": float(errs.max()) if errs is not None else None,
                        "rms_px": float(np.sqrt(np.mean(errs ** 2))) if errs is not None
                        else None,
                        "between_px": between, "error": res.get("error"),
                        "device": res.get("device", "cpu")})
                    if res.get("error"):
                        print(f"    {tool} failed: {res['error']}", file=sys.stderr)
    finally:
        if keep:
            print(f"work folders kept in {work_root}", file=sys.stderr)
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| data set | tiles | settings | program | vs | pairs | max err px | RMS err px "
            "| max Δ between programs px | wall s | register s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        device = r["device"] or "cpu"
        tool = r["tool"] + ("" if device.startswith("cpu") else f" ({device})")
        err = f" — failed: {r['error']}" if r["error"] else ""
        lines.append(
            f"| {r['set']} | {r['tiles']} | {r['settings']} | {tool}{err} | {r['reference']} "
            f"| {r['pairs']} | {fmt(r['max_px'])} | {fmt(r['rms_px'])} "
            f"| {fmt(r['between_px'])} | {fmt(r['wall_s'], 1)} | {fmt(r['register_s'], 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-python", default=DEFAULT_REF_PYTHON,
                        help="Python of the venv with openflexure-stitching 0.3.1 "
                             f"(default {DEFAULT_REF_PYTHON})")
    parser.add_argument("--ofstitch-python", default=sys.executable,
                        help="Python with ofstitch installed (default: this one)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"the shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--sets", nargs="*", default=None,
                        help="only these real data sets (default: all present)")
    parser.add_argument("--synthetic", action="store_true",
                        help="also a 24-tile synthetic scan with exact ground truth")
    parser.add_argument("--no-reference", action="store_true",
                        help="run ofstitch only (no reference venv needed)")
    parser.add_argument("--device", default="cpu", help="ofstitch device: cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold runs per program and set; times are the median")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument("--write", action="store_true",
                        help=f"append the table to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    tools = [("ofstitch", args.ofstitch_python, OFSTITCH_RUNNER)]
    ref_version = None
    if not args.no_reference:
        problem = check_reference(args.ref_python)
        if problem:
            print(f"The reference openflexure-stitching is not usable: {problem}.\n"
                  f"Create its virtual environment with\n    {REF_INSTALL}\n"
                  "and point to it with --ref-python /path/to/venv/bin/python "
                  "(or run ofstitch alone with --no-reference).", file=sys.stderr)
            return 2
        ref_version = subprocess.run(
            [args.ref_python, "-c", "import importlib.metadata as m; "
             "print(m.version('openflexure-stitching'))"],
            capture_output=True, text=True).stdout.strip()
        tools.append((f"openflexure-stitching {ref_version}", args.ref_python,
                      REFERENCE_RUNNER))

    sets = []
    if args.data.is_dir():
        for dataset in REAL_SETS:
            if args.sets and dataset.name not in args.sets:
                continue
            if (args.data / dataset.name).is_dir():
                sets.append(dataset)
            else:
                print(f"skipping {dataset.name}: not in {args.data}", file=sys.stderr)
    else:
        print(f"no shared data folder at {args.data} (--data): real sets skipped",
              file=sys.stderr)
    if args.synthetic:
        sets.append(SYNTHETIC)
    if not sets:
        print("nothing to run", file=sys.stderr)
        return 1

    rows = benchmark(sets, args.data, tools, args.device, args.timeout, args.keep,
                     max(1, args.repeats))
    table = markdown(rows)
    print(table)
    if args.write:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
        cpu = platform.processor() or platform.machine()
        header = (f"\n## compare_reference.py, {stamp}\n\n"
                  f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python "
                  f"{platform.python_version()}; reference openflexure-stitching "
                  f"{ref_version or 'not run'}; times are the median of {max(1, args.repeats)} "
                  "cold run(s). Errors are of pairwise displacements over "
                  "overlapping pairs, against the positions in the 'vs' column. Cold runs: "
                  "fresh subprocess and tile copies, no correlation cache.\n\n")
        new = not RESULTS.exists()
        with RESULTS.open("a") as fh:
            if new:
                fh.write("# Benchmark results\n")
            fh.write(header + table + "\n")
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
