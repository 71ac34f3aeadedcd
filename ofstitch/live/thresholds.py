"""The reference placement's threshold search, kept off the live path when it is slow.

While a search takes longer than :data:`SYNC_SEARCH_S`, updates reuse the
thresholds of the last one (one sparse solve), and a fresh search runs in a
background thread whenever the pairs have grown by :data:`RESEARCH_GROWTH`.
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

from ofstitch.graph import OverlapGraph
from ofstitch.registration import Readings, Thresholds, place_readings
from ofstitch.scan import Scan
from ofstitch.settings import StitchSettings

log = logging.getLogger(__name__)

# Run the automatic threshold search on every update while it is this quick.
SYNC_SEARCH_S = 0.25
# Otherwise search again (in the background) once the pairs have grown by this factor.
RESEARCH_GROWTH = 1.2


class ThresholdSearch:
    """The last thresholds found, and a background search for newer ones."""

    def __init__(self, settings: StitchSettings) -> None:
        self.settings = settings
        self.thresholds: Thresholds | None = None
        self._pairs = 0  # pairs the last search saw
        self._seconds = 0.0  # how long it took
        self._future: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ofstitch-thresholds")

    def reuse(self, force: bool = False) -> Thresholds | None:
        """The thresholds to reuse instead of searching now (``None``: search now)."""
        self.collect()
        if force or self.thresholds is None or self._seconds <= SYNC_SEARCH_S:
            return None
        return self.thresholds

    def searched(self, thresholds: Thresholds | None, n_pairs: int, seconds: float) -> None:
        """A search ran in the foreground on ``n_pairs`` pairs."""
        if thresholds is not None:
            self.thresholds, self._pairs, self._seconds = thresholds, n_pairs, seconds

    def start_if_grown(self, scan: Scan, graph: OverlapGraph, readings: Readings) -> None:
        """Search again in the background if the pairs have grown enough since the last."""
        if self._future is not None or len(graph.pairs) < RESEARCH_GROWTH * self._pairs:
            return

        def search() -> tuple[Thresholds | None, int, float]:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the foreground reports the same things
                placed = place_readings(scan, graph, readings, self.settings)
            return placed.thresholds, len(graph.pairs), time.perf_counter() - t0

        try:
            self._future = self._pool.submit(search)
        except RuntimeError:  # closed: finish() runs the full search
            self._future = None

    def collect(self, wait: bool = False) -> None:
        """Take the result of a finished background search (``wait``: wait for it)."""
        if self._future is None or not (wait or self._future.done()):
            return
        try:
            self.searched(*self._future.result())
        except Exception as exc:  # keep the old thresholds; a full search runs at finish
            log.warning("background threshold search failed: %s", exc)
        self._future = None

    def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
        self._pool.shutdown(wait=True)
        self._future = None
