"""Side by side: ofstitch, the reference (openflexure-stitching 0.3.1) and the decode floor.

For each size (tile count x tile size) a synthetic scan with exact ground truth is cut from
the real CMU-1 H&E image (mirrored to cover large scans) by :func:`ofstitch.synthetic.make_scan`
(OpenFlexure v3 EXIF, 30% overlap, stage error, rotation, vignetting, noise, JPEG). Then
three programs run on it, cold and in alternation, each in a fresh subprocess on a fresh copy
of the tiles (no correlation cache, no outputs):

- ``floor``: decode every tile once (pyvips, all cores) and JPEG-encode a mosaic of the
  scan's size once. Any stitcher has to do at least this.
- ``ofstitch``: ``ofstitch.stitch`` in mode ``all`` (correlate, place, plots, preview,
  thumbnail, full mosaic), default settings (the predicted overlaps plus a 10% margin,
  robust placement with its constrained local search); ``ofstitch-strips`` is the same
  with ``--search-margin 0.1`` given explicitly (the default since the speed work);
  ``ofstitch-before`` the default of an earlier commit (``--before COMMIT``), for
  before/after figures from one invocation.
- ``reference``: ``openflexure_stitching.load_tile_and_stitch`` in mode ``all``, default
  settings, from its own virtual environment.
- ``ofstitch-correlate`` and ``reference-correlate``: correlation only, ofstitch's
  ``--stitching-mode only-correlate`` against the reference's ``--stitching_mode
  only_correlate`` (each writes its correlation cache and nothing else); a table of their own,
  with the reference's time over ofstitch's.

Each run reports wall time and peak RSS of the subprocess (``os.wait4``), CPU time, the
time of each stage (functions wrapped inside the subprocess) and the placement error of every
textured overlapping pair against the truth. Each result is written as it finishes to
``benchmarks/results/<size>__<program>.json``; ``--write`` turns all saved results into the
table in ``benchmarks/RESULTS.md`` (between the ``compare.py`` markers).

The scans are named ``TILESxWIDTHxHEIGHT``; the default is the speed issue's matrix:
100, 400 and 1,000 tiles of 820x616, 100 tiles of 1640x1232 and 20 tiles of 4056x3040 (a
grid as square as the tile count allows: 1,000 tiles are 25 rows of 40, 20 tiles 4 of 5).

Usage::

    python benchmarks/compare.py --scans 25x820x616                   # a quick one
    python benchmarks/compare.py --write                              # the whole matrix
    python benchmarks/compare.py --table                              # table from saved JSON
    python benchmarks/compare.py --sizes 25,100 --tiles 832x624       # counts x tile sizes

The reference is installed into its own virtual environment (``--ref-venv``, default
``/opt/refvenv`` when it holds openflexure-stitching 0.3.1, else ``benchmarks/.refvenv``,
created with ``pip install 'openflexure-stitching[libvips]==0.3.1'``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"
WORK_DIR = HERE / "work"
DEFAULT_DATA = Path(os.environ.get("OFSTITCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
REF_VERSION = "0.3.1"
REF_REQUIREMENT = f"openflexure-stitching[libvips]=={REF_VERSION}"
REF_CANDIDATES = (Path("/opt/refvenv"), HERE / ".refvenv")
MARK = "@@RESULT@@"
BEGIN, END = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"
PROGRAMS = ("floor", "ofstitch", "ofstitch-before", "ofstitch-strips", "reference",
            "ofstitch-correlate",
            "reference-correlate")
DEFAULT_PROGRAMS = ("floor", "ofstitch", "reference", "ofstitch-correlate",
                    "reference-correlate")
CORRELATE_ONLY = {"ofstitch-correlate": "reference-correlate"}  # ofstitch's -> reference's
# Settings and correlation settings of the ofstitch variants (defaults, overlap strips).
VARIANTS = {"ofstitch": ({}, {}), "ofstitch-before": ({}, {}),
            "ofstitch-strips": ({}, {"search_margin": 0.1}),
            "ofstitch-correlate": ({}, {})}
# The stitching mode each program runs in (its own spelling).
MODES = {"ofstitch-correlate": "only-correlate", "reference-correlate": "only_correlate"}
# The speed issue's scans: tiles x width x height.
DEFAULT_SCANS = ("100x820x616", "400x820x616", "1000x820x616", "100x1640x1232",
                 "20x4056x3040")

# ----------------------------------------------------------------------------- runners
# Each runs in its own subprocess: argv[1] is a JSON config; the last stdout line starting
# with MARK holds the result. Stage times come from wrapping the pipeline's functions.

TIMER = r"""
import functools, importlib, time
PHASES, DEPTH = {}, {}
def wrap(module, attr, phase, keep=None):
    mod = importlib.import_module(module)
    fn = getattr(mod, attr, None)
    if fn is None:
        return
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        DEPTH[phase] = DEPTH.get(phase, 0) + 1  # nested calls of one phase count once
        try:
            out = fn(*args, **kwargs)
        finally:
            DEPTH[phase] -= 1
            if DEPTH[phase] == 0:
                PHASES[phase] = PHASES.get(phase, 0.0) + time.perf_counter() - t
        if keep is not None:
            keep.append(out)
        return out
    setattr(mod, attr, timed)
