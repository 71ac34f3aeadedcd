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
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyvips

from . import omezarr
from .atomic import atomic_dir
from .backends import NUMPY
from .compose import Layout, Pixels, TileSource, compose_band, feather_weight
from .errors import OfstitchError, OfstitchWarning
from .formats import ZARR_CHUNK
from .levels import Levels
from .omezarr import ZarrLayout
from .settings import CorrelationSettings, StitchSettings
from .stream import BatchResult, CorrelationPlan, correlate_pairs

if TYPE_CHECKING:
    from .render import Mosaic

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
                         chunk_pairs: int | None = None) -> Iterator[BatchResult]:
    """As :func:`ofstitch.stream.correlate_pairs`, with the work done by the cluster's
    workers: results arrive chunk by chunk, in the order the chunks finish."""
    from dask.distributed import as_completed as dask_completed

    client = connect(address)
    chunk_pairs = chunk_pairs or CHUNK_PAIRS
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


# ----------------------------------------------------------------------------- OME-Zarr

REGION_MAX_PX = 2048  # side of a zarr task's region of level 0 (at least two blocks)


def _require_visible(paths: Sequence[str], what: str) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"worker {socket.gethostname()} cannot see {what} {p}: it must be on a file "
                "system that every worker sees at the same path")


def _zarr_tiles_task(store: str, spec: ZarrLayout, last: int, box: tuple[int, int, int, int],
                     paths: list[str], top_left: np.ndarray, centre: np.ndarray,
                     size: tuple[int, int], tile_shape: tuple[int, int], scale: float,
                     pixels: Pixels, blend: str, band_height: int) -> list[int]:
    """On a worker: compose ``box`` of level 0 from the tiles ``paths`` (placed at
    ``top_left``, in the mosaic's priority order) with the local renderer's code, and
    write it and its halvings down to level ``last``. Returns the positions in ``paths``
    of tiles that cannot be decoded, and then writes nothing."""
    from .render import find_undecodable

    _require_visible([store], "the output folder")
    _require_visible(paths, "the tile")
    layout = Layout(top_left, centre, tuple(tile_shape), tuple(size), scale)
    source = TileSource([Path(p) for p in paths], layout, pixels)
    weight = feather_weight(layout) if blend == "feather" else None
    r0, c0, r1, c1 = box
    out = np.empty((r1 - r0, c1 - c0, pixels.bands), dtype=pixels.dtype)
    try:
        for r in range(r0, r1, band_height):  # top to bottom: the tiles are read sequentially
            rows = (r, min(r1, r + band_height))
            band = compose_band(source, layout, rows, blend=blend, weight=weight,
                                cols=(c0, c1))
            data = pyvips.Region.new(band).fetch(0, 0, band.width, band.height)
            out[rows[0] - r0:rows[1] - r0] = np.frombuffer(data, dtype=pixels.dtype).reshape(
                band.height, band.width, pixels.bands)
            source.forget_above(rows[1])
    except pyvips.Error:
        bad = find_undecodable([Path(p) for p in paths], workers=1)
        if not bad:
            raise
        return sorted(bad)
    omezarr.write_region(Path(store), spec, 0, last, box, out)
    return []


def _zarr_level_task(store: str, spec: ZarrLayout, base: int, last: int,
                     box: tuple[int, int, int, int]) -> list[int]:
    """On a worker: halve ``box`` of level ``base`` into the levels below, to ``last``."""
    _require_visible([store], "the output folder")
    pixels = omezarr.read_region(Path(store), base, box)
    omezarr.write_region(Path(store), spec, base, last, box, pixels, write_first=False)
    return []


def tiles_touching(layout: Layout, box: tuple[int, int, int, int], skip: set[int]
                   ) -> np.ndarray:
    """Indices (ascending) of the tiles that touch ``box`` = ``(r0, c0, r1, c1)``."""
    r0, c0, r1, c1 = box
    th, tw = layout.tile_shape
    top = layout.top_left
    hit = ((top[:, 0] < r1) & (top[:, 0] + th > r0) & (top[:, 1] < c1) & (top[:, 1] + tw > c0))
    if skip:
        hit[sorted(skip)] = False
    return np.flatnonzero(hit)


