"""What the constrained local search (:mod:`ofstitch.local_search`) costs, before and after.

Registers synthetic scans (cut from the CMU-1 H&E image as ``compare.py`` does, with blank
tiles, so that some pairs are left to the local search) in fresh subprocesses, one code tree
after the other and in alternation (``--code DIR`` puts another checkout's ``ofstitch``
first on the path), and reports the ``register`` wall time, the time spent in
``search_pairs`` and the largest error of a textured pair against the truth. The machine is
shared, so only ratios from one invocation mean anything.

Usage::

    git archive main ofstitch | tar -x -C /tmp/base
    python benchmarks/local_search_cost.py --code /tmp/base --code . --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCANS = {  # name: (grid, tile_shape, blank fraction)
    "3x3 of 1640x1232, 20% blank": ((3, 3), (1232, 1640), 0.2),
    "10x10 of 832x624, 10% blank": ((10, 10), (624, 832), 0.1),
}

CHILD = r"""
import json, sys, time
import numpy as np
import ofstitch, ofstitch.registration as R
from ofstitch.synthetic import pair_errors
spent = [0.0, 0]
real = R.search_pairs
def timed(*a, **k):
    t = time.perf_counter(); out = real(*a, **k); spent[0] += time.perf_counter() - t
    spent[1] += len(a[1])
    return out
R.search_pairs = timed
folder, truth_file, textured_file = sys.argv[1:4]
t0 = time.perf_counter()
reg = ofstitch.register(folder)
wall = time.perf_counter() - t0
truth = json.loads(open(truth_file).read())
pos = reg.positions()
p = np.array([pos[n] for n in truth["names"]])
t = np.array(truth["truth_px_row_col"], float)
pairs = np.array(json.loads(open(textured_file).read()), np.int64).reshape(-1, 2)
err = pair_errors(p, t, pairs)
print(json.dumps({"wall_s": wall, "search_s": spent[0], "searched": spent[1],
                  "max_px": float(err.max()),
                  "rms_px": float(np.sqrt(np.mean(err ** 2))), "code": ofstitch.__file__}))
"""


def build(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    import numpy as np
    from compare import big_source, overlapping_pairs, textured_mask

    from ofstitch.synthetic import make_scan

    out = {}
    for k, (name, (grid, shape, blank)) in enumerate(SCANS.items()):
        folder = work / f"scan{k}" / "tiles"
        out[name] = folder
        if (folder.parent / "textured.json").is_file():
            continue
        shutil.rmtree(folder.parent, ignore_errors=True)
        need = (int(grid[0] * shape[0] * 0.7 + 0.3 * shape[0] + 200),
                int(grid[1] * shape[1] * 0.7 + 0.3 * shape[1] + 200))
        source = big_source(need, HERE.parent.parent / "shared" / "data")
        scan = make_scan(folder, source=source, grid=grid, tile_shape=shape, overlap=0.3,
                         seed=1, blank_fraction=blank)
        truth = scan.truth_px.astype(np.int64)
        pairs = overlapping_pairs(truth, shape)
        keep = textured_mask(source, truth, shape, pairs)
        keep &= ~np.isin(pairs, scan.blank).any(axis=1)
        (folder.parent / "textured.json").write_text(json.dumps(pairs[keep].tolist()))
    return out


def run(code: Path, folder: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tiles"
        shutil.copytree(folder, copy)
        env = {**os.environ, "PYTHONPATH": str(code.resolve())}
        res = subprocess.run([sys.executable, "-c", CHILD, str(copy),
                              str(folder.parent / "tiles_truth.json"),
                              str(folder.parent / "textured.json")],
                             env=env, capture_output=True, text=True, check=True,
                             cwd=tmp)  # not this checkout: "-c" puts the cwd first on the path
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, action="append", required=True,
                        help="a folder holding the ofstitch package to time (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "local_search")
    parser.add_argument("--only", help="scans whose name holds this")
    args = parser.parse_args()
    scans = build(args.work)
    for name, folder in scans.items():
        if args.only and args.only not in name:
            continue
        for r in range(args.repeats):
            for code in args.code:
                res = run(code, folder)
                assert Path(res["code"]).resolve().is_relative_to(code.resolve()), res["code"]
                print(f"{name} | {code} | run {r + 1} | register {res['wall_s']:.2f} s | "
                      f"local search {res['search_s']:.2f} s ({res['searched']} pairs) | "
                      f"max {res['max_px']:.3f} px | RMS {res['rms_px']:.3f} px", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
