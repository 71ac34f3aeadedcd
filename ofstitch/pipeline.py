"""The pipeline: folder -> scan -> pairs -> correlation (cached) -> placement -> outputs.

:func:`register` returns tile positions without rendering; :func:`stitch`
also writes the outputs of the chosen stitching mode.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import diagnostics, formats, render, tiles
from .backends import Backend, select_backend
from .cache import CorrelationCache, cache_path
from .errors import OfstitchError, OfstitchWarning
from .graph import (
    OverlapGraph,
    canonical_flip,
    components,
    find_pairs,
    interleave,
    null_pairs,
    predicted_overlap,
    require_connected,
)
from .place import Placement, place, stage_placement
from .scan import Scan, load_scan, require_folder
from .settings import StitchSettings
from .stream import CANDIDATES, CorrelationPlan, correlate_pairs, memory_budget

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # the correlation cache's journal is appended at most this often

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Registration:
    """Where every tile goes, and how that was decided.

    Attributes
    ----------
    scan : Scan
    graph : OverlapGraph
    shift_px : ndarray, shape (m, 2)
        Correlation shift of each pair (NaN where it failed or was not computed).
    quality : ndarray, shape (m,)
    placement : Placement
    n_correlated, n_cached : int
        Pairs correlated in this run and pairs taken from the cache.
    device : str
        The backend that ran the kernels.
    timings_s : dict
    """

    scan: Scan
    graph: OverlapGraph
    shift_px: np.ndarray
    quality: np.ndarray
    placement: Placement
    n_correlated: int
    n_cached: int
    device: str
    timings_s: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.scan.files]

    @property
    def positions_px(self) -> np.ndarray:
        """``(row, col)`` of each tile's top-left corner, smallest at 0."""
        return self.placement.positions_px

    def positions(self) -> dict[str, tuple[float, float]]:
        """``{file name: (row, col)}``."""
        return {n: (float(r), float(c)) for n, (r, c) in
                zip(self.names, self.positions_px.tolist(), strict=True)}

    @property
    def n_null(self) -> int:
        """Null pairs (tiles that do not overlap) correlated for robust placement."""
        score = self.placement.null_score
        return 0 if score is None else len(score)

    def suggested_csm(self) -> np.ndarray:
        """The improved camera-to-sample matrix, at the scan's calibration width.

        Pass it back as ``--csm-matrix`` together with ``--csm-calibration-width``
        set to :attr:`Scan.csm_calibration_width` (when that is not ``None``).
        """
        m = self.placement.csm
        width = self.scan.csm_calibration_width
        return m * self.scan.tile_shape[1] / width if width else m


@dataclass(frozen=True)
class StitchResult:
    """What :func:`stitch` did: the registration (``None`` in stage mode) and the files."""

    registration: Registration | None
    outputs: dict[str, Path]
    positions_px: np.ndarray
    names: list[str]


def _noop(stage: str, done: int, total: int) -> None:
    pass


def _expected_shifts(scan: Scan, pairs: np.ndarray) -> np.ndarray:
    return scan.stage_px[pairs[:, 1]] - scan.stage_px[pairs[:, 0]]


