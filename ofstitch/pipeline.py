"""The pipeline: folder -> scan -> pairs -> correlation (cached) -> placement -> outputs.

:func:`register` returns tile positions without rendering; :func:`stitch`
also writes the outputs of the chosen stitching mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic, diagnostics, flatfield, formats, levels, preview, render, tiles
from .backends import Backend, select_backend
from .cache import CorrelationCache, cache_path
from .errors import OfstitchError, OfstitchWarning
from .graph import OverlapGraph, find_pairs, require_connected
from .place import stage_placement
from .registration import (
    Progress,
    Registration,
    correlate,
    expected_shifts,
    no_progress,
    plan_pairs,
    register_scan,
)
from .scan import Scan, load_scan, require_folder
from .settings import StitchSettings

__all__ = ["Progress", "Registration", "StitchResult", "register", "stitch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchResult:
    """What :func:`stitch` did: the registration (``None`` in stage and only-correlate
    modes) and the files written."""

    registration: Registration | None
    outputs: dict[str, Path]
    positions_px: np.ndarray
    names: list[str]
    pixels: str = ""  # what the outputs hold (data type, rendering range), in words


def load_connected_scan(folder: Path, settings: StitchSettings) -> tuple[Scan, OverlapGraph]:
    """The scan and its overlap graph; raises if the graph is not connected."""
    scan = load_scan(folder, settings)
    graph = find_pairs(scan.stage_px, scan.tile_shape, settings.minimum_overlap)
    require_connected(graph, [f.name for f in scan.files], settings.minimum_overlap)
    return scan, graph


def register(folder: Path | str, settings: StitchSettings | None = None, *,
             output_dir: Path | str | None = None, cache_dir: Path | str | None = None,
             use_cache: bool = True, progress: Progress = no_progress,
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
    t0 = time.perf_counter()
    backend = backend or select_backend(settings.device)
    scan, graph = load_connected_scan(folder, settings)
    loaded = time.perf_counter() - t0
    out_dir = Path(output_dir) if output_dir is not None else folder
    cache = CorrelationCache.load(cache_path(folder, cache_dir)) if use_cache else None
    reg = register_scan(scan, graph, settings, backend, cache=cache, progress=progress,
                        ask_thresholds=ask_thresholds, plot_dir=out_dir)
    reg.timings_s["load"] = loaded
    if plots:
        write_plots(reg, out_dir)
    return reg


def write_plots(reg: Registration, out_dir: Path) -> dict[str, Path]:
    """Draw the diagnostic plots of ``reg`` into ``out_dir``; returns the files.

    ``stitching_inputs.png`` (the scan as the stage sees it) always; with pairs,
    ``stitching_correlations.png`` and ``stitching_residuals.png`` too.
    """
    scan = reg.scan
    out = {"inputs_plot": out_dir / "stitching_inputs.png"}
    diagnostics.plot_inputs(out["inputs_plot"], scan.stage_px, scan.tile_shape, reg.graph.pairs)
    if len(reg.graph.pairs):
        out["correlations_plot"] = out_dir / "stitching_correlations.png"
        out["residuals_plot"] = out_dir / "stitching_residuals.png"
        stage_shift = expected_shifts(scan, reg.graph.pairs)
        diagnostics.plot_placement(out["correlations_plot"], reg.placement, reg.quality,
                                   np.linalg.norm(reg.shift_px - stage_shift, axis=1))
        diagnostics.plot_residuals(out["residuals_plot"], reg.placement, reg.graph.pairs,
                                   scan.tile_shape)
    return out


MAX_PREFIX_BYTES = 200  # room for "_stitched.ome.zarr" and a temporary name within 255


def output_prefix(folder: Path) -> str:
    """The name outputs start with: the scan folder's name (skipping 'images' and 'use'),
    shortened to :data:`MAX_PREFIX_BYTES` so that every output name fits a file system."""
    for part in reversed(Path(folder).resolve().parts):
        if part not in ("images", "use", "/", ""):
            return atomic.shorten_name(part, MAX_PREFIX_BYTES)
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


def tile_formats(scan: Scan) -> tuple[str, ...]:
    """The libvips pixel formats of the scan's tiles (``"uchar"``, ``"ushort"``...)."""
    known = getattr(scan, "pixel_formats", ())
    if known:
        return tuple(known)
    try:
        return (tiles.header(scan.path(0))[3],)
    except tiles.TileReadError:
        return ("uchar",) if scan.bit_depth == 8 else ("ushort",)


def data_pixels(scan: Scan, *, warn: bool = True,
                flat: flatfield.FlatField | None = None) -> render.Pixels:
    """What the data formats (OME-TIFF, OME-Zarr) of ``scan`` hold: the tiles' data type
    (:func:`ofstitch.levels.mosaic_dtype`) and channel count (1 grey, 3 colour)."""
    dtype = levels.mosaic_dtype(tile_formats(scan), warn=warn)
    return render.Pixels.data(dtype, 3 if scan.bands >= 3 else 1, flat)


