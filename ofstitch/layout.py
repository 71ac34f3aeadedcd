"""Tile layouts that do not come from the tiles' metadata: Fiji layout files and grids.

- A Fiji layout file (``TileConfiguration.txt``, or the
  ``TileConfiguration.registered.txt`` Fiji's stitching writes) lists each
  tile's top-left corner in pixels. Only 2D layouts (``dim = 2``) are read.
- A grid (``--grid ROWSxCOLS``), as in Fiji's Grid/Collection stitching, places
  the tiles, in natural file-name order (``2.tif`` before ``10.tif``), on a
  regular grid: row by row, column by column, or snaking along rows or columns,
  one tile step (the tile size less the nominal overlap) apart.
- :func:`index_like` tells file-name "positions" that are grid indices or
  sequence numbers (``img_7_21.jpeg``) from pixel positions, so that they stop
  with a clear error instead of piling every tile up in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MetadataError, OfstitchError

# Fiji layout files read from the scan folder, in this order: the nominal layout
# first (ofstitch registers the tiles itself), Fiji's registered one otherwise.
# Not OFMTileConfiguration.txt: that is an output (optimised positions) and must not feed back.
LAYOUT_NAMES = ("TileConfiguration.txt", "tile_config.txt", "TileConfiguration.registered.txt",
                "tile_config.registered.txt")
GRID_ORDERS = ("row", "column", "snake-row", "snake-column")
DEFAULT_GRID_OVERLAP = 0.2  # Fiji's Grid/Collection default

_LINE = re.compile(
    r"^\s*([^;#]+?)\s*;\s*[^;]*;\s*\(\s*([^,]+?)\s*,\s*([^,)]+?)\s*(?:,\s*([^)]*?)\s*)?\)")
_DIM = re.compile(r"^\s*dim\s*=\s*(\d+)", re.IGNORECASE)


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def read_layout(path: Path, *, refuse_3d: bool = True) -> dict[str, tuple[float, float]]:
    """Positions ``{file name: (x, y)}`` (pixels, top-left) from a Fiji layout file.

    Lines that cannot be read are left out; an unreadable file gives ``{}``.

    Raises
    ------
    MetadataError
        With ``refuse_3d``, a 3D layout (``dim = 3``): ofstitch stitches 2D tiles.
    """
    path = Path(path)
    out: dict[str, tuple[float, float]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        dim = _DIM.match(line)
        if refuse_3d and dim and int(dim.group(1)) != 2:
            raise MetadataError(
                f"{path.name} is a {dim.group(1)}D layout (dim = {dim.group(1)}): ofstitch "
                "stitches 2D tiles; give a 2D layout (dim = 2, positions (x, y)), or stitch "
                "3D stacks with Fiji's 3D stitching")
        match = _LINE.match(line)
        if match:
            x, y = _number(match.group(2)), _number(match.group(3))
            if x is not None and y is not None:
                out[match.group(1)] = (x, y)
    return out


def layout_beside(folder: Path) -> dict[str, tuple[float, float]]:
    """Positions from the first Fiji layout file of :data:`LAYOUT_NAMES` in ``folder``."""
    for name in LAYOUT_NAMES:
        if (Path(folder) / name).is_file():
            layout = read_layout(Path(folder) / name)
            if layout:
                return layout
    return {}


def read_layout_option(path: Path) -> dict[str, tuple[float, float]]:
    """``--layout FILE``: like :func:`read_layout`, but a missing or empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise OfstitchError(f"--layout {path}: no such file")
    layout = read_layout(path)
    if not layout:
        raise MetadataError(
            f"--layout {path}: no tile positions in it (expected Fiji's "
            "'name.tif; ; (x, y)' lines)")
    return layout


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in names by value: ``2.tif`` before ``10.tif``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Grid:
    """A regular grid of ``rows`` x ``cols`` tiles, filled in ``order``.

    ``overlap`` is the nominal overlap of neighbouring tiles, a fraction of the
    tile size in each direction.
    """

    rows: int
    cols: int
    order: str = "row"
    overlap: float = DEFAULT_GRID_OVERLAP

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise OfstitchError(f"--grid must have at least one row and one column, got "
                                f"{self.rows}x{self.cols}")
        if self.order not in GRID_ORDERS:
            raise OfstitchError(f"--grid-order must be one of {', '.join(GRID_ORDERS)}, got "
                                f"{self.order!r}")
        if not (0 <= self.overlap < 1):
            raise OfstitchError(f"--grid-overlap must be in [0, 1), got {self.overlap}")

    @classmethod
    def parse(cls, text: str, order: str = "row", overlap: float | None = None) -> Grid:
        """``--grid ROWSxCOLS`` (``3x4``, ``3X4``, ``3*4``)."""
        match = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", str(text))
        if match is None:
            raise OfstitchError(f"--grid must be ROWSxCOLS such as 3x4, got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)), str(order).lower(),
                   DEFAULT_GRID_OVERLAP if overlap is None else float(overlap))

    def cell(self, k: int) -> tuple[int, int]:
        """``(row, col)`` of the ``k``-th tile."""
        if self.order in ("row", "snake-row"):
            row, col = divmod(k, self.cols)
            if self.order == "snake-row" and row % 2:
                col = self.cols - 1 - col
        else:
            col, row = divmod(k, self.rows)
            if self.order == "snake-column" and col % 2:
                row = self.rows - 1 - row
        return row, col

    def positions(self, names: list[str], tile_shape: tuple[int, int]
                  ) -> dict[str, tuple[float, float]]:
        """``{file name: (x, y)}`` in pixels for ``names``, placed in natural name order."""
        if len(names) > self.rows * self.cols:
            raise OfstitchError(
                f"--grid {self.rows}x{self.cols} has {self.rows * self.cols} places but the "
                f"folder has {len(names)} tiles: give the grid's size as ROWSxCOLS")
        h, w = tile_shape
        step_y, step_x = h * (1 - self.overlap), w * (1 - self.overlap)
        out = {}
        for k, name in enumerate(sorted(names, key=natural_key)):
            row, col = self.cell(k)
            out[name] = (col * step_x, row * step_y)
        return out