def correlate_scan(scan: Scan, pairs: np.ndarray, expected: np.ndarray,
                   settings: StitchSettings, backend: Backend, *,
                   cache: CorrelationCache | None, progress: Progress = _noop,
                   found_out: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Correlate ``pairs`` (searched around ``expected`` shifts), reusing and filling the cache.

    Returns ``(shift_px, quality, candidates, n_correlated, n_cached)``; ``found_out``,
    if given, receives ``"found"``: which pairs came from the cache.
    """
    # Issue 14: each pair is correlated from its tile with the smaller stage position,
    # so the results do not depend on the file order; flipped back at the end.
    flip = canonical_flip(scan.stage_px, pairs)
    pairs = np.where(flip[:, None], pairs[:, ::-1], pairs)
    expected = np.where(flip[:, None], -expected, expected)
    keys = [f.key for f in scan.files]
    cs = settings.correlation
    m = len(pairs)
    if cache is not None:
        found, shift, quality, candidates = cache.lookup(cs, keys, pairs, expected,
                                                         scan.tile_shape, with_candidates=True)
    else:
        found = np.zeros(m, bool)
        shift, quality = np.full((m, 2), np.nan), np.full(m, np.nan)
        candidates = np.full((m, CANDIDATES, 3), np.nan)
    todo = np.flatnonzero(~found)
    if found_out is not None:
        found_out["found"] = found.copy()
    progress("correlate", 0, len(todo))
    if len(todo):
        plan = CorrelationPlan.make(scan.tile_shape, cs)
        budget = memory_budget(backend, settings.device_memory, settings.priority)
        done = 0
        flushed = time.monotonic()
        for batch in correlate_pairs(scan.paths, pairs[todo], expected[todo], cs, plan, backend,
                                     batch_pairs=settings.batch_pairs, budget_bytes=budget,
                                     workers=settings.workers):
            ids = todo[batch.pair_ids]
            shift[ids] = batch.shift_px
            quality[ids] = batch.quality
            candidates[ids] = batch.candidates
            done += len(ids)
            progress("correlate", done, len(todo))
            if cache is not None:
                cache.add(cs, keys, pairs[ids], batch.shift_px, batch.quality, expected[ids],
                          batch.candidates)
                if time.monotonic() - flushed >= FLUSH_INTERVAL_S:
                    # A killed run keeps every batch finished before the last flush; an
                    # fsync per batch cost up to a tenth of the correlation (more on an
                    # SD card).
                    cache.flush()
                    flushed = time.monotonic()
        if cache is not None:
            cache.save()
    shift = np.where(flip[:, None], -shift, shift)
    candidates[flip, :, :2] *= -1
    return shift, quality, candidates, len(todo), int(found.sum())


def placement_method(settings: StitchSettings) -> str:
    """The placement method: the reference's whenever one of its options is asked for."""
    if settings.placement == "reference" or settings.thresholding == "manual" or (
            settings.min_peak_quality is not None or settings.max_stage_discrepancy is not None):
        return "reference"
    return "robust"


def pairs_to_correlate(scan: Scan, graph: OverlapGraph, settings: StitchSettings
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The graph's pairs plus, for robust placement, the null pairs, in streaming order.

    Returns ``(pairs, expected shifts, order, null_shift)``: ``order[i]`` is the index,
    in the graph's pairs followed by the null pairs, of the ``i``-th pair to correlate.
    """
    pairs = graph.pairs
    null, null_shift = np.zeros((0, 2), np.int64), np.zeros((0, 2))
    if placement_method(settings) == "robust":
        null, null_shift = null_pairs(scan.stage_px, scan.tile_shape, pairs)
    order = interleave(pairs, null)
    expected = np.concatenate([_expected_shifts(scan, pairs), null_shift])[order]
    return np.concatenate([pairs, null])[order], expected, order, null_shift


ISLAND_MIN_OVERLAP = 0.02  # extra pairs for tiles in islands: overlap above this fraction


def island_pairs(scan: Scan, graph: OverlapGraph, used: np.ndarray) -> np.ndarray:
    """Pairs outside the graph (predicted overlap between :data:`ISLAND_MIN_OVERLAP` and
    ``--minimum-overlap``, such as diagonal neighbours) that could join a tile that the
    used pairs leave out of the largest group to a tile of another group."""
    n = len(scan)
    labels = components(n, graph.pairs[used]) if used.any() else np.arange(n)
    main = np.argmax(np.bincount(labels))
    if np.all(labels == main):
        return np.zeros((0, 2), np.int64)
    wider = find_pairs(scan.stage_px, scan.tile_shape, ISLAND_MIN_OVERLAP).pairs
    known = {tuple(p) for p in graph.pairs.tolist()}
    keep = [(a, b) for a, b in wider.tolist() if (a, b) not in known
            and labels[a] != labels[b] and (labels[a] != main or labels[b] != main)]
    return np.asarray(keep, dtype=np.int64).reshape(-1, 2)


def correlate_and_place(scan: Scan, graph: OverlapGraph, settings: StitchSettings,
                        backend: Backend, *, cache: CorrelationCache | None,
                        progress: Progress = _noop,
                        ask_thresholds: Callable[[], tuple[float, float]] | None = None,
                        plot_dir: Path | None = None) -> tuple:
    """Correlate the graph's pairs (and, for robust placement, the null pairs), then place.

    Returns ``(shift, quality, placement, n_correlated, n_cached, seconds, pairs)``
    where ``seconds`` maps "correlate" and "place" to their durations and ``pairs`` are
    the pairs placed: the graph's, then any added for tiles in islands
    (:func:`island_pairs`).
    """
    method = placement_method(settings)
    pairs = graph.pairs
    expected = _expected_shifts(scan, pairs)
    all_pairs, all_expected, order, null_shift = pairs_to_correlate(scan, graph, settings)
    t0 = time.perf_counter()
    m = len(pairs)
    stats: dict = {}
    shift_all, quality_all, cand_all, _, _ = correlate_scan(
        scan, all_pairs, all_expected, settings, backend, cache=cache, progress=progress,
        found_out=stats)
    back = np.argsort(order)  # position of each original index in the correlated order
    # Counts of the scan's pairs (the null pairs are extra correlations, not pairs).
    n_cached = int(stats["found"][back[:m]].sum())
    n_new = m - n_cached
    shift, quality = shift_all[back[:m]], quality_all[back[:m]]
    candidates, null_candidates = cand_all[back[:m]], cand_all[back[m:]]
    t1 = time.perf_counter()
    ask = None
    if settings.thresholding == "manual":
        if ask_thresholds is None:
            raise OfstitchError("--thresholding manual needs someone to answer: run it from "
                                "the command line, or pass ask_thresholds")
        if plot_dir is not None:
            diagnostics.plot_correlations(plot_dir / "stitching_correlations.png", quality,
                                          np.linalg.norm(shift - expected, axis=1))
        ask = ask_thresholds
    if method == "robust":
        placement = place(pairs, shift, quality, scan.stage_px, scan.csm, method="robust",
                          candidates=candidates, null_candidates=null_candidates,
                          null_stage_shift=null_shift,
                          search_radius=settings.correlation.corr_mask_radius,
                          tile_shape=scan.tile_shape, warn=False)
        extra = island_pairs(scan, graph, placement.accepted)
        if len(extra):
            # Tiles left in islands: try their smaller overlaps (diagonal neighbours) too.
            log.info("%d extra pairs for tiles in islands", len(extra))
            x_expected = _expected_shifts(scan, extra)
            stats = {}
            x_shift, x_quality, x_cand, _, _ = correlate_scan(
                scan, extra, x_expected, settings, backend, cache=cache, progress=progress,
                found_out=stats)
            n_cached += int(stats["found"].sum())
            n_new += int((~stats["found"]).sum())
            pairs = np.concatenate([pairs, extra])
            shift = np.concatenate([shift, x_shift])
            quality = np.concatenate([quality, x_quality])
            candidates = np.concatenate([candidates, x_cand])
            placement = place(pairs, shift, quality, scan.stage_px, scan.csm, method="robust",
                              candidates=candidates, null_candidates=null_candidates,
                              null_stage_shift=null_shift,
                              search_radius=settings.correlation.corr_mask_radius,
                              tile_shape=scan.tile_shape, warn=False)
        # Issue 14: a doubtful placement says so, once, in one line.
        if placement.report is not None and placement.report.doubtful:
            warnings.warn(placement.report.warning(), OfstitchWarning, stacklevel=3)
    else:
        placement = place(pairs, shift, quality, scan.stage_px, scan.csm, method="reference",
                          thresholding=settings.thresholding,
                          min_peak_quality=settings.min_peak_quality,
                          max_stage_discrepancy=settings.max_stage_discrepancy,
                          ask_thresholds=ask)
    return shift, quality, placement, n_new, n_cached, {
        "correlate": t1 - t0, "place": time.perf_counter() - t1}, pairs


def load_connected_scan(folder: Path, settings: StitchSettings) -> tuple[Scan, OverlapGraph]:
    """The scan and its overlap graph; raises if the graph is not connected."""
    scan = load_scan(folder, settings)
    graph = find_pairs(scan.stage_px, scan.tile_shape, settings.minimum_overlap)
    require_connected(graph, [f.name for f in scan.files], settings.minimum_overlap)
    return scan, graph


def register(folder: Path | str, settings: StitchSettings | None = None, *,
             output_dir: Path | str | None = None, cache_dir: Path | str | None = None,
             use_cache: bool = True, progress: Progress = _noop,
             ask_thresholds: Callable[[], tuple[float, float]] | None = None,
             plots: bool = False, backend: Backend | None = None) -> Registration:
    """Find the position of every tile of the scan in ``folder``, without rendering.

    Parameters
    ----------
    folder : path
        The folder of tiles.
    settings : StitchSettings, optional
    output_dir : path, optional
        Where diagnostic plots go (with ``plots=True``). Default: ``folder``.
    cache_dir : path, optional
        Where the correlation cache lives. Default: ``folder``.
    use_cache : bool
        Read and write the correlation cache.
    progress : callable, optional
        ``progress(stage, done, total)``.
    ask_thresholds : callable, optional
        For ``thresholding="manual"``.
    backend : Backend, optional
        Default: from ``settings.device``.

    Raises
    ------
    OfstitchError
        A user error (no images, a disconnected scan, bad settings...).
    """
    settings = settings or StitchSettings()
    folder = Path(folder)
    timings = {}
    t0 = time.perf_counter()
    backend = backend or select_backend(settings.device)
    scan, graph = load_connected_scan(folder, settings)
    timings["load"] = time.perf_counter() - t0
    out_dir = Path(output_dir) if output_dir is not None else folder
    if plots:
        diagnostics.plot_inputs(out_dir / "stitching_inputs.png", scan.stage_px,
                                scan.tile_shape, graph.pairs)

    cache = CorrelationCache.load(cache_path(folder, cache_dir)) if use_cache else None
    shift, quality, placement, n_new, n_cached, seconds, pairs = correlate_and_place(
        scan, graph, settings, backend, cache=cache, progress=progress,
        ask_thresholds=ask_thresholds, plot_dir=out_dir)
    if len(pairs) > len(graph.pairs):  # pairs added for tiles in islands
        graph = OverlapGraph(pairs, predicted_overlap(scan.stage_px, scan.tile_shape,
                                                      pairs[:, 0], pairs[:, 1]), len(scan))
    timings.update(seconds)
    if plots and len(graph.pairs):
        stage_shift = _expected_shifts(scan, graph.pairs)
        diagnostics.plot_placement(out_dir / "stitching_correlations.png", placement, quality,
                                   np.linalg.norm(shift - stage_shift, axis=1))
        diagnostics.plot_residuals(out_dir / "stitching_residuals.png", placement,
                                   graph.pairs, scan.tile_shape)
    return Registration(scan, graph, shift, quality, placement, n_new, n_cached,
                        backend.describe(), timings)


def output_prefix(folder: Path) -> str:
    """The name outputs start with: the scan folder's name (skipping 'images' and 'use')."""
    for part in reversed(Path(folder).resolve().parts):
        if part not in ("images", "use", "/", ""):
            return part
    return "scan"


def check_writable(output_dir: Path) -> None:
    """Raise a clear error if ``output_dir`` cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ofstitch-write-test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OfstitchError(f"cannot write to the output folder {output_dir} "
                            f"({exc.strerror}): choose another with -o/--output-dir") from None


def value_scale(scan: Scan, sample: int = 8) -> float:
    """Factor that maps the tiles' values to 0-255 (1 for 8-bit tiles)."""
    if scan.bit_depth == 8:
        return 1.0
    peak = 0.0
    for i in np.linspace(0, len(scan) - 1, min(sample, len(scan))).astype(int):
        try:
            peak = max(peak, float(tiles.read_grey(scan.path(int(i)), 0.25).max()))
        except tiles.TileReadError:
            continue
    return 255.0 / peak if peak > 0 else 1.0


def _render_jpeg(scan: Scan, positions: np.ndarray, path: Path, scale: float,
                 work_dir: Path | None, progress: Progress, label: str,
                 extra: dict | None = None, *, blend: str = "none",
                 skip: set[int] | None = None) -> set[int]:
    """Render the mosaic at ``scale`` into the JPEG ``path``.

    ``work_dir`` is unused (the mosaic streams straight into the encoder). Returns
    the tiles left out because they could not be decoded.
    """
    mosaic = render.Mosaic(scan.paths, positions, scan.tile_shape, scale=scale, blend=blend,
                           value_scale=value_scale(scan), skip=skip)
    pixel = scan.pixel_size_um / scale if scan.pixel_size_um else None
    mosaic.write(lambda image: formats.write_jpeg(
        image, path, metadata=scan.metadata, pixel_size_um=pixel, n_tiles=len(scan),
        extra=extra), progress=lambda d, t: progress(label, d, t))
    return mosaic.skip


def full_resolution_formats(settings: StitchSettings, size: tuple[int, int]) -> tuple[str, ...]:
    """The formats to write for a mosaic of ``(height, width)``.

    JPEG cannot hold more than 65,535 px per side: it is refused (an error) when
    it is the only format asked for, and left out with a warning otherwise.
    """
    wanted = settings.output_formats
    if "jpeg" in wanted and formats.too_big_for_jpeg(size):
        if len(wanted) == 1:
            raise formats.jpeg_refusal(size)
        warnings.warn(f"not writing the full-resolution JPEG: {formats.jpeg_refusal(size)}",
                      OfstitchWarning, stacklevel=2)
        wanted = tuple(f for f in wanted if f != "jpeg")
    return wanted


def write_full_resolution(scan: Scan, positions: np.ndarray, out: Path, prefix: str,
                          settings: StitchSettings, wanted: tuple[str, ...], *,
                          extra: dict | None = None, skip: set[int] | None = None,
                          progress: Progress = _noop) -> dict[str, Path]:
    """Write the full-resolution mosaic in each format of ``wanted``; returns the files."""
    mosaic = render.Mosaic(scan.paths, positions, scan.tile_shape, blend=settings.blend,
                           value_scale=value_scale(scan), skip=skip, workers=settings.workers)
    tile_size = settings.tile_size or formats.TILE_SIZE
    um = scan.pixel_size_um
    base = out / f"{prefix}_stitched"
    outputs: dict[str, Path] = {}
    for fmt in wanted:
        path = Path(f"{base}{formats.SUFFIXES[fmt]}")

        def report(done: int, total: int, fmt: str = fmt) -> None:
            progress(f"write-{fmt}", done, total)

        if fmt == "jpeg":
            mosaic.write(lambda im, p=path: formats.write_jpeg(
                im, p, metadata=scan.metadata, pixel_size_um=um, n_tiles=len(scan),
                extra=extra), progress=report)
            outputs["stitched"] = path
        elif fmt == "ome-tiff":
            mosaic.write(lambda im, p=path: formats.write_ome_tiff(
                im, p, pixel_size_um=um, compression=settings.tiff_compression,
                tile_size=tile_size, name=prefix), progress=report)
            outputs["ome_tiff"] = path
        elif fmt == "dzi":
            mosaic.write(lambda im, p=path: formats.write_dzi(
                im, p, tile_size=tile_size, pixel_size_um=um), progress=report)
            outputs["dzi"] = path
            outputs["viewer"] = out / formats.VIEWER_NAME
        elif fmt == "ome-zarr":
            mosaic.write(lambda im, p=path: formats.write_ome_zarr(
                im, p, pixel_size_um=um, name=prefix), progress=report)
            outputs["ome_zarr"] = path
    return outputs


def stitch(folder: Path | str, settings: StitchSettings | None = None, *,
           output_dir: Path | str | None = None, cache_dir: Path | str | None = None,
           progress: Progress = _noop,
           ask_thresholds: Callable[[], tuple[float, float]] | None = None) -> StitchResult:
    """Stitch the scan in ``folder`` and write the outputs of ``settings.stitching_mode``.

    Outputs (in ``output_dir``, default the scan folder; inputs are never modified):

    - ``all``: ``<prefix>_stitched.jpg`` (full resolution), ``preview.jpg`` (1000 px
      wide), ``stitched_thumbnail.jpg``, ``OFMTileConfiguration.txt``,
      ``stitching_inputs.png``, ``stitching_correlations.png``, and with
      ``stitch_tiff``/``stitch_dzi`` a pyramidal TIFF / DZI;
    - ``preview``: the same without the full-resolution outputs;
    - ``stage``: ``stitched_from_stage.jpg`` (1000 px wide), from stage positions only;
    - ``only-correlate``: only the correlation cache.
    """
    settings = settings or StitchSettings()
    folder = Path(folder)
    out = Path(output_dir) if output_dir is not None else folder
    mode = settings.stitching_mode
    outputs: dict[str, Path] = {}
    require_folder(folder)  # before anything is created
    if mode != "only-correlate":
        check_writable(out)

    if mode == "stage":
        scan = load_scan(folder, settings)
        placement = stage_placement(scan.stage_px, scan.csm)
        path = out / "stitched_from_stage.jpg"
        scale = render.scale_for_width(placement.positions_px, scan.tile_shape,
                                       render.PREVIEW_WIDTH)
        _render_jpeg(scan, placement.positions_px, path, scale, out, progress, "render",
                     blend=settings.blend)
        outputs["stage"] = path
        return StitchResult(None, outputs, placement.positions_px, [f.name for f in scan.files])

    if mode == "only-correlate":
        backend = select_backend(settings.device)
        scan, graph = load_connected_scan(folder, settings)
        cache = CorrelationCache.load(cache_path(folder, cache_dir))
        if placement_method(settings) == "robust":
            # Placing finds the extra pairs of tiles left in islands: correlate them too,
            # so that a later run correlates nothing.
            correlate_and_place(scan, graph, settings, backend, cache=cache,
                                progress=progress)
        else:
            all_pairs, all_expected, _, _ = pairs_to_correlate(scan, graph, settings)
            correlate_scan(scan, all_pairs, all_expected, settings, backend, cache=cache,
                           progress=progress)
        outputs["cache"] = cache.path
        return StitchResult(None, outputs, scan.stage_px - scan.stage_px.min(axis=0),
                            [f.name for f in scan.files])

    reg = register(folder, settings, output_dir=out, cache_dir=cache_dir, progress=progress,
                   ask_thresholds=ask_thresholds, plots=True)
    outputs["inputs_plot"] = out / "stitching_inputs.png"
    if len(reg.graph.pairs):
        outputs["correlations_plot"] = out / "stitching_correlations.png"
        outputs["residuals_plot"] = out / "stitching_residuals.png"
    scan, positions = reg.scan, reg.positions_px
    names = reg.names
    config = out / "OFMTileConfiguration.txt"
    formats.write_tile_configuration(config, names, positions)
    outputs["tile_configuration"] = config
    extra = {"camera_to_sample_matrix_suggested": reg.suggested_csm().round(6).tolist()}

    wanted = ()
    if mode == "all":  # refuse an impossible JPEG before spending time on the preview
        wanted = full_resolution_formats(
            settings, render.make_layout(positions, scan.tile_shape).size)
    preview = out / "preview.jpg"
    scale = render.scale_for_width(positions, scan.tile_shape, render.PREVIEW_WIDTH)
    skip = _render_jpeg(scan, positions, preview, scale, out, progress, "preview", extra,
                        blend=settings.blend)
    outputs["preview"] = preview
    thumb = out / "stitched_thumbnail.jpg"
    formats.write_thumbnail(preview, thumb)
    outputs["thumbnail"] = thumb

    if mode == "all":
        outputs.update(write_full_resolution(scan, positions, out, output_prefix(folder),
                                             settings, wanted, extra=extra, skip=skip,
                                             progress=progress))
    return StitchResult(reg, outputs, positions, names)