def rendering_levels(scan: Scan) -> levels.Levels:
    """The range the 8-bit renderings (JPEG, DZI, previews) of ``scan`` show, computed
    once: 0-255 for 8-bit tiles, else the 0.1-99.9 percentiles of a sample of tiles."""
    return levels.scan_levels(scan.paths, data_pixels(scan, warn=False).dtype)


def describe_pixels(scan: Scan, shown: levels.Levels,
                    flat: flatfield.FlatField | None = None) -> str:
    """One line for the run's summary: what the data formats keep, what renderings show."""
    data = data_pixels(scan, warn=False)
    channels = "3 channels (RGB)" if data.bands == 3 else "1 channel"
    corrected = f"; {flat.describe()}" if flat is not None else ""
    if shown.identity and data.fmt == "uchar":
        return f"Pixels: {data.dtype}, {channels}{corrected}."
    return (f"Pixels: {data.dtype}, {channels} in OME-TIFF and OME-Zarr; JPEG, DZI and "
            f"previews show {shown.describe()} as 0-255 (the {levels.PERCENTILES[0]:g}-"
            f"{levels.PERCENTILES[1]:g} percentiles of the scan){corrected}.")


def write_preview(scan: Scan, positions: np.ndarray, path: Path, *,
                  extra: dict | None = None, width: int = render.PREVIEW_WIDTH,
                  shown: levels.Levels | None = None,
                  flat: flatfield.FlatField | None = None) -> set[int]:
    """Write the mosaic at most ``width`` px wide as the JPEG ``path``, drawn as live
    stitching draws it (:func:`ofstitch.preview.draw`), values mapped to 8 bits by
    ``shown`` (default: :func:`rendering_levels`). Returns the tiles left out
    because they could not be decoded."""
    shown = shown if shown is not None else rendering_levels(scan)
    return preview.draw(scan, positions, width, preview.PreviewTiles(shown, flat),
                        jpeg=path, extra=extra)[1]


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
                          progress: Progress = no_progress,
                          paths: dict[str, Path] | None = None,
                          shown: levels.Levels | None = None,
                          flat: flatfield.FlatField | None = None,
                          on_band: Callable[[tuple[int, int], np.ndarray], None] | None = None
                          ) -> dict[str, Path]:
    """Write the full-resolution mosaic in each format of ``wanted``; returns the files.

    Each goes to ``out/<prefix>_stitched<suffix>``, or to ``paths[format]`` if given.
    The data formats keep the tiles' values (:func:`data_pixels`); JPEG, DZI and
    the pyramid TIFF are 8-bit renderings through ``shown`` (default:
    :func:`rendering_levels`). ``on_band``: sees each band of the JPEG's rendering (see
    :meth:`ofstitch.render.Mosaic.write`).
    """
    shown = shown if shown is not None else rendering_levels(scan)
    if flat is None:  # callers that did not resolve --flat-field (stitch_to_file)
        flat = flatfield.resolve(settings.flat_field, scan.paths, scan.tile_shape)
    rendering = render.Mosaic(scan.paths, positions, scan.tile_shape, blend=settings.blend,
                              pixels=render.Pixels(shown, flat=flat), skip=skip,
                              workers=settings.workers)
    data = rendering.pixels
    if any(f in formats.DATA_FORMATS for f in wanted):
        data = data_pixels(scan, flat=flat)
    mosaic = rendering if data == rendering.pixels else render.Mosaic(
        scan.paths, positions, scan.tile_shape, blend=settings.blend, pixels=data,
        skip=skip, workers=settings.workers)
    tile_size = settings.tile_size or formats.TILE_SIZE
    um = scan.pixel_size_um
    base = out / f"{prefix}_stitched"
    outputs: dict[str, Path] = {}
    for fmt in wanted:
        path = Path(paths[fmt]) if paths and fmt in paths else \
            Path(f"{base}{formats.SUFFIXES[fmt]}")

        def report(done: int, total: int, fmt: str = fmt) -> None:
            progress(f"write-{fmt}", done, total)

        if fmt == "jpeg":
            rendering.write(lambda im, p=path: formats.write_jpeg(
                im, p, metadata=scan.metadata, pixel_size_um=um, n_tiles=len(scan),
                extra=extra), progress=report, on_band=on_band)
            outputs["stitched"] = path
        elif fmt == "ome-tiff":
            mosaic.write(lambda im, p=path: formats.write_ome_tiff(
                im, p, pixel_size_um=um, compression=settings.tiff_compression,
                tile_size=tile_size, name=prefix), progress=report)
            outputs["ome_tiff"] = path
        elif fmt == "dzi":
            rendering.write(lambda im, p=path: formats.write_dzi(
                im, p, tile_size=tile_size, pixel_size_um=um), progress=report)
            outputs["dzi"] = path
            outputs["viewer"] = path.parent / formats.VIEWER_NAME
        elif fmt == "ome-zarr" and settings.scheduler:  # chunks written by the workers
            from .distributed import write_ome_zarr_on_cluster

            write_ome_zarr_on_cluster(settings.scheduler, mosaic, path, pixel_size_um=um,
                                      name=prefix, window=shown,
                                      ngff_version=settings.ngff_version, progress=report)
            outputs["ome_zarr"] = path
        elif fmt == "ome-zarr":
            mosaic.write(lambda im, p=path: formats.write_ome_zarr(
                im, p, pixel_size_um=um, name=prefix, window=shown,
                ngff_version=settings.ngff_version), progress=report)
            outputs["ome_zarr"] = path
        elif fmt == "pyramid-tiff":
            rendering.write(lambda im, p=path: formats.write_pyramid_tiff(
                im, p, pixel_size_um=um, tile_size=tile_size), progress=report)
            outputs["pyramid_tiff"] = path
    return outputs