INDEX_SPREAD = 0.05  # tiles this close (a fraction of the tile size) are not a scan


def index_like(xy: np.ndarray, tile_shape: tuple[int, int]) -> str | None:
    """Why file-name positions ``xy`` (n, 2) look like grid indices, or ``None``.

    They do when the tiles are not all at one place (a z-stack) and either all lie
    within :data:`INDEX_SPREAD` of a tile of each other, or are small consecutive
    integers (steps of 1 px) within half a tile.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2 or len(np.unique(xy, axis=0)) < 2:
        return None
    h, w = tile_shape
    extent = xy.max(axis=0) - xy.min(axis=0)
    within = f"{extent[0]:g} x {extent[1]:g} px"
    if extent[0] <= INDEX_SPREAD * w and extent[1] <= INDEX_SPREAD * h:
        return f"all {len(xy)} tiles would lie within {within} of each other"
    integers = np.all(xy == np.round(xy))
    steps = [np.diff(np.unique(xy[:, k])) for k in (0, 1)]
    unit = all(len(s) == 0 or np.all(s == 1) for s in steps)
    if integers and unit and extent[0] < w / 2 and extent[1] < h / 2:
        return (f"they are consecutive small numbers, so all {len(xy)} tiles would lie "
                f"within {within} of each other")
    return None


def grid_from_options(grid: str | None, order: str | None, overlap: float | None
                      ) -> Grid | None:
    """The :class:`Grid` of ``--grid``, ``--grid-order`` and ``--grid-overlap``, if any."""
    if grid is None:
        if order is not None or overlap is not None:
            given = "--grid-order" if order is not None else "--grid-overlap"
            raise OfstitchError(f"{given} needs --grid ROWSxCOLS")
        return None
    return Grid.parse(grid, order or "row", overlap)
