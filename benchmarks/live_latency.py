"""Live-stitching latency: drop tiles into a watched folder at the microscope's pace.

Runs ``ofstitch watch`` in a subprocess on an empty folder, then writes the
tiles of a synthetic scan (832x624 px, v3 EXIF, cut from the CMU-1 H&E image,
mirrored to make it large enough) into it one at a time, every ``--interval``
seconds, in place (like the microscope, not renamed into place). A monitor
polls ``preview.jpg`` every 20 ms and reads the tile count from its EXIF
(``NumberOfImages``). The latency of tile k is the time from the end of its
write to the first preview that includes k tiles (it includes the settle time).

When every tile is in and the watcher has refined its placement, it is stopped
with SIGINT and a batch ``ofstitch.register`` runs on the folder: it must
correlate nothing (every pair came from the live cache), and its positions are
compared with the live ones (``OFMTileConfiguration.txt``). The batch placement
time for the whole scan is printed too.

Usage::

    python benchmarks/live_latency.py --grid 20 25 --interval 1.5     # 500 tiles, ~13 min
    python benchmarks/live_latency.py --grid 4 5 --interval 1.0       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import piexif

HERE = Path(__file__).resolve().parent
SHARED_SOURCE = HERE.parent / ".." / "shared" / "data" / "cmu1-he" / "CMU-1-Small-Region.jpg"


def big_source(need: tuple[int, int]) -> np.ndarray:
    """The H&E image mirrored (so that edges match) until it is at least ``need`` (h, w)."""
    from ofstitch.synthetic import load_source

    src = load_source(SHARED_SOURCE if SHARED_SOURCE.is_file() else None)
    rows = []
    for r in range(-(-need[0] // src.shape[0])):
        band = [src[::-1] if r % 2 else src]
        row = [band[0][:, ::-1] if c % 2 else band[0] for c in range(-(-need[1] // src.shape[1]))]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:need[0], :need[1]])


def make_tiles(folder: Path, grid: tuple[int, int], tile_shape: tuple[int, int]) -> list[str]:
    from ofstitch.synthetic import make_scan

    marker = folder / "names.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    overlap = 0.3
    need = (int(grid[0] * tile_shape[0] * (1 - overlap) + tile_shape[0] + 200),
            int(grid[1] * tile_shape[1] * (1 - overlap) + tile_shape[1] + 200))
    t0 = time.perf_counter()
    scan = make_scan(folder / "tiles", source=big_source(need), grid=grid,
                     tile_shape=tile_shape, overlap=overlap, stage_error_px=4.0,
                     rotation_deg=0.5, seed=3)
    print(f"made {len(scan.names)} tiles in {time.perf_counter() - t0:.0f} s", flush=True)
    marker.write_text(json.dumps(scan.names))
    return scan.names


def tiles_in(path: Path) -> int | None:
    try:
        from ofstitch.metadata import parse_usercomment

        comment = piexif.load(os.fspath(path))["Exif"][piexif.ExifIFD.UserComment]
        return int(parse_usercomment(comment)["NumberOfImages"])
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=2, default=(20, 25), metavar=("ROWS", "COLS"))
    parser.add_argument("--tile", type=int, nargs=2, default=(624, 832), metavar=("H", "W"))
    parser.add_argument("--interval", type=float, default=1.5,
                        help="seconds between tiles (the microscope's pace)")
    parser.add_argument("--settle-time", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ofstitch-live",
                        help="where the source tiles are kept (reused) and the watched folder is")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    grid, tile_shape = tuple(args.grid), tuple(args.tile)

    source_dir = args.work / f"source-{grid[0]}x{grid[1]}-{tile_shape[1]}x{tile_shape[0]}"
    names = make_tiles(source_dir, grid, tile_shape)
    watched = args.work / "watched"
    shutil.rmtree(watched, ignore_errors=True)
    watched.mkdir(parents=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log_path = args.work / "watch.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ofstitch", "watch", str(watched),
                             "--settle-time", str(args.settle_time)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    previews: list[tuple[float, int]] = []
    done = threading.Event()

    def monitor() -> None:
        preview = watched / "preview.jpg"
        last = None
        while not done.is_set():
            try:
                st = os.stat(preview)
                ident = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                ident = None
            if ident is not None and ident != last:
                now = time.time()
                n = tiles_in(preview)
                if n is not None:
                    previews.append((now, n))
                    last = ident
            time.sleep(0.02)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    time.sleep(3.0)  # let the watcher start (imports) before the first tile
    arrivals = []
    start = time.time()
    for k, name in enumerate(names):
        due = start + k * args.interval
        time.sleep(max(0.0, due - time.time()))
        shutil.copyfile(source_dir / "tiles" / name, watched / name)  # written in place
        arrivals.append(time.time())
        if (k + 1) % 50 == 0:
            seen = previews[-1][1] if previews else 0
            print(f"{k + 1} tiles written, preview shows {seen}", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not previews or previews[-1][1] < len(names)):
        time.sleep(0.1)
    # Let the watcher refine the placement once the scan has stopped (it rewrites the
    # positions file), then stop it as a user would, with Ctrl-C.
    config = watched / "OFMTileConfiguration.txt"
    deadline = time.time() + 60
    while time.time() < deadline and time.time() - config.stat().st_mtime < 6.0:
        time.sleep(0.2)
    done.set()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    log.close()

    # Latency of tile k: the first preview showing at least k + 1 tiles.
    latency = np.full(len(names), np.nan)
    times = np.array([t for t, _ in previews])
    counts = np.array([n for _, n in previews])
    for k, t_arr in enumerate(arrivals):
        later = np.flatnonzero((counts >= k + 1) & (times >= t_arr))
        if len(later):
            latency[k] = times[later[0]] - t_arr
    update_s = [float(m.group(1)) for m in
                re.finditer(r"preview written in ([0-9.]+) s", log_path.read_text())]

    import ofstitch
    from ofstitch.metadata import read_tile_configuration

    t0 = time.perf_counter()
    reg = ofstitch.register(watched)
    batch_s = time.perf_counter() - t0
    live_positions = read_tile_configuration(config)  # name -> (x, y)
    batch_positions = reg.positions()  # name -> (row, col)
    live_vs_batch = max(abs(live_positions[n][1] - r) + abs(live_positions[n][0] - c)
                        for n, (r, c) in batch_positions.items()) \
        if set(live_positions) == set(batch_positions) else float("nan")

    def stats(values: np.ndarray) -> dict:
        v = values[np.isfinite(values)]
        if not len(v):
            return {}
        return {"n": int(len(v)), "median": float(np.median(v)),
                "p90": float(np.percentile(v, 90)), "max": float(v.max()),
                "over_2s": int((v > 2.0).sum())}

    n = len(names)
    phases = {f"tiles {a + 1}-{b}": stats(latency[a:b])
              for a, b in ((0, min(n, 100)), (100, min(n, 300)), (300, n)) if a < n}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}",
        "tiles": n, "tile_shape": list(tile_shape), "interval_s": args.interval,
        "settle_time_s": args.settle_time, "watch_exit_code": code,
        "latency_s": stats(latency), "latency_by_phase": phases,
        "missing_previews": int(np.isnan(latency).sum()),
        "update_s": stats(np.array(update_s)),
        "live_vs_batch_max_px": live_vs_batch,  # file positions have 3 decimals
        "batch_register_after": {"n_correlated": reg.n_correlated, "n_cached": reg.n_cached,
                                 "seconds": batch_s,
                                 "place_s": reg.timings_s.get("place")},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**result, "latency_each_s": latency.tolist()}))


if __name__ == "__main__":
    main()
