"""Fixtures for the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``).

The normal test run does not collect this folder (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ofstitch.backends import backend_of

SHARED_DATA = Path(os.environ.get("OFSTITCH_SHARED_DATA",
                                  Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
# Tile sizes (h, w) swept by the kernel benchmarks: a small test tile, an OpenFlexure
# v2 camera frame (832x624) and a v3 one (1640x1232).
TILE_SIZES = [(240, 320), (624, 832), (1232, 1640)]
TILE_IDS = [f"{w}x{h}" for h, w in TILE_SIZES]


@pytest.fixture(scope="session")
def numpy_backend():
    return backend_of(np.empty(0))


@pytest.fixture(scope="session")
def source_image() -> np.ndarray:
    """The real H&E image (shared copy, else the bundled one), mirrored out to 8000 px."""
    from ofstitch.synthetic import load_source

    shared = SHARED_DATA / "cmu1-he" / "CMU-1-Small-Region.jpg"
    src = load_source(shared if shared.is_file() else None)
    while min(src.shape[:2]) < 8000:
        src = np.pad(src, ((0, src.shape[0]), (0, src.shape[1]), (0, 0)), mode="symmetric")
    return src


@pytest.fixture(scope="session")
def scans(tmp_path_factory, source_image):
    """Factory of cached synthetic scans: ``scans(grid, tile_shape)`` -> SyntheticScan."""
    from ofstitch.synthetic import make_scan

    made = {}

    def get(grid: tuple[int, int], tile_shape: tuple[int, int]):
        key = (grid, tile_shape)
        if key not in made:
            folder = tmp_path_factory.mktemp("scan") / "tiles"
            made[key] = make_scan(folder, source=source_image, grid=grid,
                                  tile_shape=tile_shape, overlap=0.3, seed=3)
        return made[key]

    return get
