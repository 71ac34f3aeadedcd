"""The ``ofstitch`` command line (typer).

``ofstitch [OPTIONS] FOLDER`` stitches a folder of tiles; ``ofstitch demo``
stitches a synthetic scan cut from the bundled sample image; ``ofstitch
devices`` lists the compute devices. A user error prints one line on stderr
and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from enum import Enum
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape

from . import __version__
from .backends import list_devices, select_backend
from .compat import HELP_LINE, rewrite_argv
from .console import (
    Reporter,
    ask_thresholds,
    cached_correlation,
    err_console,
    out_console,
    print_cached_settings,
    print_summary,
    raise_terminated,
    user_errors,
)
from .errors import OfstitchError
from .layout import grid_from_options
from .metadata import parse_csm
from .outfile import output_file_format, stitch_to_file
from .pipeline import StitchResult, stitch
from .scan import find_image_files
from .settings import (
    BLENDS,
    DEVICES,
    NGFF_VERSIONS,
    OUTPUT_FORMATS,
    PLACEMENT_METHODS,
    PRIORITIES,
    STITCHING_MODES,
    THRESHOLDING_METHODS,
    TIFF_COMPRESSIONS,
    CorrelationSettings,
    StitchSettings,
    WatchSettings,
    help_text,
)

COMMANDS = ("stitch", "watch", "batch", "demo", "devices")

app = typer.Typer(
    name="ofstitch",
    help="Stitch the overlapping tiles of a 2D microscope scan into one image.\n\n"
         "Usage: ofstitch [OPTIONS] FOLDER (the same as 'ofstitch stitch FOLDER'), "
         "'ofstitch watch FOLDER' (live preview while a scan is captured), "
         "'ofstitch demo' or 'ofstitch devices'.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice type for one of the choice sets of :mod:`ofstitch.settings`."""
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Mode = _choices("Mode", STITCHING_MODES)
PlacementChoice = _choices("PlacementChoice", PLACEMENT_METHODS)
ThresholdMethod = _choices("ThresholdMethod", THRESHOLDING_METHODS)
PriorityChoice = _choices("PriorityChoice", PRIORITIES)
FormatChoice = _choices("FormatChoice", OUTPUT_FORMATS)
BlendChoice = _choices("BlendChoice", BLENDS)
CompressionChoice = _choices("CompressionChoice", TIFF_COMPRESSIONS)
DeviceChoice = _choices("DeviceChoice", DEVICES)
NgffChoice = _choices("NgffChoice", NGFF_VERSIONS)
FinalMode = _choices("FinalMode", ("all", "preview"))


def _s(name: str) -> str:
    return help_text(StitchSettings, name)


def _c(name: str) -> str:
    return help_text(CorrelationSettings, name)


def _w(name: str) -> str:
    return help_text(WatchSettings, name)


@app.command("stitch", no_args_is_help=True, help="Stitch the tiles in FOLDER into one mosaic "
             "(ofstitch FOLDER does the same).\n\n" + HELP_LINE, epilog=(
    "Other commands: 'ofstitch watch FOLDER' (a live preview while a scan is captured; "
    "'ofstitch watch --help'), 'ofstitch batch FOLDER...' (many scans, locally or on a Dask "
    "cluster), 'ofstitch demo' (stitch a synthetic scan), 'ofstitch devices' (what can run "
    "the kernels), 'ofstitch --version'."))
