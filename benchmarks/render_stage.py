"""The render stage alone, against the decode floor: preview, thumbnail and full mosaic.

For each scan of :mod:`compare` (``TILESxWIDTHxHEIGHT``, generated if missing), the tiles
are rendered at their true positions (no correlation), as ``ofstitch FOLDER`` renders
them: the full-resolution JPEG, ``preview.jpg`` from its bands and
``stitched_thumbnail.jpg`` (versions before the band preview drew the preview first,
from the tiles: its time is then the ``preview`` phase). Each
program runs in a fresh subprocess, in alternation, ``--repeat`` times:

- ``floor``: :data:`compare.FLOOR_RUNNER` (decode every tile once with pyvips on every
  core into a NumPy mosaic, encode it once as JPEG Q85);
- ``ofstitch``: this checkout's render stage;
- ``before``: the same runner on the ``ofstitch`` package of ``--before COMMIT``.

Printed for each run: wall time, CPU time and peak RSS of the subprocess, and the wall
time of the preview (with the thumbnail) and of the full mosaic inside it. On a shared
machine compare the programs as ratios within one invocation, and look at CPU time too.

    python benchmarks/render_stage.py --scans 400x820x616 --before e4aae68
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

MARK = "@@RESULT@@"

RENDER_RUNNER = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import numpy as np
from ofstitch import formats, pipeline, render
from ofstitch.scan import load_scan
from ofstitch.settings import StitchSettings
from ofstitch.allocator import tune_malloc
tune_malloc()  # as the command line does
cfg = json.loads(sys.argv[1])
out = Path(cfg["out"])
settings = StitchSettings()
scan = load_scan(Path(cfg["folder"]), settings)
truth = json.loads(Path(cfg["truth"]).read_text())
where = dict(zip(truth["names"], truth["truth_px_row_col"]))
positions = np.array([where[f.name] for f in scan.files], dtype=float)
t1 = time.perf_counter()
shown = pipeline.rendering_levels(scan)
size = render.make_layout(positions, scan.tile_shape).size
wanted = pipeline.full_resolution_formats(settings, size)
try:
    from ofstitch import preview
    bands = preview.BandPreview(size, render.PREVIEW_WIDTH)
except (ImportError, AttributeError):
    bands = None
if bands is not None:  # as ofstitch FOLDER does: the preview from the JPEG's bands
    t2 = t1
    pipeline.write_full_resolution(scan, positions, out, "scan", settings, wanted,
                                   shown=shown, on_band=bands.add)
    preview.write_jpeg(bands.image(), out / "preview.jpg", scan, bands.scale)
    formats.write_thumbnail(out / "preview.jpg", out / "stitched_thumbnail.jpg")
else:  # versions that drew the preview from the tiles first
    skip = pipeline.write_preview(scan, positions, out / "preview.jpg", shown=shown)
    formats.write_thumbnail(out / "preview.jpg", out / "stitched_thumbnail.jpg")
    t2 = time.perf_counter()
    pipeline.write_full_resolution(scan, positions, out, "scan", settings, wanted, skip=skip,
                                   shown=shown)
t3 = time.perf_counter()
print("@@RESULT@@", json.dumps({"phases": {"load": t1 - t0, "preview": t2 - t1,
                                           "full": t3 - t2, "total": t3 - t1}}))
"""


def run(runner: str, cfg: dict, pythonpath: Path | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath is not None:  # ahead of the editable install's finder
        runner = (f"import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' "
                  f"not in repr(f)]; sys.path.insert(0, {str(pythonpath)!r})\n" + runner)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", runner, json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    wall = time.perf_counter() - t0
    result = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
              "peak_rss_mb": usage.ru_maxrss / 1024}
    for line in reversed(text.splitlines()):
        if line.startswith(MARK):
            result.update(json.loads(line[len(MARK):]))
            return result
    raise RuntimeError(f"run failed (status {status}): {text[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", default="100x820x616,400x820x616,1000x820x616")
    parser.add_argument("--before", help="a commit whose render stage runs as 'before'")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=compare.WORK_DIR)
    parser.add_argument("--data", type=Path, default=compare.ROOT.parent / "shared" / "data")
    args = parser.parse_args(argv)
    programs: dict[str, tuple[str, Path | None]] = {"floor": (compare.FLOOR_RUNNER, None)}
    here, commit = compare.snapshot_ofstitch(args.work)
    programs[f"ofstitch ({commit})"] = (RENDER_RUNNER, here)
    if args.before:
        before, short = compare.snapshot_commit(args.work, args.before)
        programs[f"before ({short})"] = (RENDER_RUNNER, before)
    for label in args.scans.split(","):
        size = compare.parse_scan(label)
        folder = compare.build_scan(size, args.work, args.data)
        cfg = {"folder": str(folder), "truth": str(folder.parent / f"{folder.name}_truth.json")}
        rows: dict[str, list[dict]] = {name: [] for name in programs}
        for _ in range(args.repeat):
            for name, (runner, path) in programs.items():
                with tempfile.TemporaryDirectory(prefix="render-stage.") as out:
                    result = run(runner, {**cfg, "out": out}, path)
                rows[name].append(result)
                ph = result["phases"]
                print(f"{label}  {name:24s} wall {result['wall_s']:6.2f} s  cpu "
                      f"{result['cpu_s']:6.2f} s  rss {result['peak_rss_mb']:5.0f} MB  "
                      + "  ".join(f"{k} {v:.2f}" for k, v in ph.items() if k != "import"),
                      flush=True)
        floor = statistics.median(r["phases"]["total"] for r in rows["floor"])
        for name, results in rows.items():
            total = statistics.median(r["phases"]["total"] for r in results)
            print(f"{label}  {name:24s} median {total:6.2f} s = {total / floor:4.2f} x floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
