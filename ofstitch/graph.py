"""The overlap graph: which tiles to correlate with which.

Two tiles are a pair when the overlap of their stage-predicted footprints is
more than ``minimum_overlap`` of a tile's area. The scan must be connected by
pairs, or some tiles could not be placed relative to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import DisconnectedScanError


@dataclass(frozen=True)
class OverlapGraph:
    """Pairs of tiles whose footprints overlap.

    Attributes
    ----------
    pairs : ndarray, shape (m, 2), int64
        Tile indices ``(a, b)`` with ``a < b``, sorted row-major (by ``a``, then ``b``).
    overlap_fraction : ndarray, shape (m,), float64
        Predicted overlap area over tile area.
    n_tiles : int
    """

    pairs: np.ndarray
    overlap_fraction: np.ndarray
    n_tiles: int

    def __len__(self) -> int:
        return len(self.pairs)


def predicted_overlap(stage_px: np.ndarray, tile_shape: tuple[int, int], a: np.ndarray,
                      b: np.ndarray) -> np.ndarray:
    """Fractional overlap area of tiles ``a`` and ``b`` at their stage positions."""
    size = np.asarray(tile_shape, dtype=np.float64)
    extent = np.clip(size - np.abs(stage_px[b] - stage_px[a]), 0, None)
    return extent[:, 0] * extent[:, 1] / (size[0] * size[1])


def find_pairs(stage_px: np.ndarray, tile_shape: tuple[int, int], minimum_overlap: float
               ) -> OverlapGraph:
    """All pairs whose predicted overlap exceeds ``minimum_overlap``.

    Uses a grid of tile-sized cells, so the cost grows with the number of tiles,
    not its square.
    """
    n = len(stage_px)
    size = np.asarray(tile_shape, dtype=np.float64)
    cells = np.floor(stage_px / size).astype(np.int64)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (cy, cx) in enumerate(cells):
        buckets.setdefault((int(cy), int(cx)), []).append(i)
    a_list, b_list = [], []
    for (cy, cx), members in buckets.items():
        neighbours = [j for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      for j in buckets.get((cy + dy, cx + dx), ())]
        for i in members:
            for j in neighbours:
                if i < j:
                    a_list.append(i)
                    b_list.append(j)
    a = np.asarray(a_list, dtype=np.int64)
    b = np.asarray(b_list, dtype=np.int64)
    frac = predicted_overlap(stage_px, tile_shape, a, b) if len(a) else np.zeros(0)
    keep = frac > minimum_overlap
    pairs = np.stack([a[keep], b[keep]], axis=1) if keep.any() else np.zeros((0, 2), np.int64)
    frac = frac[keep]
    order = np.lexsort((pairs[:, 1], pairs[:, 0])) if len(pairs) else np.zeros(0, np.int64)
    return OverlapGraph(pairs=pairs[order], overlap_fraction=frac[order], n_tiles=n)


def components(n_tiles: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each tile."""
    if n_tiles == 0:
        return np.zeros(0, np.int64)
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else
                     ([], ([], [])), shape=(n_tiles, n_tiles))
    return connected_components(adj, directed=False)[1]


def require_connected(graph: OverlapGraph, names: list[str], minimum_overlap: float) -> None:
    """Raise :class:`DisconnectedScanError` listing the tiles cut off from the largest group."""
    if graph.n_tiles <= 1:
        return
    labels = components(graph.n_tiles, graph.pairs)
    counts = np.bincount(labels)
    if len(counts) == 1:
        return
    main = int(np.argmax(counts))
    lost = [names[i] for i in np.flatnonzero(labels != main)]
    shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
    raise DisconnectedScanError(
        f"{len(lost)} of {graph.n_tiles} tiles do not overlap the rest of the scan "
        f"(minimum overlap {minimum_overlap:g}): {shown}. Lower --minimum-overlap, check the "
        "stage positions and --csm-matrix, or remove those tiles")