def stitch_command(
    folder: Path = typer.Argument(..., help="The folder that holds the scan's tiles."),
    output_dir: Path | None = typer.Option(
        None, "-o", "--output-dir", help="Folder for the outputs, created if needed. Default: "
        "the scan folder. Input files are never modified. A file name ending in .jpg, "
        ".ome.tif(f), .ome.zarr or .dzi writes just the mosaic, to that file."),
    stitching_mode: Mode = typer.Option(Mode.all, "--stitching-mode", help=_s("stitching_mode")),
    device: DeviceChoice = typer.Option(DeviceChoice.cpu, "--device", help=_s("device")),
    show_cached_settings: bool = typer.Option(
        False, "--show-cached-settings", help="List the correlation settings cached for "
        "FOLDER and how many tiles each covers, then exit."),
    use_cached_settings: bool = typer.Option(
        False, "--use-cached-settings", help="Take the correlation settings (--pad, --resize, "
        "--high-pass-sigma, --corr-mask-radius, --search-margin) from the cache, unless "
        "given explicitly. Fails if the cache holds several sets."),
    csm_matrix: str | None = typer.Option(None, "--csm-matrix", help=_s("csm_matrix")),
    csm_calibration_width: int | None = typer.Option(
        None, "--csm-calibration-width", help=_s("csm_calibration_width")),
    image_count: int | None = typer.Option(None, "--image-count", help=_s("image_count")),
    layout: Path | None = typer.Option(None, "--layout", help=_s("layout")),
    grid: str | None = typer.Option(None, "--grid", help=_s("grid")),
    grid_order: str | None = typer.Option(
        None, "--grid-order", help="With --grid: 'row' (row by row, the default), 'column', "
        "'snake-row' or 'snake-column' (every other row or column reversed), from the "
        "top-left tile."),
    grid_overlap: float | None = typer.Option(
        None, "--grid-overlap", help="With --grid: the nominal overlap of neighbouring tiles, "
        "a fraction of the tile size (default 0.2, as in Fiji); correlation finds the "
        "exact shifts."),
    placement: PlacementChoice = typer.Option(PlacementChoice.robust, "--placement",
                                              help=_s("placement")),
    thresholding: ThresholdMethod = typer.Option(
        ThresholdMethod.automatic, "--thresholding", "--thresholding-method",
        help=_s("thresholding")),
    max_stage_discrepancy: float | None = typer.Option(
        None, "--max-stage-discrepancy", help=_s("max_stage_discrepancy")),
    min_peak_quality: float | None = typer.Option(
        None, "--min-peak-quality", help=_s("min_peak_quality")),
    pad: bool | None = typer.Option(None, "--pad/--no-pad", show_default=False,
                                    help=_c("pad") + " [default: --pad]"),
    high_pass_sigma: float | None = typer.Option(
        None, "--high-pass-sigma", help=_c("high_pass_sigma") + " [default: 10]"),
    resize: float | None = typer.Option(None, "--resize", help=_c("resize") + " [default: 1]"),
    minimum_overlap: float | None = typer.Option(None, "--minimum-overlap",
                                                 help=_s("minimum_overlap")),
    priority: PriorityChoice = typer.Option(PriorityChoice.time, "--priority",
                                            help=_s("priority")),
    corr_mask_radius: float | None = typer.Option(
        None, "--corr-mask-radius", help=_c("corr_mask_radius")),
    search_margin: float | None = typer.Option(
        None, "--search-margin", help=_c("search_margin")),
    output_format: list[FormatChoice] | None = typer.Option(
        None, "--format", "-f", help=_s("formats") + " [default: jpeg]", show_default=False),
    blend: BlendChoice = typer.Option(BlendChoice.none, "--blend", help=_s("blend")),
    tiff_compression: CompressionChoice = typer.Option(
        CompressionChoice.jpeg, "--tiff-compression", help=_s("tiff_compression")),
    ngff_version: NgffChoice = typer.Option(NGFF_VERSIONS[0], "--ngff-version",
                                            help=_s("ngff_version")),
    flat_field: str | None = typer.Option(None, "--flat-field", metavar="auto|FILE",
                                          help=_s("flat_field")),
    stitch_tiff: bool = typer.Option(False, "--stitch-tiff/--no-stitch-tiff",
                                     help=_s("stitch_tiff")),
    stitch_dzi: bool = typer.Option(False, "--stitch-dzi/--no-stitch-dzi",
                                    help=_s("stitch_dzi")),
    tile_size: int | None = typer.Option(None, "--tile-size", help=_s("tile_size")),
    preview_name: str = typer.Option("preview.jpg", "--preview-name", help=_s("preview_name"),
                                     hidden=True),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Keep the correlation cache in this folder instead of the "
        "scan folder (for read-only scans)."),
    device_memory: str | None = typer.Option(None, "--device-memory",
                                             help=_s("device_memory")),
    workers: int | None = typer.Option(None, "--workers", help=_s("workers")),
    scheduler: str | None = typer.Option(None, "--scheduler", envvar="OFSTITCH_SCHEDULER",
                                         help=_s("scheduler")),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars or summary."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Stitch the tiles in FOLDER into one mosaic (ofstitch FOLDER does the same)."""
    with user_errors(debug):
        if show_cached_settings:
            print_cached_settings(folder, cache_dir)
            return
        base = cached_correlation(folder, cache_dir) if use_cached_settings else \
            CorrelationSettings()
        correlation = CorrelationSettings(
            pad=base.pad if pad is None else pad,
            resize=base.resize if resize is None else resize,
            high_pass_sigma=base.high_pass_sigma if high_pass_sigma is None else high_pass_sigma,
            corr_mask_radius=base.corr_mask_radius if corr_mask_radius is None
            else corr_mask_radius,
            search_margin=base.search_margin if search_margin is None else search_margin)
        settings = StitchSettings(
            correlation=correlation, minimum_overlap=minimum_overlap,
            csm_matrix=parse_csm(csm_matrix) if csm_matrix is not None else None,
            csm_calibration_width=csm_calibration_width, image_count=image_count,
            layout=None if layout is None else str(layout),
            grid=grid_from_options(grid, grid_order, grid_overlap), placement=placement.value,
            thresholding=thresholding.value, min_peak_quality=min_peak_quality,
            max_stage_discrepancy=max_stage_discrepancy, priority=priority.value,
            stitching_mode=stitching_mode.value, stitch_tiff=stitch_tiff,
            formats=tuple(f.value for f in output_format) if output_format else ("jpeg",),
            blend=blend.value, tiff_compression=tiff_compression.value,
            stitch_dzi=stitch_dzi, tile_size=tile_size, device=device.value, workers=workers,
            device_memory=device_memory, preview_name=preview_name,
            scheduler=scheduler or None, ngff_version=NgffChoice(ngff_version).value,
            flat_field=flat_field)
        if device == DeviceChoice.auto and not quiet:
            err_console.print(f"Using {select_backend('auto').describe()}", highlight=False,
                              markup=False)
        start = time.perf_counter()
        reporter = Reporter(enabled=not quiet and err_console.is_terminal, quiet=quiet)
        to_file = output_file_format(output_dir) is not None
        with reporter.progress:
            if to_file:
                result = stitch_to_file(folder, settings, output_dir, cache_dir=cache_dir,
                                        progress=reporter, ask_thresholds=ask_thresholds)
            else:
                result = stitch(folder, settings, output_dir=output_dir, cache_dir=cache_dir,
                                progress=reporter, ask_thresholds=ask_thresholds)
        if not quiet:
            print_summary(result, time.perf_counter() - start)


