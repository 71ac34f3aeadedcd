"""What the command line shows: progress, warnings and errors as one line each, summaries.

Used by :mod:`ofstitch.cli`; the library itself prints nothing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .cache import CorrelationCache, cache_path
from .compat import ProgressLines
from .errors import OfstitchError, OfstitchWarning, SettingError
from .pipeline import StitchResult
from .scan import load_scan, require_folder
from .settings import CorrelationSettings


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: unwinds like Ctrl-C (temporary files removed,
    the cache journal kept) and exits with 143."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler for the command line."""
    raise Terminated()


err_console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


class Reporter:
    """Progress of the pipeline's stages: bars on a terminal (stderr), and plain lines on
    stdout when it is not a terminal (a log that a program such as the OpenFlexure server
    reads line by line); silent with --quiet."""

    LABELS = {"correlate": "Correlating pairs", "preview": "Rendering preview",
              "render": "Rendering mosaic", "write-jpeg": "Writing JPEG",
              "write-ome-tiff": "Writing OME-TIFF", "write-dzi": "Writing DZI",
              "write-ome-zarr": "Writing OME-Zarr"}

    def __init__(self, enabled: bool, *, quiet: bool = False) -> None:
        self.progress = Progress(TextColumn("{task.description:<20}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=err_console, disable=not enabled, transient=False)
        self.tasks: dict[str, int] = {}
        self.lines = None if quiet or out_console.is_terminal else ProgressLines(
            lambda line: out_console.print(line, markup=False, highlight=False))

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.lines is not None:
            self.lines(self.LABELS.get(stage, stage), done, total)
        if stage not in self.tasks:
            if total == 0:
                return
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage),
                                                       total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, OfstitchWarning):
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)
    else:
        err_console.print(f"warning: {category.__name__}: {escape(str(message))}",
                          highlight=False)


@contextlib.contextmanager
def user_errors(debug: bool):
    """The CLI's scope: warnings as one line each, ofstitch's log on stderr, and user errors
    as one line on stderr with exit code 2. Everything it changes is restored on exit."""
    shown, handler = warnings.showwarning, logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = {name: logging.getLogger(name) for name in ("ofstitch", "pyvips")}
    levels = {name: lg.level for name, lg in loggers.items()}
    warnings.showwarning = warning_line
    loggers["ofstitch"].addHandler(handler)
    loggers["ofstitch"].setLevel(logging.DEBUG if debug else logging.WARNING)
    # libvips reports every decoding problem and write failure itself; our one line says it.
    loggers["pyvips"].setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        yield
    except OfstitchError as exc:
        if debug:
            raise
        message = exc.for_cli() if isinstance(exc, SettingError) else str(exc)
        err_console.print(f"[red]ofstitch: error:[/red] {escape(message)}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:
        what = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        err_console.print(f"ofstitch: {what}; the cache keeps the pairs already done",
                          highlight=False, markup=False)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    except MemoryError:
        if debug:
            raise
        err_console.print("[red]ofstitch: error:[/red] out of memory: try --priority memory, "
                          "--resize 0.5 or --stitching-mode preview")
        raise typer.Exit(2) from None
    finally:
        warnings.showwarning = shown
        loggers["ofstitch"].removeHandler(handler)
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


def ask_thresholds() -> tuple[float, float]:
    err_console.print("Look at stitching_correlations.png, then give the two thresholds.")
    q = typer.prompt("Minimum peak quality (0-1)", type=float)
    d = typer.prompt("Maximum stage discrepancy (px)", type=float)
    return q, d


def print_cached_settings(folder: Path, cache_dir: Path | None) -> None:
    require_folder(folder)
    cache = CorrelationCache.load(cache_path(folder, cache_dir))
    keys = None
    with contextlib.suppress(OfstitchError):
        keys = [f.key for f in load_scan(folder).files]
    summary = cache.settings_summary(keys)
    if not summary:
        out_console.print(f"No cached correlation settings found in '{folder}'", markup=False)
        return
    out_console.print(f"Found {len(summary)} set(s) of cached correlation settings in "
                      f"'{folder}':", markup=False)
    for i, (settings, covered) in enumerate(summary):
        diffs = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.non_default().items())
        total = f"/{len(keys)}" if keys is not None else ""
        incomplete = " - incomplete" if keys is not None and covered < len(keys) else ""
        out_console.print(f"  [{i}] {diffs or '(no non-default settings)'}  "
                          f"({covered}{total} images{incomplete})", highlight=False,
                          markup=False)
    if len(summary) > 1:
        out_console.print("--use-cached-settings will fail: there are several sets")


def cached_correlation(folder: Path, cache_dir: Path | None) -> CorrelationSettings:
    summary = CorrelationCache.load(cache_path(folder, cache_dir)).settings_summary()
    if not summary:
        raise OfstitchError(f"no cached correlation settings in '{folder}', so "
                            "--use-cached-settings cannot be used: drop it")
    if len(summary) > 1:
        raise OfstitchError(f"{len(summary)} sets of cached correlation settings in '{folder}',"
                            " so --use-cached-settings is ambiguous: see "
                            "--show-cached-settings and give the settings explicitly")
    return summary[0][0]


def print_summary(result: StitchResult, seconds: float) -> None:
    reg = result.registration
    if reg is not None:
        p = reg.placement
        m = len(reg.graph.pairs)
        c = p.counts()
        out_console.print(
            f"Placed {len(reg.names)} tiles from {m} pairs ({reg.n_correlated} correlated "
            f"now, {reg.n_cached} from the cache; {c.trusted} trusted, "
            f"{c.researched} re-searched, {c.stage_only} placed by stage only) on "
            f"{reg.device}.", highlight=False)
        if m and p.method == "robust":
            out_console.print(
                f"Robust placement: score (overlap NCC) > {p.score_threshold:.3f} (chance "
                f"level of this scan), stage repeatability {p.stage_sigma_px:.1f} px; RMS "
                f"residual {p.rms_error_px:.2f} px.", highlight=False)
            for line in (p.report.lines() if p.report is not None else []):  # issue 14
                out_console.print(line, highlight=False)
        elif m:
            out_console.print(
                f"Thresholds: peak quality >= {p.min_peak_quality:.6f}, stage discrepancy <= "
                f"{p.max_stage_discrepancy:.1f} px; RMS residual {p.rms_error_px:.2f} px.",
                highlight=False)
            csm = np.array2string(reg.suggested_csm(), precision=5, separator=", ",
                                  suppress_small=True).replace("\n", "")
            width = reg.scan.csm_calibration_width
            also = f" --csm-calibration-width {width}" if width else ""
            out_console.print(f"Suggested --csm-matrix '{csm}'{also}", highlight=False,
                              markup=False)
    if result.pixels:  # what the outputs hold (issue 17)
        out_console.print(result.pixels, highlight=False, markup=False)
    for kind, path in result.outputs.items():
        out_console.print(f"  {kind:<20} {path}", highlight=False, markup=False)
    out_console.print(f"Done in {seconds:.1f} s.", highlight=False)