"""

OFSTITCH_RUNNER = TIMER + r"""
import json, sys
t0 = time.perf_counter()
import ofstitch
from ofstitch import StitchSettings
try:
    from ofstitch.allocator import tune_malloc
except ImportError:  # ofstitch-before at a commit older than ofstitch.allocator
    from ofstitch.render import limit_malloc_arenas as tune_malloc
tune_malloc()  # as the command line does (ofstitch FOLDER)
cfg = json.loads(sys.argv[1])
for module, attr, phase in [
        ("ofstitch.pipeline", "load_connected_scan", "load"),
        ("ofstitch.registration", "correlate", "correlate"),
        ("ofstitch.registration", "place", "place"),
        ("ofstitch.registration", "local_search", "local search"),
        ("ofstitch.pipeline", "write_preview", "render"),
        ("ofstitch.pipeline", "write_full_resolution", "render"),
        ("ofstitch.formats", "write_thumbnail", "render")]:
    wrap(module, attr, phase)
for attr in dir(importlib.import_module("ofstitch.diagnostics")):
    if attr.startswith("plot_"):
        wrap("ofstitch.diagnostics", attr, "plots")
PHASES["import"] = time.perf_counter() - t0
t1 = time.perf_counter()
settings = StitchSettings(stitching_mode=cfg["mode"], **cfg["settings"]).with_correlation(
    **cfg["correlation"])
result = ofstitch.stitch(cfg["folder"], settings, output_dir=cfg["out"])
PHASES["total"] = time.perf_counter() - t1
pos = {n: [float(r), float(c)] for n, (r, c) in zip(result.names, result.positions_px.tolist())
       } if result.registration is not None else {}  # only-correlate places nothing
print("@@RESULT@@", json.dumps({"positions": pos, "phases": PHASES,
                                "version": ofstitch.__version__}))
"""

REFERENCE_RUNNER = TIMER + r"""
import json, sys
t0 = time.perf_counter()
import importlib.metadata
import openflexure_stitching
from openflexure_stitching.pipeline import load_tile_and_stitch
from openflexure_stitching.settings import OutputSettings
cfg = json.loads(sys.argv[1])
kept = []
P = "openflexure_stitching.pipeline"
wrap(P, "load_and_cache_correlated_image_set", "correlate")  # metadata, decode, correlate
wrap("openflexure_stitching.plotting", "plot_inputs", "plots")
wrap(P, "determine_thresholds", "place")
wrap(P, "perform_final_position_optimisation", "place", keep=kept)
wrap(P, "save_preview", "render")
wrap(P, "create_thumbnail", "render")
wrap(P, "save_full_stitch", "render")
PHASES["import"] = time.perf_counter() - t0
t1 = time.perf_counter()
load_tile_and_stitch(cfg["folder"], output_settings=OutputSettings(
    output_dir=cfg["out"], stitching_mode=cfg["mode"]))
PHASES["total"] = time.perf_counter() - t1
pos = {n: [float(p[0]), float(p[1])] for n, p in kept[-1].items()} if kept else {}
print("@@RESULT@@", json.dumps({"positions": pos, "phases": PHASES,
                                "version": importlib.metadata.version("openflexure-stitching")}))
