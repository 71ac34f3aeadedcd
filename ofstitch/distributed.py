"""Scale-out on Dask: pair correlations as tasks on a cluster's workers, and many scans at once.

With ``--scheduler ADDRESS`` (or ``OFSTITCH_SCHEDULER``), the registration core sends
the pairs it must correlate to the workers of a running Dask cluster
(``dask.distributed``; ``dask-jobqueue`` starts one on SLURM or PBS) in chunks of
:data:`CHUNK_PAIRS`, in the scan's streaming order so that a chunk's tiles are
neighbours. Each worker reads the tiles it needs from the shared file system,
correlates them with the same streaming code as a local run, and sends back only
the per-pair results. The client keeps the cache and places the tiles. A task whose
worker dies is run again by Dask elsewhere (``retries``); its results are pure, so
nothing is counted twice.

:func:`stitch_many` stitches many scans at once (``ofstitch batch``): each scan is
one task on the cluster, or one process of a local pool.

Only this module imports Dask; local runs never do (``pip install "ofstitch[dask]"``).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import socket
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import NUMPY
from .errors import OfstitchError
from .settings import CorrelationSettings, StitchSettings
from .stream import BatchResult, CorrelationPlan, correlate_pairs

CHUNK_PAIRS = 64  # pairs per task: big enough to reuse each tile's spectrum, small to balance
CONNECT_TIMEOUT_S = 5
RETRIES = 2  # a task is tried again this often when its worker dies


class SharedFileSystemError(OfstitchError):
    """A worker cannot read the scan's files."""


def _dask_client():
    try:
        from dask.distributed import Client
    except ImportError:
        raise OfstitchError("--scheduler needs Dask: pip install \"ofstitch[dask]\"") from None
    return Client


@functools.lru_cache(maxsize=4)
def connect(address: str):
    """A client of the Dask scheduler at ``address`` (one per process and address)."""
    client_cls = _dask_client()
    try:
        return client_cls(address, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise OfstitchError(
            f"cannot reach the Dask scheduler at {address} ({exc.__class__.__name__}): start "
            "one with 'dask scheduler' and 'dask worker ADDRESS', or check --scheduler / "
            "OFSTITCH_SCHEDULER") from None


def _correlate_chunk(paths: list[str], pairs: np.ndarray, expected: np.ndarray,
                     settings: CorrelationSettings, tile_shape: tuple[int, int],
                     batch_pairs: int | None, budget_bytes: int | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """On a worker: correlate ``pairs`` of the tiles ``paths`` (indices into it).

    Returns ``(pair ids, shift px, quality, candidates)`` for the chunk's pairs.
    """
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"worker {socket.gethostname()} cannot read {p}: the scan must be on a file "
                "system that every worker sees at the same path")
    plan = CorrelationPlan.make(tile_shape, settings)
    parts = list(correlate_pairs([Path(p) for p in paths], pairs, expected, settings, plan,
                                 NUMPY, batch_pairs=batch_pairs, budget_bytes=budget_bytes,
                                 workers=1))
    return (np.concatenate([b.pair_ids for b in parts]),
            np.concatenate([b.shift_px for b in parts]),
            np.concatenate([b.quality for b in parts]),
            np.concatenate([b.candidates for b in parts]))


def correlate_on_cluster(address: str, paths: Sequence[Path], pairs: np.ndarray,
                         expected: np.ndarray, settings: CorrelationSettings,
                         tile_shape: tuple[int, int], *, batch_pairs: int | None = None,
                         budget_bytes: int | None = None,
                         chunk_pairs: int = CHUNK_PAIRS) -> Iterator[BatchResult]:
    """As :func:`ofstitch.stream.correlate_pairs`, with the work done by the cluster's
    workers: results arrive chunk by chunk, in the order the chunks finish."""
    from dask.distributed import as_completed as dask_completed

    client = connect(address)
    futures, start_of = [], {}
    for start in range(0, len(pairs), chunk_pairs):
        chunk = pairs[start:start + chunk_pairs]
        tiles_used, local = np.unique(chunk, return_inverse=True)
        future = client.submit(
            _correlate_chunk, [os.fspath(Path(paths[t]).resolve()) for t in tiles_used],
            local.reshape(chunk.shape), expected[start:start + chunk_pairs], settings,
            tuple(tile_shape), batch_pairs, budget_bytes, pure=False, retries=RETRIES)
        futures.append(future)
        start_of[future.key] = start
    try:
        for future in dask_completed(futures, loop=client.loop):
            try:
                ids, shift, quality, candidates = future.result()
            except FileNotFoundError as exc:
                raise SharedFileSystemError(str(exc)) from None
            yield BatchResult(ids + start_of[future.key], shift, quality, candidates)
    finally:
        client.cancel(futures)  # an interrupted run leaves no work behind on the cluster


# ----------------------------------------------------------------------------- many scans


@dataclass(frozen=True)
class ScanOutcome:
    """How one scan of :func:`stitch_many` went."""

    folder: Path
    ok: bool
    n_tiles: int = 0
    seconds: float = 0.0
    error: str = ""


def _stitch_one(folder: str, settings: StitchSettings, output_dir: str | None) -> ScanOutcome:
    import time
    import warnings

    from .pipeline import stitch

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stitch(folder, settings, output_dir=output_dir)
    except OfstitchError as exc:
        return ScanOutcome(Path(folder), False, seconds=time.perf_counter() - t0,
                           error=str(exc))
    except Exception as exc:  # one broken scan never stops the others
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return ScanOutcome(Path(folder), False, seconds=time.perf_counter() - t0, error=last)
    return ScanOutcome(Path(folder), True, len(result.names), time.perf_counter() - t0)


def stitch_many(folders: Sequence[Path], settings: StitchSettings, *,
                output_root: Path | None = None, jobs: int = 1, scheduler: str | None = None
                ) -> Iterator[ScanOutcome]:
    """Stitch each folder (outputs in the folder, or in ``output_root/<folder name>``),
    ``jobs`` at a time in local processes, or all on the cluster at ``scheduler``.
    Yields each scan's outcome as it finishes; a failing scan does not stop the others."""
    local = dataclasses.replace(settings, scheduler=None)  # each scan runs where it lands

    def out_of(folder: Path) -> str | None:
        return None if output_root is None else os.fspath(Path(output_root) / folder.name)

    if scheduler is not None:
        from dask.distributed import as_completed as dask_completed

        client = connect(scheduler)
        futures = [client.submit(_stitch_one, os.fspath(Path(f).resolve()), local, out_of(f),
                                 pure=False, retries=RETRIES) for f in folders]
        for future in dask_completed(futures, loop=client.loop):
            yield future.result()
        return
    if jobs <= 1:
        for f in folders:
            yield _stitch_one(os.fspath(f), local, out_of(f))
        return
    # Spawned, not forked: a forked child of a process with threads (a thread pool, a Dask
    # client) can deadlock on a lock some thread held.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_stitch_one, os.fspath(f), local, out_of(f)) for f in folders]
        for future in as_completed(futures):
            yield future.result()