def write_ome_zarr_on_cluster(address: str, mosaic: Mosaic, path: Path, *,
                              pixel_size_um: float | None, name: str = "mosaic",
                              ngff_version: str = "0.4", window: Levels | None = None,
                              chunk: int | None = None, levels_per_task: int | None = None,
                              progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``mosaic`` as the OME-Zarr ``path``, its chunks written by the workers of the
    cluster at ``address``; the pixels and files are those of
    :func:`ofstitch.formats.write_ome_zarr` on the same mosaic.

    The client writes the metadata, then sends one task per region of
    ``block * 2**levels_per_task`` pixels (:mod:`ofstitch.omezarr`): each worker composes
    its region from the tiles that touch it and writes its whole chunks of level 0 and of
    the levels below. Further passes halve the last level written into smaller levels.
    The folder is renamed into place when every task is done (:func:`atomic_dir`), so a
    failed run leaves nothing half-written; the output folder must be shared with the
    workers. A tile that cannot be decoded is left out with a warning, as locally.
    """
    omezarr.require()
    client = connect(address)
    layout, pixels = mosaic.layout, mosaic.pixels
    path = Path(path).resolve()
    paths = [os.fspath(Path(p).resolve()) for p in mosaic.paths]
    with atomic_dir(path) as store_path:
        store = os.fspath(store_path)
        spec = omezarr.create(store_path, layout.size, pixels.bands, pixels.dtype,
                              pixel_size_um=pixel_size_um, chunk=chunk or ZARR_CHUNK,
                              name=name, ngff_version=ngff_version, window=window)
        m = levels_per_task or max(1, int(np.log2(max(1, REGION_MAX_PX // spec.block))))
        passes = omezarr.region_passes(spec, m)
        total = sum(len(omezarr.regions(spec, base, m)) for base, _ in passes)
        shared = client.scatter(pixels, broadcast=True)  # a flat field travels once
        futures: list = []
        finished = 0

        def run(submitted: list) -> list[list[int]]:
            """Wait for ``submitted``; their results, in order."""
            nonlocal finished
            futures[:] = submitted
            for future in _completed(submitted, client):
                try:
                    future.result()  # a task's error stops the run at once
                except FileNotFoundError as exc:
                    raise SharedFileSystemError(str(exc)) from None
                finished += 1
                if progress is not None:
                    progress(min(finished, total), total)
            return client.gather(submitted)

        try:
            base, last = passes[0]
            while True:
                boxes = omezarr.regions(spec, base, m)
                members = [tiles_touching(layout, box, mosaic.skip) for box in boxes]
                results = run([client.submit(
                    _zarr_tiles_task, store, spec, last, box, [paths[i] for i in idx],
                    layout.top_left[idx], layout.centre[idx], layout.size, layout.tile_shape,
                    layout.scale, shared, mosaic.blend, mosaic.band_height,
                    pure=False, retries=RETRIES) for box, idx in zip(boxes, members, strict=True)])
                bad = {int(idx[k]) for idx, found in zip(members, results, strict=True)
                       for k in found}
                if not bad:
                    break
                for i in sorted(bad):  # its neighbours fill its place where they overlap it
                    warnings.warn(f"leaving out {Path(paths[i]).name} from the mosaic: cannot "
                                  "decode it", OfstitchWarning, stacklevel=2)
                mosaic.skip |= bad  # and every region is written again without it
            for base, last in passes[1:]:
                boxes = omezarr.regions(spec, base, m)
                run([client.submit(_zarr_level_task, store, spec, base, last, box, pure=False,
                                   retries=RETRIES) for box in boxes])
        finally:
            client.cancel(futures)  # an interrupted run leaves no work behind on the cluster
            # A cancelled task that is already running runs on: wait for it, or it would
            # write its chunks into the folder after atomic_dir has removed it.
            _wait_until_stopped(client, {str(f.key) for f in futures})


def _wait_until_stopped(client, keys: set[str], timeout_s: float = 60.0) -> None:
    """Return once no worker is still running any of ``keys`` (or after ``timeout_s``)."""
    if not keys:
        return

    def running(dask_worker) -> list[str]:
        return [str(k) for k, ts in dask_worker.state.tasks.items()
                if ts.state in ("executing", "cancelled", "resumed", "long-running")]

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            busy = {k for ks in client.run(running).values() for k in ks}
        except Exception:  # noqa: BLE001 - a worker gone is a worker not writing
            return
        if not busy & keys:
            return
        time.sleep(0.1)


def _completed(futures: list, client) -> Iterator:
    from dask.distributed import as_completed as dask_completed

    return dask_completed(futures, loop=client.loop)


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
