"""Pairwise registration of a MIST-sized scan: time, peak device memory, accuracy.

The scan is the size of MIST's reference grid: 42 x 59 = 2,478 tiles of 1392 x 1040 px
with 10% overlap (MIST's pipelined GPU registration of that grid took 49.7 s). Tiles
are cut from a periodic band-limited texture (made by an inverse FFT of random phases,
so it tiles seamlessly and needs no source image larger than the machine has), written
as JPEG with a Fiji ``TileConfiguration.txt`` of stage positions (the truth plus
Gaussian stage error), then registered by ``ofstitch.register`` on the chosen device.

Usage::

    python benchmarks/gpu_registration.py --device cuda --out benchmarks/results/gpu.json
    python benchmarks/gpu_registration.py --rows 4 --cols 5 --device cpu   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyvips

import ofstitch
from ofstitch.settings import StitchSettings
from ofstitch.synthetic import pair_errors

PERIOD = 4096  # the texture repeats every PERIOD px, far more than a tile


def periodic_texture(seed: int = 0, period: int = PERIOD) -> np.ndarray:
    """uint8 texture, periodic in both axes, with detail at 2-40 px scales."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(period)[:, None]
    fx = np.fft.rfftfreq(period)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    amplitude = np.where((f > 1 / 40) & (f < 1 / 2), 1 / np.maximum(f, 1e-6), 0.0)
    phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
    tex = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(period, period)).astype(np.float32)
    tex = (tex - tex.mean()) / tex.std()
    return np.clip(128 + 40 * tex, 0, 255).astype(np.uint8)


def cut(texture: np.ndarray, top_left: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """A tile at ``top_left`` of the infinitely repeated texture."""
    rows = (top_left[0] + np.arange(shape[0])) % texture.shape[0]
    cols = (top_left[1] + np.arange(shape[1])) % texture.shape[1]
    return texture[np.ix_(rows, cols)]


def make_grid(folder: Path, rows: int, cols: int, tile_shape: tuple[int, int], overlap: float,
              stage_error_px: float, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Write the scan; returns the tile names and their true top-left positions."""
    folder.mkdir(parents=True, exist_ok=True)
    texture = periodic_texture(seed)
    rng = np.random.default_rng(seed + 1)
    step = (round(tile_shape[0] * (1 - overlap)), round(tile_shape[1] * (1 - overlap)))
    truth = np.array([(r * step[0], c * step[1]) for r in range(rows) for c in range(cols)],
                     dtype=np.float64)
    truth += rng.integers(-3, 4, truth.shape)  # the stage's real landing spots (whole px)
    stage = truth + rng.normal(0, stage_error_px, truth.shape)
    names = [f"tile_{k:05d}.jpg" for k in range(len(truth))]

    def write(k: int) -> None:
        tile = cut(texture, (int(truth[k, 0]), int(truth[k, 1])), tile_shape)
        pyvips.Image.new_from_array(tile).jpegsave(str(folder / names[k]), Q=90)

    with ThreadPoolExecutor() as pool:
        list(pool.map(write, range(len(names))))
    lines = ["dim = 2"] + [f"{n}; ; ({x:.2f}, {y:.2f})" for n, (y, x)
                           in zip(names, stage, strict=True)]
    (folder / "TileConfiguration.txt").write_text("\n".join(lines) + "\n")
    return names, truth


def peak_device_bytes(device: str) -> int | None:
    if device == "cpu":
        return None
    import cupy

    return int(cupy.get_default_memory_pool().total_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=42)
    parser.add_argument("--cols", type=int, default=59)
    parser.add_argument("--tile", default="1040x1392", help="HEIGHTxWIDTH")
    parser.add_argument("--overlap", type=float, default=0.1)
    parser.add_argument("--stage-error", type=float, default=5.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/mist-grid"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tile_shape = tuple(int(v) for v in args.tile.lower().split("x"))

    t0 = time.perf_counter()
    names, truth = make_grid(args.work, args.rows, args.cols, tile_shape, args.overlap,
                             args.stage_error)
    generate_s = time.perf_counter() - t0
    settings = StitchSettings(device=args.device, minimum_overlap=0.05)
    t1 = time.perf_counter()
    reg = ofstitch.register(args.work, settings, use_cache=False)
    register_s = time.perf_counter() - t1
    order = [names.index(n) for n in reg.names]
    errors = pair_errors(reg.positions_px, truth[order], reg.graph.pairs)
    result = {
        "device": reg.device, "tiles": len(reg.names), "pairs": int(len(reg.graph.pairs)),
        "tile_shape": list(tile_shape), "overlap": args.overlap,
        "generate_s": round(generate_s, 2), "register_s": round(register_s, 2),
        "timings_s": {k: round(v, 2) for k, v in reg.timings_s.items()},
        "peak_device_pool_bytes": peak_device_bytes(args.device),
        "pair_error_px": {"max": float(errors.max()), "rms": float(np.sqrt(np.mean(errors**2))),
                          "over_2px": int((errors > 2).sum())},
        "anchor": "MIST pipelined GPU registration of this grid: 49.7 s",
        "python": platform.python_version(), "ofstitch": ofstitch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
