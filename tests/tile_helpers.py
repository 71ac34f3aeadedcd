"""Scans cut from a known field at exact positions (pixel and reader tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def cut_tiles(folder: Path, field: np.ndarray, *, tile: tuple[int, int],
              step: tuple[int, int], grid: tuple[int, int] = (3, 3),
              suffix: str = ".tif") -> tuple[list[Path], np.ndarray]:
    """TIFF tiles of ``field`` (height x width ``tile``, ``step`` apart) named ``t_X_Y``
    (their positions); returns their paths and ``(y, x)`` positions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, positions = [], []
    for r in range(grid[0]):
        for c in range(grid[1]):
            y, x = r * step[0], c * step[1]
            path = folder / f"t_{x}_{y}{suffix}"
            tifffile.imwrite(path, field[y:y + tile[0], x:x + tile[1]],
                             photometric="rgb" if field.ndim == 3 else "minisblack")
            paths.append(path)
            positions.append((y, x))
    return paths, np.array(positions, dtype=float)