"""

FLOOR_RUNNER = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import numpy as np
import pyvips
cfg = json.loads(sys.argv[1])
truth = json.loads(open(cfg["truth"]).read())
names, top = truth["names"], np.asarray(truth["truth_px_row_col"], dtype=np.int64)
th, tw = truth["tile_shape"]
top -= top.min(axis=0)
height, width = (top.max(axis=0) + (th, tw)).tolist()
t1 = time.perf_counter()
mosaic = np.zeros((height, width, 3), dtype=np.uint8)
def decode(k):
    image = pyvips.Image.new_from_file(os.path.join(cfg["folder"], names[k]),
                                       access="sequential")
    (y, x) = top[k]
    mosaic[y:y + th, x:x + tw] = image.numpy()[..., :3]
with ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(decode, range(len(names))))
t2 = time.perf_counter()
pyvips.Image.new_from_array(mosaic).jpegsave(os.path.join(cfg["out"], "floor.jpg"), Q=85)
t3 = time.perf_counter()
print("@@RESULT@@", json.dumps({"phases": {"import": t1 - t0, "decode": t2 - t1,
                                           "encode": t3 - t2, "total": t3 - t1},
                                "version": pyvips.__version__}))
"""

RUNNERS = {"floor": FLOOR_RUNNER, "ofstitch": OFSTITCH_RUNNER,
           "ofstitch-before": OFSTITCH_RUNNER,
           "ofstitch-strips": OFSTITCH_RUNNER, "reference": REFERENCE_RUNNER,
           "ofstitch-correlate": OFSTITCH_RUNNER, "reference-correlate": REFERENCE_RUNNER}


# ----------------------------------------------------------------------------- scans


@dataclass(frozen=True)
class Size:
    n_tiles: int
    tile_shape: tuple[int, int]  # (h, w)

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)``: the most nearly square grid of ``n_tiles`` (rows <= columns)."""
        rows = max(d for d in range(1, math.isqrt(self.n_tiles) + 1) if self.n_tiles % d == 0)
        if self.n_tiles > 3 and rows == 1:
            raise ValueError(f"{self.n_tiles} tiles make only a 1-row grid: choose a tile count "
                             "with a divisor near its square root")
        return rows, self.n_tiles // rows

    @property
    def label(self) -> str:
        h, w = self.tile_shape
        return f"{self.n_tiles}x{w}x{h}"


def parse_scan(text: str) -> Size:
    """'100x820x616' (tiles x width x height) -> Size(100, (616, 820))."""
    try:
        n, w, h = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        raise ValueError(f"a scan is TILESxWIDTHxHEIGHT, e.g. 100x820x616, got {text!r}"
                         ) from None
    return Size(n, (h, w))


def parse_tiles(text: str) -> tuple[int, int]:
    """'832x624' (width x height, as the issue writes it) -> (624, 832)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def big_source(shape: tuple[int, int], data: Path) -> np.ndarray:
    """The CMU-1 H&E region mirrored out to at least ``shape`` = (h, w) (no repeats by
    translation closer than twice the image, so no false correlation peaks)."""
    from ofstitch.synthetic import load_source

    shared = data / "cmu1-he" / "CMU-1-Small-Region.jpg"
    src = load_source(shared if shared.is_file() else None)
    pad_h, pad_w = max(0, shape[0] - src.shape[0]), max(0, shape[1] - src.shape[1])
    while pad_h or pad_w:  # np.pad's symmetric mode reflects at most once per call
        add_h, add_w = min(pad_h, src.shape[0]), min(pad_w, src.shape[1])
        src = np.pad(src, ((0, add_h), (0, add_w), (0, 0)), mode="symmetric")
        pad_h, pad_w = pad_h - add_h, pad_w - add_w
    return src


