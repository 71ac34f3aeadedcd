"""Watching a folder: a :class:`LiveStitcher` fed by file-system events (``ofstitch watch``)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ofstitch import formats, pipeline
from ofstitch.errors import OfstitchError, OfstitchWarning
from ofstitch.registration import Progress, Registration, no_progress
from ofstitch.scan import find_image_files, is_tile_name, require_folder
from ofstitch.settings import StitchSettings, WatchSettings

from .arrivals import AddStatus
from .stitcher import LiveStitcher, LiveUpdate

PREVIEW_NAME = "preview.jpg"
LIVE_DZI_NAME = "preview.dzi"
TILE_CONFIGURATION_NAME = "OFMTileConfiguration.txt"  # the live positions (Fiji format)
NULL_PAIRS_PER_REFINE = 4  # null pairs ``watch`` correlates between two looks at the folder


class _Events:
    """A watchdog handler that queues ``(changed, path)``: ``True`` for created, modified
    and moved-in files, ``False`` for deleted and moved-away ones."""

    def __init__(self) -> None:
        from watchdog.events import FileSystemEventHandler

        self.queue: queue.SimpleQueue[tuple[bool, Path]] = queue.SimpleQueue()
        outer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.is_directory:
                    return
                kind, src = event.event_type, Path(os.fsdecode(event.src_path))
                if kind in ("created", "modified", "closed"):
                    outer.queue.put((True, src))
                elif kind == "deleted":
                    outer.queue.put((False, src))
                elif kind == "moved":
                    outer.queue.put((False, src))
                    outer.queue.put((True, Path(os.fsdecode(event.dest_path))))

        self.handler = Handler()

    def drain(self) -> list[tuple[bool, Path]]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


@dataclass(frozen=True)
class WatchResult:
    """How :func:`watch` ended."""

    n_tiles: int
    reason: str  # "idle", "stopped"
    waiting: tuple[str, ...]  # files still incomplete at the end (left out)
    final: pipeline.StitchResult | Registration | None
    final_seconds: float = 0.0


def watch(folder: Path | str, settings: StitchSettings | None = None,
          options: WatchSettings | None = None, *, output_dir: Path | str | None = None,
          cache_dir: Path | str | None = None, stop: threading.Event | None = None,
          on_update: Callable[[LiveUpdate, float], None] | None = None,
          progress: Progress = no_progress) -> WatchResult:
    """Follow a scan as it is written into ``folder``, rewriting the preview after each tile.

    Tiles already in the folder are added first. Then every new or rewritten
    tile (file-system events from ``watchdog``) is added once it is complete,
    ``preview.jpg`` (and ``preview.dzi`` with ``options.dzi``) and the positions
    so far, ``OFMTileConfiguration.txt``, in ``output_dir`` are rewritten
    atomically, and ``on_update(update, seconds)`` is called. It stops when
    ``stop`` is set (the CLI sets it on Ctrl-C) or after ``options.idle_timeout``
    seconds without a file event, saves the correlation cache and, with
    ``options.final``, writes the full outputs as ``ofstitch FOLDER`` would.
    """
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    # On stopping, watchdog's inotify thread can log a benign race ("queue_events() called
    # when the thread is inactive") as an error on stderr: not the user's business.
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
    options = options or WatchSettings()
    folder = Path(folder)
    require_folder(folder)
    out = Path(output_dir) if output_dir is not None else folder
    pipeline.check_writable(out)
    stop = stop or threading.Event()
    live = LiveStitcher(folder, settings, cache_dir=cache_dir, settle_time=options.settle_time,
                        preview_width=options.preview_width, progress=progress)
    events = _Events()
    observer = PollingObserver(timeout=0.5) if options.polling else Observer()
    observer.schedule(events.handler, os.fspath(folder), recursive=False)
    observer.start()  # before listing the folder, so no file falls between the two
    try:
        reason, pending = _follow(live, events, out, options, stop, on_update)
    finally:
        observer.stop()
        observer.join(timeout=5)
        live.close()
    waiting = tuple(sorted(p.name for p in pending))
    for name in waiting:
        warnings.warn(f"leaving out {name}: it was still incomplete when watching stopped",
                      OfstitchWarning, stacklevel=2)
    report = live.snapshot().report
    if report is not None and report.doubtful and not options.final:  # --final warns itself
        warnings.warn(report.warning(), OfstitchWarning, stacklevel=2)
    result, t0 = None, time.perf_counter()
    if options.final and len(live):
        result = live.finish(output_dir=out, progress=progress)
    return WatchResult(len(live), reason, waiting, result, time.perf_counter() - t0)


def _follow(live: LiveStitcher, events: _Events, out: Path, options: WatchSettings,
            stop: threading.Event, on_update: Callable[[LiveUpdate, float], None] | None
            ) -> tuple[str, set[Path]]:
    """The watch loop; returns why it stopped and the files still incomplete."""
    dzi, settle_time, idle_timeout = options.dzi, options.settle_time, options.idle_timeout
    pending: set[Path] = set(find_image_files(live.folder))
    last_event = time.monotonic()
    tick = 0.05  # how often files that are still being written are looked at again
    pacer = _Pacer()
    while not stop.is_set():
        if not live.folder.is_dir():
            raise OfstitchError(
                f"the watched folder {live.folder} is gone (deleted, moved or unmounted): "
                f"stopped after {len(live)} tiles; the last preview and positions are in {out}")
        arrived = [(changed, p) for changed, p in events.drain() if is_tile_name(p.name)]
        removed = False
        for changed, p in arrived:
            last_event = time.monotonic()
            if changed:
                pending.add(p)
            elif not p.exists():
                pending.discard(p)
                removed |= live.remove(p)
        if removed and len(live):
            _write_preview(live, out, dzi)
        if pending:
            t0, started = time.perf_counter(), time.monotonic()
            status = live.add_many(sorted(pending))
            pending = {p for p, s in status.items() if s == AddStatus.WAITING}
            if any(s == AddStatus.ADDED for s in status.values()):
                last_event = time.monotonic()
                pacer.tile_added(started)
                _write_preview(live, out, dzi)
                if on_update is not None:
                    on_update(live.last_update, time.perf_counter() - t0)
                continue
        idle = time.monotonic() - last_event
        paused = idle > max(2.0, 2 * settle_time)
        if not live.exact and (paused or (live.refine_is_quick and not pending
                                          and pacer.has_time())):
            # Null pairs a few at a time (one while tiles keep coming), so that a new
            # tile waits little; the reference threshold search only in a pause.
            n = NULL_PAIRS_PER_REFINE if paused else 1
            t0 = time.perf_counter()
            if live.refine(max_null_pairs=n):
                _write_preview(live, out, dzi)
            pacer.refined(time.perf_counter() - t0, n)
            continue
        if idle_timeout is not None and idle >= idle_timeout:
            if not live.exact and live.refine():  # stopping: leave the batch result
                _write_preview(live, out, dzi)
            return "idle", pending
        stop.wait(tick)
    if not live.exact and live.refine():
        _write_preview(live, out, dzi)
    return "stopped", pending


class _Pacer:
    """Whether there is time for a step of :meth:`LiveStitcher.refine` before the next tile.

    Learns the pace of the scan (time between tiles) and the cost of a refine step,
    both as moving averages.
    """

    def __init__(self) -> None:
        self.last_tile: float | None = None
        self.pace_s: float | None = None
        self.step_s = 0.5  # a first guess at one null pair's correlation

    def tile_added(self, now: float) -> None:
        """A tile was taken at ``now`` (``time.monotonic()``, when its update began)."""
        if self.last_tile is not None:
            gap = min(now - self.last_tile, 10.0)  # a long pause says little about the pace
            self.pace_s = gap if self.pace_s is None else 0.7 * self.pace_s + 0.3 * gap
        self.last_tile = now

    def refined(self, seconds: float, n_pairs: int) -> None:
        self.step_s = 0.7 * self.step_s + 0.3 * seconds / max(1, n_pairs)

    def has_time(self) -> bool:
        if self.pace_s is None or self.last_tile is None:
            return False
        return self.last_tile + self.pace_s - time.monotonic() > self.step_s


def _write_preview(live: LiveStitcher, out: Path, dzi: bool) -> None:
    snap = live.snapshot()
    formats.write_tile_configuration(out / TILE_CONFIGURATION_NAME, list(snap.names),
                                    snap.positions_px)
    live.preview(path=out / PREVIEW_NAME, dzi=out / LIVE_DZI_NAME if dzi else None)
