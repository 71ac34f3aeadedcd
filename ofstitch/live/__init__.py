"""Live stitching: a preview that follows a scan while it is being captured.

:class:`LiveStitcher` takes tiles one at a time (:meth:`LiveStitcher.add`):

1. it checks that the file is complete: older than the settle time, a JPEG
   that ends with its end-of-image marker (a PNG with its ``IEND`` chunk), a
   header that reads, and pixels that decode;
2. it correlates only the new tile's pairs, found from the stage positions,
   through the correlation cache (keyed as in a batch run, so a later
   ``ofstitch FOLDER`` reuses them);
3. it places every tile again. Tiles that do not yet overlap the rest (a
   graph with several components) are placed component by component, each
   component where its stage positions put it;
4. it decodes the new tile once, shrunk on load, into an in-memory cache of
   small tiles from which :meth:`LiveStitcher.preview` composes the mosaic.

Placement is the batch run's call on the same pairs. Robust placement (the
default) also correlates null pairs (tiles that do not overlap) to learn the
chance score; :meth:`LiveStitcher.add` uses those already in the cache and
leaves the new ones to :meth:`LiveStitcher.refine`, which ``ofstitch watch``
runs a few pairs at a time between tiles, and in full when it stops. The
reference placement's threshold search is slow on large scans: while it takes
longer than :data:`SYNC_SEARCH_S`, updates reuse the thresholds of the last
search (one sparse solve), a fresh search runs in a background thread whenever
the pairs have grown by :data:`RESEARCH_GROWTH`, and :meth:`LiveStitcher.refine`
runs it at once. Once refined (:attr:`LiveStitcher.exact`), the positions are
those of ``ofstitch.register`` on the same tiles; :meth:`LiveStitcher.finish` is
a batch run on the folder, every pair coming from the cache.

The package is split by concern: :mod:`.arrivals` (when a file is complete),
:mod:`.stitcher` (state and immutable snapshots, over the registration core of
:mod:`ofstitch.registration`), :mod:`.thresholds` (the reference placement's
background search), :mod:`.watcher` (the folder loop); previews are drawn by
:mod:`ofstitch.preview`, as a batch run draws ``preview.jpg``.

Thread safety: one writer (``add``, ``refine``, ``finish``) and any number of
readers (``positions``, ``preview``, ``snapshot``). Each update publishes an
immutable :class:`LiveSnapshot` under a lock, so a reader always sees one
consistent state.

:func:`watch` runs a :class:`LiveStitcher` on a folder with the ``watchdog``
file-system events (``ofstitch watch FOLDER``).
"""

from ofstitch.preview import compose, scan_width, shrink_for

from .arrivals import DEFAULT_SETTLE_TIME_S, AddStatus, looks_complete
from .stitcher import LiveSnapshot, LiveStitcher, LiveUpdate
from .thresholds import RESEARCH_GROWTH, SYNC_SEARCH_S
from .watcher import (
    LIVE_DZI_NAME,
    NULL_PAIRS_PER_REFINE,
    PREVIEW_NAME,
    TILE_CONFIGURATION_NAME,
    WatchResult,
    watch,
)

__all__ = [
    "DEFAULT_SETTLE_TIME_S",
    "LIVE_DZI_NAME",
    "NULL_PAIRS_PER_REFINE",
    "PREVIEW_NAME",
    "RESEARCH_GROWTH",
    "SYNC_SEARCH_S",
    "TILE_CONFIGURATION_NAME",
    "AddStatus",
    "LiveSnapshot",
    "LiveStitcher",
    "LiveUpdate",
    "WatchResult",
    "compose",
    "looks_complete",
    "scan_width",
    "shrink_for",
    "watch",
]