def textured_mask(source: np.ndarray, truth: np.ndarray, tile_shape: tuple[int, int],
                  pairs: np.ndarray, min_fraction: float = 0.1) -> np.ndarray:
    """:func:`ofstitch.synthetic.textured_pairs`, computed on each overlap only (the
    source of a 400-tile scan is too large for a whole texture map)."""
    from ofstitch.synthetic import texture_map

    th, tw = tile_shape
    out = np.zeros(len(pairs), dtype=bool)
    m = 4  # beyond the texture window's half-width
    for k, (a, b) in enumerate(pairs.tolist()):
        (ya, xa), (yb, xb) = truth[a], truth[b]
        y0, y1 = max(ya, yb), min(ya, yb) + th
        x0, x1 = max(xa, xb), min(xa, xb) + tw
        if y1 - y0 > 4 and x1 - x0 > 4:
            crop = source[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m]
            oy, ox = y0 - max(0, y0 - m), x0 - max(0, x0 - m)
            tex = texture_map(crop)[oy:oy + y1 - y0, ox:ox + x1 - x0]
            out[k] = tex.mean() >= min_fraction
    return out


def overlapping_pairs(truth: np.ndarray, tile_shape: tuple[int, int]) -> np.ndarray:
    """Index pairs ``(a, b)``, ``a < b``, whose true footprints overlap."""
    size = np.asarray(tile_shape)
    out = []
    for a in range(len(truth)):
        extent = size - np.abs(truth[a + 1:] - truth[a])
        for j in np.flatnonzero((extent > 0).all(axis=1)):
            out.append((a, a + 1 + int(j)))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def build_scan(size: Size, work: Path, data: Path, seed: int = 1) -> Path:
    """Make (or reuse) the scan of ``size`` under ``work``; returns its folder.

    Next to the tiles: ``<folder>_truth.json`` (make_scan's) and ``<folder>_pairs.json``
    (overlapping and textured pairs).
    """
    from ofstitch.synthetic import make_scan

    folder = work / "scans" / size.label / "tiles"
    pairs_file = folder.parent / "tiles_pairs.json"
    if pairs_file.is_file():
        return folder
    if folder.parent.exists():
        shutil.rmtree(folder.parent)
    rows, cols = size.grid
    th, tw = size.tile_shape
    need = (int(rows * th * 0.7 + 0.3 * th + 400), int(cols * tw * 0.7 + 0.3 * tw + 400))
    source = big_source(need, data)
    scan = make_scan(folder, source=source, grid=(rows, cols), tile_shape=size.tile_shape,
                     overlap=0.3, seed=seed)
    truth = scan.truth_px.astype(np.int64)
    pairs = overlapping_pairs(truth, size.tile_shape)
    textured = textured_mask(source, truth, size.tile_shape, pairs)
    pairs_file.write_text(json.dumps({"pairs": pairs.tolist(), "textured": textured.tolist()}))
    return folder


# ----------------------------------------------------------------------------- running


def reference_python(venv: Path | None, *, create: bool = True) -> Path:
    """The Python of a venv holding the reference; creates ``benchmarks/.refvenv`` if needed."""
    candidates = [venv] if venv is not None else list(REF_CANDIDATES)
    for candidate in candidates:
        python = candidate / "bin" / "python"
        if python.exists() and _reference_version(python) == REF_VERSION:
            return python
    target = venv if venv is not None else HERE / ".refvenv"
    if not create:
        raise SystemExit(f"no openflexure-stitching {REF_VERSION} in {target}")
    print(f"installing {REF_REQUIREMENT} into {target} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    python = target / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", REF_REQUIREMENT], check=True)
    if _reference_version(python) != REF_VERSION:
        raise SystemExit(f"installing {REF_REQUIREMENT} into {target} did not work")
    return python


def _reference_version(python: Path) -> str | None:
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, openflexure_stitching; "
         "print(m.version('openflexure-stitching'))"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def snapshot_ofstitch(work: Path) -> tuple[Path, str]:
    """Copy this checkout's ``ofstitch`` package into ``work`` (edits made while a long
    benchmark runs do not leak into it); returns (folder for PYTHONPATH, commit)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    commit = proc.stdout.strip() or "unknown"
    target = work / "snapshots" / f"{commit}-{os.getpid()}"
    if not target.exists():
        shutil.copytree(ROOT / "ofstitch", target / "ofstitch",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target, commit


def snapshot_commit(work: Path, commit: str) -> tuple[Path, str]:
    """Export ``commit``'s ``ofstitch`` package into ``work`` (for ``ofstitch-before``: the
    same scans, the same runner, an earlier version of the code)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit],
                          capture_output=True, text=True, check=True)
    short = proc.stdout.strip()
    target = work / "snapshots" / f"before-{short}"
    if not (target / "ofstitch").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", short, "ofstitch"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, short


