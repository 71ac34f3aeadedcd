"""The constrained local search's pass over a first placement (robust placement).

:func:`local_search` picks what :func:`ofstitch.local_search.search_pairs` measures again
at full resolution: the pairs a first placement did not locate, those whose overlaps are
small, and a sample of the chance-level pairs (for the chance level), each around the
stage model's prediction within its repeatability window. Results come from the
correlation cache where it holds them for the same windows (:meth:`ofstitch.cache.
CorrelationCache.lookup_local`); the others are searched and added to it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .backends import Backend
from .cache import CorrelationCache
from .graph import OverlapGraph, canonical_flip
from .local_search import LocalReadings, search_pairs
from .place import Placement
from .robust import MIN_RESEARCH_RADIUS_PX, RESEARCH_SIGMAS
from .scan import Scan, expected_shifts
from .settings import CorrelationSettings

if TYPE_CHECKING:
    from .registration import PairPlan

log = logging.getLogger(__name__)

# The local search also measures again located pairs whose predicted overlap is at most this
# many pixels across: binned 2x2, their candidates' scores cannot place them to a pixel.
SMALL_OVERLAP_PX = 96
# The local search's chance level is learnt from at most this many chance-level pairs (each
# costs a full-resolution correlation; the Gumbel fit needs only a median and quartiles).
LOCAL_NULL_PAIRS = 30


class LocalSearch(NamedTuple):
    """The constrained local search of the pairs a first placement did not locate."""

    pairs: LocalReadings  # of the graph's pairs (NaN: not searched)
    chance: LocalReadings  # the chance-level pairs, searched the same way


def local_search(scan: Scan, graph: OverlapGraph, placement: Placement | None, plan: PairPlan,
                 use_null: np.ndarray, backend: Backend, *,
                 cache: CorrelationCache | None = None,
                 correlation: CorrelationSettings | None = None) -> LocalSearch | None:
    """Search, at full resolution, every pair of ``graph`` that ``placement`` did not locate
    (and the chance-level pairs, for their chance level) around the stage model's
    prediction, within its repeatability window (:func:`ofstitch.local_search.search_pairs`).
    ``None`` when there is nothing to search (every pair located, several groups).
    With ``cache`` (and ``correlation``, the settings its entries are kept under), results
    it holds for the same windows are reused, and the others are added to it."""
    if placement is None or placement.located is None:
        return None
    expected = expected_shifts(scan, graph.pairs)
    side = np.min(np.asarray(scan.tile_shape) - np.abs(expected), axis=1)
    todo = np.flatnonzero(~placement.located | (side <= SMALL_OVERLAP_PX))
    if not len(todo):
        return None
    sigma = placement.stage_sigma_px
    radius = float(np.clip(RESEARCH_SIGMAS * sigma, MIN_RESEARCH_RADIUS_PX,
                           max(placement.gate_px, MIN_RESEARCH_RADIUS_PX)))
    null, null_expected = plan.null_pairs[use_null], plan.null_expected[use_null]
    if len(null) > LOCAL_NULL_PAIRS:  # evenly spread over them (they are in stage order)
        keep = np.unique(np.linspace(0, len(null) - 1, LOCAL_NULL_PAIRS).round().astype(int))
        null, null_expected = null[keep], null_expected[keep]
    # Around the stage model's prediction, backlash included where it was fitted; a pair
    # it moves is also searched where the stage alone predicts it (the term comes from a
    # first placement: a wrong or, for one tile, misleading term must cost no reading).
    offset = np.zeros((len(todo), 2)) if placement.stage_offset_px is None else \
        placement.stage_offset_px[graph.pairs[todo, 1]] - \
        placement.stage_offset_px[graph.pairs[todo, 0]]
    moved = np.flatnonzero(np.linalg.norm(offset, axis=1) > 0.5)
    plain = expected[todo] @ placement.affine
    pairs = np.concatenate([graph.pairs[todo], graph.pairs[todo[moved]], null])
    centre = np.concatenate([plain + offset, plain[moved], null_expected @ placement.affine])
    # From the tile with the smaller stage position, as correlate() does: the same
    # arithmetic whatever the file order.
    flip = canonical_flip(scan.stage_px, pairs)
    pairs = np.where(flip[:, None], pairs[:, ::-1], pairs)
    centre = np.where(flip[:, None], -centre, centre)
    found = _search_cached(scan, pairs, centre, radius, backend, cache, correlation)
    found.shift_px[flip] *= -1
    out = LocalReadings.empty(len(graph.pairs))
    out.put(todo, found.take(np.arange(len(todo))))
    if len(moved):  # the better of the two: located first, then the higher score
        first, second = found.take(moved), found.take(len(todo) + np.arange(len(moved)))
        better = (second.located & ~first.located) | (
            (second.located == first.located) &
            (np.nan_to_num(second.score, nan=-np.inf) > np.nan_to_num(first.score, nan=-np.inf)))
        out.put(todo[moved[better]], second.take(np.flatnonzero(better)))
    log.info("local search: %d pairs (%d also without the backlash term) and %d chance-level "
             "pairs within %.1f px", len(todo), len(moved), len(null), radius)
    return LocalSearch(out, found.take(np.arange(len(todo) + len(moved), len(pairs))))


def _search_cached(scan: Scan, pairs: np.ndarray, centre: np.ndarray, radius: float,
                   backend: Backend, cache: CorrelationCache | None,
                   settings: CorrelationSettings | None) -> LocalReadings:
    """:func:`ofstitch.local_search.search_pairs`, through the cache (when given)."""
    if cache is None or settings is None:
        return search_pairs(scan.paths, pairs, centre, radius, scan.tile_shape, backend)
    keys = [f.key for f in scan.files]
    hit, found = cache.lookup_local(settings, keys, pairs, centre, radius)
    todo = np.flatnonzero(~hit)
    if len(todo):
        new = search_pairs(scan.paths, pairs[todo], centre[todo], radius, scan.tile_shape,
                           backend)
        found.put(todo, new)
        cache.add_local(settings, keys, pairs[todo], centre[todo], radius, new)
        if np.isfinite(new.score).any():
            cache.save()
    return found