@app.command("watch", no_args_is_help=True)
def watch_command(
    folder: Path = typer.Argument(..., help="The folder the microscope writes the tiles into."),
    output_dir: Path | None = typer.Option(
        None, "-o", "--output-dir", help="Folder for preview.jpg and the final outputs, "
        "created if needed. Default: the scan folder. Input files are never modified."),
    settle_time: float = typer.Option(WatchSettings.settle_time, "--settle-time",
                                      help=_w("settle_time")),
    idle_timeout: float | None = typer.Option(None, "--idle-timeout", help=_w("idle_timeout")),
    final: bool = typer.Option(False, "--final", help=_w("final")),
    dzi: bool = typer.Option(False, "--dzi", help=_w("dzi")),
    preview_width: int = typer.Option(WatchSettings.preview_width, "--preview-width",
                                      help=_w("preview_width")),
    polling: bool = typer.Option(False, "--polling", help=_w("polling")),
    stitching_mode: FinalMode = typer.Option(
        FinalMode.all, "--stitching-mode", help="With --final: 'all' writes the full-resolution "
        "mosaic and everything else, 'preview' the same without the full-resolution images."),
    device: DeviceChoice = typer.Option(DeviceChoice.cpu, "--device", help=_s("device")),
    csm_matrix: str | None = typer.Option(None, "--csm-matrix", help=_s("csm_matrix")),
    csm_calibration_width: int | None = typer.Option(
        None, "--csm-calibration-width", help=_s("csm_calibration_width")),
    placement: PlacementChoice = typer.Option(PlacementChoice.robust, "--placement",
                                              help=_s("placement")),
    max_stage_discrepancy: float | None = typer.Option(
        None, "--max-stage-discrepancy", help=_s("max_stage_discrepancy")),
    min_peak_quality: float | None = typer.Option(
        None, "--min-peak-quality", help=_s("min_peak_quality")),
    pad: bool = typer.Option(True, "--pad/--no-pad", help=_c("pad")),
    high_pass_sigma: float = typer.Option(10.0, "--high-pass-sigma", help=_c("high_pass_sigma")),
    resize: float = typer.Option(1.0, "--resize", help=_c("resize")),
    minimum_overlap: float | None = typer.Option(None, "--minimum-overlap",
                                                 help=_s("minimum_overlap")),
    corr_mask_radius: float | None = typer.Option(
        None, "--corr-mask-radius", help=_c("corr_mask_radius")),
    search_margin: float = typer.Option(CorrelationSettings().search_margin, "--search-margin",
                                        help=_c("search_margin")),
    priority: PriorityChoice = typer.Option(PriorityChoice.time, "--priority",
                                            help=_s("priority")),
    stitch_tiff: bool = typer.Option(False, "--stitch-tiff/--no-stitch-tiff",
                                     help=_s("stitch_tiff") + " (with --final)"),
    tile_size: int | None = typer.Option(None, "--tile-size", help=_s("tile_size")),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Keep the correlation cache in this folder instead of the "
        "scan folder (for read-only scans)."),
    device_memory: str | None = typer.Option(None, "--device-memory",
                                             help=_s("device_memory")),
    workers: int | None = typer.Option(None, "--workers", help=_s("workers")),
    scheduler: str | None = typer.Option(None, "--scheduler", envvar="OFSTITCH_SCHEDULER",
                                         help=_s("scheduler")),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress lines or summary."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Follow a scan while it is captured: rewrite preview.jpg as each tile arrives.

    Stops on Ctrl-C or after --idle-timeout, leaving the correlation cache valid
    (a later 'ofstitch FOLDER' correlates nothing again).
    """
    import signal
    import threading

    from .live import watch

    with user_errors(debug):
        options = WatchSettings(settle_time=settle_time, idle_timeout=idle_timeout,
                                preview_width=preview_width, final=final, dzi=dzi,
                                polling=polling)
        correlation = CorrelationSettings(pad=pad, resize=resize, high_pass_sigma=high_pass_sigma,
                                          corr_mask_radius=corr_mask_radius,
                                          search_margin=search_margin)
        settings = StitchSettings(
            correlation=correlation, minimum_overlap=minimum_overlap,
            csm_matrix=parse_csm(csm_matrix) if csm_matrix is not None else None,
            csm_calibration_width=csm_calibration_width, placement=placement.value,
            min_peak_quality=min_peak_quality, max_stage_discrepancy=max_stage_discrepancy,
            priority=priority.value, stitching_mode=stitching_mode.value,
            stitch_tiff=stitch_tiff, stitch_dzi=dzi, tile_size=tile_size, device=device.value,
            workers=workers, device_memory=device_memory, scheduler=scheduler or None)
        stop = threading.Event()

        def request_stop(signum, frame) -> None:
            if stop.is_set():  # a second Ctrl-C: stop now (the cache journal stays valid)
                raise KeyboardInterrupt
            stop.set()
            if not quiet:
                err_console.print("Stopping (Ctrl-C again to stop at once) ...", markup=False)

        previous = {sig: signal.signal(sig, request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_update(update, seconds: float) -> None:
            if quiet:
                return
            joined = "" if update.n_components == 1 else \
                f", {update.n_components} separate groups (placed by the stage)"
            err_console.print(
                f"{time.strftime('%H:%M:%S')} {update.n_tiles} tiles, {update.n_pairs} pairs "
                f"({update.n_correlated} correlated now){joined}; preview written in "
                f"{seconds:.2f} s", highlight=False, markup=False)

        if not quiet:
            err_console.print(f"Watching {folder} (Ctrl-C to stop) ...", markup=False)
        reporter = Reporter(enabled=not quiet and err_console.is_terminal, quiet=quiet)
        try:
            with reporter.progress:
                result = watch(folder, settings, options, output_dir=output_dir,
                               cache_dir=cache_dir, stop=stop, on_update=on_update,
                               progress=reporter)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not quiet:
            why = "no new file for --idle-timeout" if result.reason == "idle" else "stopped"
            out_console.print(f"Watched {result.n_tiles} tiles ({why}).", highlight=False)
            if isinstance(result.final, StitchResult):
                print_summary(result.final, result.final_seconds)


@app.command("batch", no_args_is_help=True)
def batch_command(
    folders: list[Path] = typer.Argument(..., help="Scan folders (a shell glob such as "
                                         "'scans/*' gives many)."),
    output_dir: Path | None = typer.Option(
        None, "-o", "--output-dir", help="Write each scan's outputs into OUTPUT_DIR/<name of "
        "the scan folder>. Default: each scan's own folder."),
    jobs: int = typer.Option(1, "-j", "--jobs", min=1, max=256,
                             help="Scans stitched at once on this machine (processes)."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", envvar="OFSTITCH_SCHEDULER", help="Address of a Dask scheduler: "
        "each scan is stitched by one of its workers (the scans must be on a file system "
        "the workers share). Default: this machine, --jobs at a time."),
    stitching_mode: Mode = typer.Option(Mode.all, "--stitching-mode", help=_s("stitching_mode")),
    output_format: list[FormatChoice] | None = typer.Option(
        None, "--format", "-f", help=_s("formats") + " [default: jpeg]", show_default=False),
    placement: PlacementChoice = typer.Option(PlacementChoice.robust, "--placement",
                                              help=_s("placement")),
    minimum_overlap: float | None = typer.Option(None, "--minimum-overlap",
                                                 help=_s("minimum_overlap")),
    search_margin: float = typer.Option(CorrelationSettings().search_margin, "--search-margin",
                                        help=_c("search_margin")),
    device: DeviceChoice = typer.Option(DeviceChoice.cpu, "--device", help=_s("device")),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only the table at the end."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Stitch many scans, each as 'ofstitch FOLDER' would: a line per scan as it finishes and
    a table at the end. One failing scan does not stop the others; the exit code is 2 when
    any failed."""
    from rich.table import Table

    from .distributed import stitch_many

    with user_errors(debug):
        settings = StitchSettings(
            correlation=CorrelationSettings(search_margin=search_margin),
            minimum_overlap=minimum_overlap, placement=placement.value,
            stitching_mode=stitching_mode.value, device=device.value,
            formats=tuple(f.value for f in output_format) if output_format else ("jpeg",))
        outcomes = []
        for outcome in stitch_many(folders, settings, output_root=output_dir, jobs=jobs,
                                   scheduler=scheduler or None):
            outcomes.append(outcome)
            if not quiet:
                what = f"{outcome.n_tiles} tiles" if outcome.ok else f"failed: {outcome.error}"
                out_console.print(f"{outcome.folder}: {what} ({outcome.seconds:.1f} s)",
                                  highlight=False, markup=False)
        table = Table("scan", "result", "tiles", "seconds", title="ofstitch batch")
        for o in sorted(outcomes, key=lambda o: str(o.folder)):
            table.add_row(str(o.folder), "ok" if o.ok else f"failed: {o.error}",
                          str(o.n_tiles) if o.ok else "", f"{o.seconds:.1f}")
        out_console.print(table)
        failed = sum(not o.ok for o in outcomes)
        if failed:
            err_console.print(f"ofstitch: {failed} of {len(outcomes)} scans failed",
                              highlight=False, markup=False)
            raise typer.Exit(2)


