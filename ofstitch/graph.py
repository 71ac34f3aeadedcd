"""The overlap graph: which tiles to correlate with which.

Two tiles are a pair when the overlap of their stage-predicted footprints is
more than ``minimum_overlap`` of a tile's area. The scan must be connected by
pairs, or some tiles could not be placed relative to the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from .errors import DisconnectedScanError

DEFAULT_MINIMUM_OVERLAP = 0.2  # the reference's; lowered for scans that overlap less
LOWEST_ADAPTED_OVERLAP = 0.02  # the default never adapts below this


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
    minimum_overlap : float
        The threshold the pairs were chosen with.
    nominal_overlap : float or None
        The scan's overlap between neighbours, from the positions: the median over
        tiles of each tile's largest predicted overlap (``None`` for a single tile).
    connecting_overlap : float or None
        The largest threshold below which the pairs connect every tile (the smallest
        overlap on the path of largest overlaps), or ``None`` when no threshold does.
    """

    pairs: np.ndarray
    overlap_fraction: np.ndarray
    n_tiles: int
    minimum_overlap: float = DEFAULT_MINIMUM_OVERLAP
    nominal_overlap: float | None = None
    connecting_overlap: float | None = None

    def __len__(self) -> int:
        return len(self.pairs)


def predicted_overlap(stage_px: np.ndarray, tile_shape: tuple[int, int], a: np.ndarray,
                      b: np.ndarray) -> np.ndarray:
    """Fractional overlap area of tiles ``a`` and ``b`` at their stage positions."""
    size = np.asarray(tile_shape, dtype=np.float64)
    extent = np.clip(size - np.abs(stage_px[b] - stage_px[a]), 0, None)
    return extent[:, 0] * extent[:, 1] / (size[0] * size[1])