def run_one(program: str, python: str, scan: Path, run_dir: Path, timeout: float,
            pythonpath: Path | None = None) -> dict:
    """One cold run on a fresh copy of the scan: wall, peak RSS, CPU, stages, positions."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    folder = run_dir / "tiles"
    shutil.copytree(scan, folder)
    out = run_dir / "out"
    out.mkdir()
    cfg = {"folder": str(folder), "out": str(out),
           "truth": str(scan.parent / f"{scan.name}_truth.json"),
           "mode": MODES.get(program, "all"),
           "settings": VARIANTS.get(program, ({}, {}))[0],
           "correlation": VARIANTS.get(program, ({}, {}))[1]}
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    log_path = run_dir / "log.txt"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, "-c", RUNNERS[program], json.dumps(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env)
        deadline = t0 + timeout
        status, usage = None, None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                status = "timeout"
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = 0  # reaped above; keep Popen from waiting again
    text = log_path.read_text(errors="replace")
    result = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
              "cpu_s": usage.ru_utime + usage.ru_stime}
    # The child's figure is at least this process's own peak (see run_matrix): flag it.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if result["peak_rss_mb"] <= 1.05 * own:
        result["rss_bounded_by_parent"] = True
    for line in reversed(text.splitlines()):
        if line.startswith(MARK):
            result.update(json.loads(line[len(MARK):]))
            break
    else:
        why = "timed out" if status == "timeout" else f"exit status {status}"
        last = text.strip().splitlines()[-1] if text.strip() else ""
        result["error"] = f"{why}: {last[-300:]}"
    return result


def accuracy(positions: dict, scan: Path) -> dict:
    """Max and RMS pair error (px) over the textured overlapping pairs."""
    from ofstitch.synthetic import pair_errors

    truth = json.loads((scan.parent / f"{scan.name}_truth.json").read_text())
    info = json.loads((scan.parent / f"{scan.name}_pairs.json").read_text())
    names = truth["names"]
    missing = [n for n in names if n not in positions]
    if missing:
        return {"error": f"{len(missing)} tiles not placed"}
    got = np.array([positions[n] for n in names], dtype=np.float64)
    pairs = np.asarray(info["pairs"], dtype=np.int64).reshape(-1, 2)
    textured = np.asarray(info["textured"], dtype=bool)
    every = pair_errors(got, np.asarray(truth["truth_px_row_col"], dtype=np.float64), pairs)
    errs = every[textured]
    return {"max_err_px": float(errs.max()) if len(errs) else None,
            "rms_err_px": float(np.sqrt(np.mean(errs**2))) if len(errs) else None,
            "max_err_all_px": float(every.max()) if len(every) else None,
            "rms_err_all_px": float(np.sqrt(np.mean(every**2))) if len(every) else None,
            "n_pairs": len(pairs), "n_textured": int(textured.sum())}


def result_path(results: Path, size: Size, program: str, tag: str = "") -> Path:
    return results / f"{size.label}__{program}{'__' + tag if tag else ''}.json"


def run_matrix(sizes: list[Size], programs: list[str], *, work: Path = WORK_DIR,
               results: Path = RESULTS_DIR, data: Path = DEFAULT_DATA,
               ref_python: Path | None = None, timeout: float = 3600, repeats: int = 1,
               tag: str = "", keep: bool = False, before: str | None = None,
               log=print) -> list[dict]:
    """Run ``programs`` on each size in turn (in alternation, ``repeats`` times), writing
    each result to ``results`` as soon as it is known. Returns the results."""
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    pythonpath, commit = snapshot_ofstitch(work)
    paths = {p: pythonpath for p in PROGRAMS if p.startswith("ofstitch")}
    commits = {p: commit for p in paths}
    if "ofstitch-before" in programs:
        if before is None:
            raise ValueError("ofstitch-before needs --before COMMIT")
        paths["ofstitch-before"], commits["ofstitch-before"] = snapshot_commit(work, before)
    pythons = {p: sys.executable for p in PROGRAMS if p.startswith(("floor", "ofstitch"))}
    pythons.update({p: str(ref_python) if ref_python else None
                    for p in PROGRAMS if p.startswith("reference")})
    done = []
    for size in sizes:
        log(f"[{datetime.now():%H:%M:%S}] scan {size.label}: building / reusing")
        # In a fresh interpreter: a program started from this process inherits its peak
        # RSS (Linux folds the parent's high-water mark into a vforked child's at exec), so
        # this process must never hold a large source image.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            scan = pool.apply(build_scan, (size, work, data))
        runs: dict[str, list[dict]] = {p: [] for p in programs}
        for rep in range(repeats):
            for program in programs:
                log(f"[{datetime.now():%H:%M:%S}] {size.label} {program} (run {rep + 1})")
                run_dir = work / "runs" / f"{size.label}-{program}"
                res = run_one(program, pythons[program], scan, run_dir, timeout,
                              paths.get(program))
                if res.get("positions"):
                    res.update(accuracy(res.pop("positions"), scan))
                res.pop("positions", None)
                if not keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
                runs[program].append(res)
                log(f"    wall {res['wall_s']:.1f} s, RSS {res['peak_rss_mb']:.0f} MB"
                    + (f", ERROR {res['error']}" if "error" in res else ""))
        for program, rs in runs.items():
            ok = [r for r in rs if "error" not in r] or rs
            best = min(ok, key=lambda r: r["wall_s"])  # the least disturbed run
            record = {**best, "program": program, "size": size.label,
                      "n_tiles": size.n_tiles, "tile_h": size.tile_shape[0],
                      "tile_w": size.tile_shape[1], "runs": len(rs),
                      "walls_s": [r["wall_s"] for r in rs],
                      "commit": commits.get(program),
                      "when": datetime.now().isoformat(timespec="seconds"),
                      "host": f"{platform.machine()}, {os.cpu_count()} CPUs"}
            result_path(results, size, program, tag).write_text(json.dumps(record, indent=1))
            done.append(record)
    return done


# ----------------------------------------------------------------------------- report


def load_results(results: Path = RESULTS_DIR, tag: str = "") -> list[dict]:
    suffix = f"__{tag}.json" if tag else ".json"
    out = []
    for path in sorted(results.glob("*.json")):
        if path.name.count("__") == (2 if tag else 1) and path.name.endswith(suffix):
            out.append(json.loads(path.read_text()))
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown(records: list[dict]) -> str:
    """The side-by-side table, one row per size and program."""
    by = {(r["size"], r["program"]): r for r in records}
    sizes = sorted({(r["tile_h"] * r["tile_w"], r["n_tiles"], r["size"]) for r in records})
    head = ("| tiles | tile px | program | wall s | × floor | ref ÷ this | correlate s "
            "| ref ÷ this (correlate) | peak RSS MB | RSS ÷ ref | max err px | RMS err px "
            "| max err, all pairs px |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, n, label in sizes:
        floor, ref = by.get((label, "floor")), by.get((label, "reference"))
        for program in PROGRAMS:
            r = by.get((label, program))
            if r is None or program in MODES:  # the only-correlate runs: correlate_table
                continue
            tile = f"{r['tile_w']}×{r['tile_h']}"
            if "error" in r:
                lines.append(f"| {n} | {tile} | {program} | failed: {r['error'][:80]} "
                             "| | | | | | | | | |")
                continue
            ok = lambda x: x is not None and "error" not in x  # noqa: E731
            corr = r.get("phases", {}).get("correlate")
            if program.startswith("ofstitch") and corr is not None:
                corr += r["phases"].get("load", 0.0)  # the reference's includes loading
            ref_corr = ref.get("phases", {}).get("correlate") if ok(ref) else None
            lines.append(
                f"| {n} | {tile} | {program} | {fmt(r['wall_s'])} "
                f"| {fmt(r['wall_s'] / floor['wall_s'], 2) if ok(floor) else '–'} "
                f"| {fmt(ref['wall_s'] / r['wall_s']) if ok(ref) else '–'} "
                f"| {fmt(corr, 2)} "
                f"| {fmt(ref_corr / corr) if ref_corr and corr else '–'} "
                f"| {r['peak_rss_mb']:.0f}{'*' if r.get('rss_bounded_by_parent') else ''} "
                f"| {fmt(r['peak_rss_mb'] / ref['peak_rss_mb'], 2) if ok(ref) else '–'} "
                f"| {fmt(r.get('max_err_px'), 2)} | {fmt(r.get('rms_err_px'), 2)} "
                f"| {fmt(r.get('max_err_all_px'), 2)} |")
    return "\n".join(lines)


def correlate_table(records: list[dict]) -> str:
    """Correlation only: ofstitch's ``only-correlate`` against the reference's
    ``only_correlate``, one row per size (empty when neither ran)."""
    by = {(r["size"], r["program"]): r for r in records}
    sizes = sorted({(r["tile_h"] * r["tile_w"], r["n_tiles"], r["size"]) for r in records
                    if r["program"] in MODES})
    if not sizes:
        return ""
    head = ("| tiles | tile px | program | wall s | ref ÷ this | peak RSS MB | RSS ÷ ref |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, n, label in sizes:
        for ours, theirs in CORRELATE_ONLY.items():
            ref = by.get((label, theirs))
            ref_ok = ref is not None and "error" not in ref
            for program in (ours, theirs):
                r = by.get((label, program))
                if r is None:
                    continue
                name = f"{program} (`{MODES[program]}`)"
                tile = f"{r['tile_w']}×{r['tile_h']}"
                if "error" in r:
                    lines.append(f"| {n} | {tile} | {name} | failed: {r['error'][:80]} | | | |")
                    continue
                lines.append(
                    f"| {n} | {tile} | {name} | {fmt(r['wall_s'])} "
                    f"| {fmt(ref['wall_s'] / r['wall_s']) if ref_ok else '–'} "
                    f"| {r['peak_rss_mb']:.0f}{'*' if r.get('rss_bounded_by_parent') else ''} "
                    f"| {fmt(r['peak_rss_mb'] / ref['peak_rss_mb'], 2) if ref_ok else '–'} |")
    return "\n".join(lines)


def stage_table(records: list[dict]) -> str:
    """Where each program's time goes (seconds per stage)."""
    stages = ["import", "load", "correlate", "local search", "place", "plots", "render",
              "decode", "encode"]
    head = "| tiles | tile px | program | " + " | ".join(stages) + " | other |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: (r["tile_h"] * r["tile_w"], r["n_tiles"],
                                             PROGRAMS.index(r["program"]))):
        ph = r.get("phases")
        if not ph:
            continue
        known = sum(ph.get(s, 0.0) for s in stages)
        other = r["wall_s"] - known
        cells = " | ".join(fmt(ph.get(s), 2) if s in ph else "" for s in stages)
        lines.append(f"| {r['n_tiles']} | {r['tile_w']}×{r['tile_h']} | {r['program']} "
                     f"| {cells} | {fmt(other, 2)} |")
    return "\n".join(lines)