@app.command("demo")
def demo_command(
    output: Path = typer.Option(Path("ofstitch-demo"), "-o", "--output",
                                help="Folder to write the demo scan and its mosaic into."),
    device: DeviceChoice = typer.Option(DeviceChoice.cpu, "--device", help=_s("device")),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Cut a synthetic 28-tile scan from the bundled H&E sample, stitch it, and report accuracy."""
    from .synthetic import make_scan, pair_errors, textured_pairs

    with user_errors(debug):
        scan_dir = output / "demo-scan"
        if scan_dir.exists() and any(find_image_files(scan_dir)):
            err_console.print(f"Reusing the demo scan in {scan_dir}", markup=False)
        else:
            err_console.print(f"Writing a synthetic 7x4 scan to {scan_dir} ...", markup=False)
        synth = make_scan(scan_dir, grid=(7, 4), tile_shape=(300, 400), overlap=0.3,
                          stage_error_px=4.0, rotation_deg=0.7, seed=1)
        settings = StitchSettings(device=device.value)
        start = time.perf_counter()
        reporter = Reporter(enabled=not quiet and err_console.is_terminal, quiet=quiet)
        with reporter.progress:
            result = stitch(scan_dir, settings, output_dir=output, progress=reporter)
        print_summary(result, time.perf_counter() - start)
        reg = result.registration
        order = [synth.names.index(n) for n in reg.names]
        errors = pair_errors(reg.positions_px, synth.truth_px[order], reg.graph.pairs)
        textured = textured_pairs(synth, np.asarray(order)[reg.graph.pairs])
        if textured.any():
            out_console.print(
                f"Accuracy against the ground truth, {textured.sum()} pairs with texture: "
                f"max {errors[textured].max():.2f} px, RMS "
                f"{np.sqrt(np.mean(errors[textured] ** 2)):.2f} px.", highlight=False)
        out_console.print(f"Open {result.outputs['preview']} to see the mosaic.",
                          highlight=False, markup=False)


@app.command("devices")
def devices_command() -> None:
    """List the compute devices ofstitch can use, with GPU names and free memory."""
    for line in list_devices():
        out_console.print(line, highlight=False, markup=False)


@app.command("version", hidden=True)
def version_command() -> None:
    """Print the version."""
    out_console.print(__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``ofstitch FOLDER`` means ``ofstitch stitch FOLDER``."""
    import pyvips

    from .allocator import tune_malloc

    # Bounded memory for the streamed mosaic: no operation cache (it would keep
    # up to 100 tiles open); few malloc arenas, and freed tiles reused (allocator).
    pyvips.cache_set_max(0)
    tune_malloc()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-V", "--version"):
        args = ["version"]
    elif args in (["-h"], ["--help"]):
        # The default command's options, with the other commands listed in its help.
        args = ["stitch", "--help"]
    elif args and args[0] not in COMMANDS + ("version",):
        args.insert(0, "stitch")
    # SIGTERM unwinds like Ctrl-C (temporaries removed, exit 143); ofstitch watch sets its own.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        code = _run(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def _run(args: list[str]) -> int:
    """Run the app on ``args`` (openflexure-stitch spellings accepted); returns the exit code.

    A usage error (an unknown option, a wrong value) is one line on stderr, exit code 2.
    """
    try:
        args = rewrite_argv(args)
    except OfstitchError as exc:
        err_console.print(f"[red]ofstitch: error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="ofstitch", standalone_mode=False)
    except typer.Abort:
        err_console.print("Aborted!", markup=False)
        return 1
    except typer.exceptions.TyperException as exc:  # click's usage errors
        if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message"):
            exc.show()
            return getattr(exc, "exit_code", 2)
        message = exc.format_message().replace("Value error, ", "")
        if type(exc).__name__ == "NoSuchOption" and "Possible options" not in message:
            message += f" (see '{exc.ctx.command_path if exc.ctx else 'ofstitch'} --help')"
        err_console.print(f"[red]ofstitch: error:[/red] {escape(message)}", highlight=False)
        return getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