def _candidates(stage_px: np.ndarray, tile_shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of tiles in neighbouring tile-sized cells, and its predicted overlap.

    Uses a grid of tile-sized cells, so the cost grows with the number of tiles,
    not its square.
    """
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
    return a, b, frac


def nominal_overlap(n_tiles: int, a: np.ndarray, b: np.ndarray, frac: np.ndarray
                    ) -> float | None:
    """The median over tiles of each tile's largest overlap (``None`` for one tile)."""
    if n_tiles < 2:
        return None
    best = np.zeros(n_tiles)
    np.maximum.at(best, a, frac)
    np.maximum.at(best, b, frac)
    return float(np.median(best))


def connecting_overlap(n_tiles: int, a: np.ndarray, b: np.ndarray, frac: np.ndarray
                       ) -> float | None:
    """The largest threshold that still connects all tiles, or ``None`` if none does.

    It is the smallest overlap on the maximum spanning tree of the overlap graph.
    """
    if n_tiles < 2:
        return None
    keep = frac > 0
    a, b, frac = a[keep], b[keep], frac[keep]
    if len(np.unique(components(n_tiles, np.stack([a, b], axis=1)))) > 1:
        return None
    weights = coo_matrix((2.0 - frac, (a, b)), shape=(n_tiles, n_tiles)).tocsr()
    tree = minimum_spanning_tree(weights).tocoo()
    return float(2.0 - tree.data.max()) if tree.nnz else None


def find_pairs(stage_px: np.ndarray, tile_shape: tuple[int, int],
               minimum_overlap: float | None = None) -> OverlapGraph:
    """All pairs whose predicted overlap exceeds ``minimum_overlap``.

    ``None`` (the default) adapts to the scan: :data:`DEFAULT_MINIMUM_OVERLAP` when
    the scan is connected by it, else half the scan's nominal overlap (a 10%-overlap
    grid is correlated at 0.05), down to :data:`LOWEST_ADAPTED_OVERLAP`.
    """
    n = len(stage_px)
    a, b, frac = _candidates(stage_px, tile_shape)
    nominal = nominal_overlap(n, a, b, frac)
    connecting = connecting_overlap(n, a, b, frac)
    if minimum_overlap is None:
        minimum_overlap = DEFAULT_MINIMUM_OVERLAP
        unconnected = connecting is None or connecting <= DEFAULT_MINIMUM_OVERLAP
        if unconnected and nominal is not None and nominal / 2 >= LOWEST_ADAPTED_OVERLAP:
            minimum_overlap = round(min(DEFAULT_MINIMUM_OVERLAP, nominal / 2), 3)
    keep = frac > minimum_overlap
    pairs = np.stack([a[keep], b[keep]], axis=1) if keep.any() else np.zeros((0, 2), np.int64)
    frac = frac[keep]
    order = np.lexsort((pairs[:, 1], pairs[:, 0])) if len(pairs) else np.zeros(0, np.int64)
    return OverlapGraph(pairs=pairs[order], overlap_fraction=frac[order], n_tiles=n,
                        minimum_overlap=float(minimum_overlap), nominal_overlap=nominal,
                        connecting_overlap=connecting)


def components(n_tiles: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each tile."""
    if n_tiles == 0:
        return np.zeros(0, np.int64)
    adj = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else
                     ([], ([], [])), shape=(n_tiles, n_tiles))
    return connected_components(adj, directed=False)[1]


def require_connected(graph: OverlapGraph, names: list[str],
                      minimum_overlap: float | None = None) -> None:
    """Raise :class:`DisconnectedScanError` listing the tiles cut off from the largest group.

    The message gives the scan's nominal overlap, measured from the positions, and
    the ``--minimum-overlap`` that would connect it, if one would.
    """
    if graph.n_tiles <= 1:
        return
    labels = components(graph.n_tiles, graph.pairs)
    counts = np.bincount(labels)
    if len(counts) == 1:
        return
    main = int(np.argmax(counts))
    lost = [names[i] for i in np.flatnonzero(labels != main)]
    shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
    threshold = graph.minimum_overlap if minimum_overlap is None else minimum_overlap
    measured = "" if graph.nominal_overlap is None else \
        f"; neighbouring tiles overlap by {graph.nominal_overlap:.3g} at their positions"
    if graph.connecting_overlap is not None and graph.connecting_overlap > 0.001:
        suggestion = max(0.001, math.floor(graph.connecting_overlap * 900) / 1000)
        advice = (f"--minimum-overlap {suggestion:g} would connect them (a smaller value "
                  "correlates more, less reliable pairs); or check the stage positions and "
                  "--csm-matrix, or remove those tiles")
    else:
        advice = ("no --minimum-overlap connects them: check the stage positions and "
                  "--csm-matrix, or remove those tiles")
    raise DisconnectedScanError(
        f"{len(lost)} of {graph.n_tiles} tiles do not overlap the rest of the scan "
        f"(minimum overlap {threshold:g}{measured}): {shown}. {advice}")


# The chance level is fitted from a median and quartiles (significance.chance_threshold),
# which a few dozen samples pin down: a fixed sample, not a fraction of the scan (each
# null pair costs as much as a real one).
MAX_NULL_PAIRS = 48


def null_pairs(stage_px: np.ndarray, tile_shape: tuple[int, int], pairs: np.ndarray,
               max_pairs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of tiles that do not overlap, to learn what a chance match looks like.

    For a pair ``(a, b)`` with stage shift ``e``, the null partner of ``a`` is the
    tile nearest to ``a + j e`` for the smallest ``j >= 2`` at which it no longer
    overlaps ``a``: a tile of the same scan, with the same content statistics, that
    is searched as if it sat where ``b`` does (around ``e``). Up to ``max_pairs``
    (default: a fifth of the pairs, at least 30 where the scan has them, at most
    :data:`MAX_NULL_PAIRS`), spread evenly over ``pairs`` in stage order. The choice does
    not depend on the tiles' numbering, so the result does not depend on the file order.

    Returns
    -------
    null : ndarray, shape (q, 2), int
        ``(a, c)`` tile pairs.
    searched_shift : ndarray, shape (q, 2)
        The stage shift each is searched around (that of the pair it imitates).
    """
    from scipy.spatial import cKDTree

    empty = np.zeros((0, 2), np.int64), np.zeros((0, 2))
    if len(pairs) == 0 or len(stage_px) < 3:
        return empty
    if max_pairs is None:
        max_pairs = min(MAX_NULL_PAIRS, max(30, len(pairs) // 5))
    h, w = tile_shape
    tree = cKDTree(stage_px / np.array([h, w]))
    known = {(int(a), int(b)) for a, b in pairs} | {(int(b), int(a)) for a, b in pairs}
    # The same chance-level pairs whatever the tile numbering (capture order, file
    # order): pairs are taken in the order of their tiles' stage positions, each from
    # its tile with the smaller position (row, then column), and ties between equally
    # near partners go to the smaller position too.
    rank = stage_order(stage_px)
    oriented = np.where((rank[pairs[:, 0]] <= rank[pairs[:, 1]])[:, None], pairs,
                        pairs[:, ::-1])
    oriented = oriented[np.lexsort((rank[oriented[:, 1]], rank[oriented[:, 0]]))]
    null, shifts, seen = [], [], set()
    for a, b in oriented.tolist():
        e = stage_px[b] - stage_px[a]
        for j in range(2, 6):
            if abs(j * e[0]) >= h or abs(j * e[1]) >= w:
                break
        else:
            continue
        target = (stage_px[a] + j * e) / np.array([h, w])
        near = tree.query_ball_point(target, 0.25)
        if not near:
            continue
        dist = np.linalg.norm(stage_px[near] / np.array([h, w]) - target, axis=1)
        c = int(min(zip(np.round(dist, 9).tolist(), rank[near].tolist(), near,
                        strict=True))[2])
        if c in (a, b) or (a, c) in known or (min(a, c), max(a, c)) in seen:
            continue
        gap = np.abs(stage_px[c] - stage_px[a])
        if gap[0] < h and gap[1] < w:
            continue  # it still overlaps a
        seen.add((min(a, c), max(a, c)))
        null.append((a, c))
        shifts.append(e)
    if not null:
        return empty
    null_arr, shift_arr = np.asarray(null, np.int64), np.asarray(shifts, np.float64)
    if len(null_arr) > max_pairs:
        pick = np.unique(np.round(np.linspace(0, len(null_arr) - 1, max_pairs)).astype(int))
        null_arr, shift_arr = null_arr[pick], shift_arr[pick]
    return null_arr, shift_arr


def stage_order(stage_px: np.ndarray) -> np.ndarray:
    """Rank of each tile by stage position (row, then column): an order of the tiles that
    does not depend on their numbering."""
    rank = np.empty(len(stage_px), np.int64)
    rank[np.lexsort((stage_px[:, 1], stage_px[:, 0]))] = np.arange(len(stage_px))
    return rank


def canonical_flip(stage_px: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Which pairs to correlate the other way round, so that every pair is correlated from
    its tile with the smaller stage position: the same arrays in the same order whatever
    the file order, so the same floating-point results (a correlation and its mirror agree
    only to rounding, and rounding can tip a choice between two near-equal peaks)."""
    if len(pairs) == 0:
        return np.zeros(0, bool)
    rank = stage_order(stage_px)
    return rank[pairs[:, 0]] > rank[pairs[:, 1]]


def interleave(pairs: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """An order of ``pairs`` then ``extra`` (indices into their concatenation) in which
    each extra pair comes right after the first real pair by which both its tiles are
    in use, so streaming keeps no tile alive longer for it than it must."""
    first: dict[int, int] = {}
    for k, (a, b) in enumerate(pairs.tolist()):
        first.setdefault(a, k)
        first.setdefault(b, k)
    slots: dict[int, list[int]] = {}
    last = len(pairs) - 1
    for i, (a, c) in enumerate(extra.tolist()):
        slot = max(first.get(a, last), first.get(c, last))
        slots.setdefault(slot, []).append(len(pairs) + i)
    order = []
    for k in range(len(pairs)):
        order.append(k)
        order.extend(slots.get(k, []))
    return np.asarray(order, dtype=np.int64)