def write_results_md(records: list[dict], path: Path = RESULTS_MD) -> None:
    """Replace the section between the compare.py markers (append it the first time)."""
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    whens = sorted(r["when"] for r in records)
    host = records[0]["host"] if records else ""
    section = "\n".join([
        BEGIN,
        "## Side by side: ofstitch, openflexure-stitching 0.3.1 and the decode floor "
        "(benchmarks/compare.py)",
        "",
        f"Synthetic scans (CMU-1 H&E, v3 EXIF, 30% overlap), full stitch (mode `all`), each "
        f"program cold in its own subprocess, in alternation; {host}, Python "
        f"{platform.python_version()}; runs {whens[0] if whens else ''} to "
        f"{whens[-1] if whens else ''}; ofstitch at {', '.join(commits) or '–'}. "
        "'× floor' is wall time over the floor's (decode every tile once, encode the mosaic "
        "once); 'ref ÷ this' is the reference's time over this program's; 'correlate' is "
        "metadata + decode + correlation (the reference's `load_and_cache_correlated_image_set`, "
        "ofstitch's `load_connected_scan` + `registration.correlate`; 'local search' is robust "
        "placement's full-resolution search of the pairs correlation did not locate). "
        "'ofstitch' runs with default settings (the predicted overlaps plus a 10% margin, "
        "robust placement); 'ofstitch-before' is the default of the commit given by "
        "`--before`. Errors are of each "
        "overlapping pair's relative placement against the truth: over the pairs whose overlap "
        "has texture, and over all pairs (blank overlaps can only be placed from the stage unless"
        " a correlation finds them). Peak RSS is the subprocess's (`os.wait4`); the floor holds "
        "the whole mosaic in memory, so its RSS is "
        "not a floor. Regenerate with `python benchmarks/compare.py --write`.",
        "",
        markdown(records),
        "",
        *(["Correlation only (ofstitch `--stitching-mode only-correlate`, the reference's "
           "`--stitching_mode only_correlate`: each writes its correlation cache and nothing "
           "else):", "", correlate_table(records), ""] if correlate_table(records) else []),
        "Seconds per stage (wrapped functions inside each run; 'other' is interpreter start "
        "and everything not wrapped; ofstitch draws its plots on a thread while the mosaic "
        "renders, so its stages overlap and 'other' can be negative):",
        "",
        stage_table(records),
        END])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", default=None,
                        help="scans as TILESxWIDTHxHEIGHT, comma-separated (default the speed "
                             f"issue's: {','.join(DEFAULT_SCANS)})")
    parser.add_argument("--sizes", default=None,
                        help="instead of --scans: tile counts (with --tiles, every pair)")
    parser.add_argument("--tiles", default=None,
                        help="instead of --scans: tile sizes, width x height (with --sizes)")
    parser.add_argument("--programs", default=",".join(DEFAULT_PROGRAMS),
                        help=f"which of {','.join(PROGRAMS)} to run (default "
                             f"{','.join(DEFAULT_PROGRAMS)})")
    parser.add_argument("--ref-venv", type=Path, default=None,
                        help="virtual environment with openflexure-stitching 0.3.1 (created "
                             "if missing; default /opt/refvenv if it has it, else "
                             "benchmarks/.refvenv)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold runs per program and size (the fastest is kept)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--work", type=Path, default=WORK_DIR,
                        help="scans and run copies (default benchmarks/work, git-ignored)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="one JSON per size and program (default benchmarks/results)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data folder with cmu1-he (default ../shared/data; the "
                             "bundled sample is used without it)")
    parser.add_argument("--before", default=None,
                        help="a git commit: the program 'ofstitch-before' runs its ofstitch "
                             "(the same scans and runner), for before/after in one invocation")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--write", action="store_true",
                        help="rewrite the compare.py section of benchmarks/RESULTS.md from all "
                             "saved results afterwards")
    parser.add_argument("--table", action="store_true",
                        help="only print (and with --write, save) the table of saved results")
    args = parser.parse_args(argv)

    if not args.table:
        programs = [p.strip() for p in args.programs.split(",") if p.strip()]
        unknown = set(programs) - set(PROGRAMS)
        if unknown:
            parser.error(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
        if args.sizes or args.tiles:
            if args.scans:
                parser.error("give --scans, or --sizes with --tiles, not both")
            tiles = [parse_tiles(t) for t in (args.tiles or "820x616").split(",")]
            counts = [int(n) for n in (args.sizes or "100").split(",")]
            sizes = [Size(n, t) for t in tiles for n in counts]
        else:
            try:
                sizes = [parse_scan(t) for t in (args.scans or ",".join(DEFAULT_SCANS)).split(",")
                         if t.strip()]
            except ValueError as exc:
                parser.error(str(exc))
        for size in sizes:
            try:
                _ = size.grid
            except ValueError as exc:
                parser.error(str(exc))
        sizes.sort(key=lambda s: s.n_tiles * s.tile_shape[0] * s.tile_shape[1])
        needs_ref = any(p.startswith("reference") for p in programs)
        ref = reference_python(args.ref_venv) if needs_ref else None
        sys.path.insert(0, str(ROOT))  # build scans with this checkout's ofstitch
        run_matrix(sizes, programs, work=args.work, results=args.results, data=args.data,
                   ref_python=ref, timeout=args.timeout, repeats=max(1, args.repeats),
                   tag=args.tag, keep=args.keep, before=args.before,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    records = load_results(args.results, args.tag)
    print(markdown(records))
    print()
    if correlate_table(records):
        print(correlate_table(records))
        print()
    print(stage_table(records))
    if args.write and records:
        write_results_md(records)
        print(f"updated {RESULTS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
