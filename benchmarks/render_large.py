"""Render a gigapixel mosaic from thousands of tiles: wall time and peak RSS per format.

The tiles are cut (once, cached in ``--tiles``) from a texture made by repeating
the bundled H&E sample, on a slightly rotated grid with random position error,
and saved as JPEG. Their true positions are known, so no correlation runs: the
benchmark calls the renderer directly (:class:`ofstitch.render.Mosaic`) and each
writer of :mod:`ofstitch.formats`, each in a fresh child process whose peak RSS
(``ru_maxrss``) is recorded.

    python benchmarks/render_large.py                        # 52 x 50 tiles of 1024x768
    python benchmarks/render_large.py --grid 10 10 --write   # smaller; append to RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyvips

HERE = Path(__file__).resolve().parent
FORMATS = ("jpeg", "ome-tiff", "dzi", "ome-zarr")


def make_tiles(folder: Path, grid: tuple[int, int], tile_shape: tuple[int, int],
               overlap: float = 0.3, rotation_deg: float = 0.5, error_px: float = 2.0,
               seed: int = 0) -> dict:
    """Write the tiles (if ``folder`` does not hold them yet); return names and positions."""
    info_path = folder / "positions.json"
    want = {"grid": list(grid), "tile_shape": list(tile_shape), "overlap": overlap,
            "rotation_deg": rotation_deg, "error_px": error_px, "seed": seed}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["params"] == want:
            return info
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    from ofstitch.synthetic import sample_image_path

    rng = np.random.default_rng(seed)
    rows, cols = grid
    th, tw = tile_shape
    theta = math.radians(rotation_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    step = np.array([th * (1 - overlap), tw * (1 - overlap)])
    nominal = np.array([(r * step[0], c * step[1]) for r in range(rows) for c in range(cols)])
    truth = nominal @ rot.T + rng.normal(0, error_px, nominal.shape)
    truth -= truth.min(axis=0)
    need = truth.max(axis=0) + tile_shape + 2
    source = pyvips.Image.new_from_file(str(sample_image_path()))
    # Mirror the sample so that the repeated texture has no hard edges.
    source = source.join(source.fliphor(), "horizontal")
    source = source.join(source.flipver(), "vertical")
    texture = source.replicate(math.ceil(need[1] / source.width),
                               math.ceil(need[0] / source.height)).copy_memory()
    names = []
    for k, (y, x) in enumerate(np.round(truth).astype(int).tolist()):
        name = f"tile_{k:05d}.jpg"
        texture.crop(x, y, tw, th).jpegsave(str(folder / name), Q=85)
        names.append(name)
        if k % 200 == 0:
            print(f"  wrote {k + 1}/{len(truth)} tiles", file=sys.stderr)
    info = {"params": want, "names": names, "positions_px": np.round(truth).tolist()}
    info_path.write_text(json.dumps(info))
    return info


def child(folder: Path, fmt: str, out: Path) -> None:
    """Render and write one format; print a JSON line with the figures."""
    from ofstitch import formats, render
    from ofstitch.allocator import tune_malloc

    pyvips.cache_set_max(0)  # as the command line does
    tune_malloc()
    info = json.loads((folder / "positions.json").read_text())
    paths = [folder / n for n in info["names"]]
    positions = np.array(info["positions_px"], dtype=np.float64)
    shape = tuple(info["params"]["tile_shape"])
    start = time.perf_counter()
    mosaic = render.Mosaic(paths, positions, shape)
    height, width = mosaic.size
    target = out / f"mosaic{formats.SUFFIXES[fmt]}"
    if fmt == "jpeg":
        mosaic.write(lambda im: formats.write_jpeg(im, target, pixel_size_um=0.5))
    elif fmt == "ome-tiff":
        mosaic.write(lambda im: formats.write_ome_tiff(im, target, pixel_size_um=0.5))
    elif fmt == "dzi":
        mosaic.write(lambda im: formats.write_dzi(im, target, pixel_size_um=0.5))
    else:
        mosaic.write(lambda im: formats.write_ome_zarr(im, target, pixel_size_um=0.5))
    wall = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"format": fmt, "width": width, "height": height, "tiles": len(paths),
                      "wall_s": wall, "peak_rss_mb": rss_mb, "bytes": _size(target)}))


def _size(path: Path) -> int:
    if path.is_file():
        total = path.stat().st_size
    else:
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    files = path.parent / f"{path.with_suffix('').name}_files"
    if files.is_dir():
        total += sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, default=Path("/tmp/ofstitch-render-large"))
    parser.add_argument("--out", type=Path, default=None,
                        help="Where outputs go (deleted after each format). Default: a "
                        "folder beside --tiles.")
    parser.add_argument("--grid", type=int, nargs=2, default=(52, 50), metavar=("ROWS", "COLS"))
    parser.add_argument("--tile-shape", type=int, nargs=2, default=(768, 1024),
                        metavar=("H", "W"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--keep", action="store_true", help="Keep the outputs.")
    parser.add_argument("--write", action="store_true", help="Append to RESULTS.md.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return

    print(f"Tiles in {args.tiles} ...", file=sys.stderr)
    make_tiles(args.tiles, tuple(args.grid), tuple(args.tile_shape))
    out_root = args.out or args.tiles.with_name(args.tiles.name + "-out")
    rows = []
    for fmt in args.formats:
        out = out_root / fmt
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run([sys.executable, __file__, "--child", str(args.tiles), fmt,
                                 str(out)], capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"{fmt} failed:\n{result.stderr}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    table = _table(rows, args)
    print(table)
    if args.write:
        with open(HERE / "RESULTS.md", "a") as fh:
            fh.write("\n" + table)


def _table(rows: list[dict], args) -> str:
    r0 = rows[0]
    gp = r0["width"] * r0["height"] / 1e9
    head = (f"## render_large.py, {datetime.now():%Y-%m-%d %H:%M}\n\n"
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}. "
            f"{r0['tiles']} JPEG tiles of {args.tile_shape[1]}x{args.tile_shape[0]} px "
            f"({args.grid[0]}x{args.grid[1]}, 30% overlap, 0.5° rotation, 2 px position "
            f"error) into a {r0['width']}x{r0['height']} px mosaic ({gp:.2f} gigapixels), "
            "nearest-centre composition, one fresh process per format; peak RSS is the "
            "process's `ru_maxrss`.\n\n"
            "| format | wall s | Mpx/s | peak RSS MB | output MB |\n|---|---|---|---|---|\n")
    lines = [f"| {r['format']} | {r['wall_s']:.0f} | {gp * 1e3 / r['wall_s']:.0f} | "
             f"{r['peak_rss_mb']:.0f} | {r['bytes'] / 1e6:.0f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