def stitch(folder: Path | str, settings: StitchSettings | None = None, *,
           output_dir: Path | str | None = None, cache_dir: Path | str | None = None,
           progress: Progress = no_progress,
           ask_thresholds: Callable[[], tuple[float, float]] | None = None,
           backend: Backend | None = None) -> StitchResult:
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
        write_preview(scan, placement.positions_px, path,
                      flat=flatfield.resolve(settings.flat_field, scan.paths, scan.tile_shape))
        outputs["stage"] = path
        return StitchResult(None, outputs, placement.positions_px, [f.name for f in scan.files])

    if mode == "only-correlate":
        backend = backend or select_backend(settings.device)
        scan, graph = load_connected_scan(folder, settings)
        cache = CorrelationCache.load(cache_path(folder, cache_dir))
        if settings.placement == "robust":
            # Placing finds the extra pairs of tiles left in islands: correlate them too,
            # so that a later run correlates nothing. The local search (full resolution,
            # around the final stage model) is left to the run that places the tiles; it
            # caches its results too.
            register_scan(scan, graph, settings, backend, cache=cache, progress=progress,
                          search_locally=False)
        else:
            plan = plan_pairs(scan, graph, settings)
            correlate(scan, plan.stream_pairs, plan.stream_expected, settings, backend,
                      cache=cache, progress=progress)
        outputs["cache"] = cache.path
        return StitchResult(None, outputs, scan.stage_px - scan.stage_px.min(axis=0),
                            [f.name for f in scan.files])

    # Outputs are written together into a hidden folder and moved into place when all are
    # done: a failed run leaves the last good run's outputs as they were. (Manual
    # thresholds are asked after the correlation plot is drawn: it goes straight to out.)
    staging = atomic.output_set(out) if settings.thresholding != "manual" \
        else contextlib.nullcontext(out)
    with staging as stage, ThreadPoolExecutor(1, thread_name_prefix="ofstitch-plots") as plotter:
        reg = register(folder, settings, output_dir=stage, cache_dir=cache_dir, progress=progress,
                       ask_thresholds=ask_thresholds, backend=backend)
        # The plots (Python, matplotlib) are drawn while libvips' threads draw the mosaic.
        plotted = plotter.submit(write_plots, reg, stage)
        scan, positions = reg.scan, reg.positions_px
        names = reg.names
        config = stage / "OFMTileConfiguration.txt"
        formats.write_tile_configuration(config, names, positions)
        outputs["tile_configuration"] = config
        extra = {"camera_to_sample_matrix_suggested": reg.suggested_csm().round(6).tolist()}
        shown = rendering_levels(scan)
        flat = flatfield.resolve(settings.flat_field, scan.paths, scan.tile_shape)
        if not shown.identity:
            extra["display_range"] = [shown.low, shown.high]  # what 0-255 of the JPEG show

        wanted = ()
        size = render.make_layout(positions, scan.tile_shape).size
        if mode == "all":  # refuse an impossible JPEG before spending time on the mosaic
            wanted = full_resolution_formats(settings, size)
        preview_path = stage / settings.preview_name
        if "jpeg" in wanted:
            # The preview from the JPEG's bands: each tile decoded once for both.
            bands = preview.BandPreview(size, render.PREVIEW_WIDTH)
            outputs.update(write_full_resolution(scan, positions, stage, output_prefix(folder),
                                                 settings, wanted, extra=extra,
                                                 progress=progress, shown=shown, flat=flat,
                                                 on_band=bands.add))
            preview.write_jpeg(bands.image(), preview_path, scan, bands.scale, extra=extra)
        else:
            skip = write_preview(scan, positions, preview_path, extra=extra, shown=shown,
                                 flat=flat)
            if mode == "all":
                outputs.update(write_full_resolution(
                    scan, positions, stage, output_prefix(folder), settings, wanted,
                    extra=extra, skip=skip, progress=progress, shown=shown, flat=flat))
        outputs["preview"] = preview_path
        thumb = stage / "stitched_thumbnail.jpg"
        formats.write_thumbnail(preview_path, thumb)
        outputs["thumbnail"] = thumb
        outputs.update(plotted.result())
    outputs = {k: out / p.relative_to(stage) for k, p in outputs.items()}
    return StitchResult(reg, outputs, positions, names, describe_pixels(scan, shown, flat))
