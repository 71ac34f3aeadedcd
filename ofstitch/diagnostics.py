"""Diagnostic plots: the scan's inputs and the pair correlations (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

# Fixed margins: measuring the text to fit them (``bbox_inches="tight"``,
# ``tight_layout``) lays out and draws every label twice, most of a plot's time.
MARGINS = {"left": 0.09, "right": 0.97, "bottom": 0.1, "top": 0.93, "wspace": 0.25}
# Titles at the axes' top (no tick labels are there): placed automatically, each title
# measures every tick label to clear them, a third of a plot's time.
TITLE = {"y": 1.0}


def _figure(figsize: tuple[float, float], **subplots):
    """A figure on the Agg canvas, without pyplot (no global state, faster import), and
    its axes (``fig.subplots(**subplots)``: one by default)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**MARGINS)
    return fig, fig.subplots(**subplots)


def _log_scale(ax, which: str) -> None:
    """A log scale on axis ``which`` ("x" or "y") of ``ax``, labelled with plain numbers
    (0.01, 100) at the decades: matplotlib's default labels are math text, whose parser
    takes a sixth of the plots' time to set up."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path, **kwargs) -> None:
    # zlib level 1: the plots are small, and level 6 takes a third of their time.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, pil_kwargs={"compress_level": 1}, **kwargs)


def plot_inputs(path: Path, stage_px: np.ndarray, tile_shape: tuple[int, int],
                pairs: np.ndarray | None = None) -> None:
    """``stitching_inputs.png``: tile footprints at stage positions, capture path and pairs."""
    from matplotlib.collections import LineCollection, PatchCollection
    from matplotlib.patches import Rectangle

    fig, ax = _figure(figsize=(10, 8))
    th, tw = tile_shape
    ax.add_collection(PatchCollection(
        [Rectangle((col, row), tw, th) for row, col in stage_px], facecolor="tab:blue",
        alpha=0.12, edgecolor="tab:blue", linewidth=0.8))
    centres = stage_px + np.array([th, tw]) / 2
    if pairs is not None and len(pairs):
        segments = np.stack([centres[pairs[:, 0]][:, ::-1], centres[pairs[:, 1]][:, ::-1]], 1)
        ax.add_collection(LineCollection(segments, colors="0.7", linewidths=0.6, zorder=1))
    ax.plot(centres[:, 1], centres[:, 0], "-o", color="tab:orange", markersize=2.5,
            linewidth=1, label="capture order", zorder=2)
    ax.plot(centres[:1, 1], centres[:1, 0], "s", color="tab:red", label="first tile", zorder=3)
    ax.set_xlim(stage_px[:, 1].min() - 0.1 * tw, stage_px[:, 1].max() + 1.1 * tw)
    ax.set_ylim(stage_px[:, 0].max() + 1.1 * th, stage_px[:, 0].min() - 0.1 * th)
    ax.set_aspect("equal")
    ax.set_xlabel("column / px (stage prediction)")
    ax.set_ylabel("row / px (stage prediction)")
    ax.set_title(f"{len(stage_px)} tiles, {0 if pairs is None else len(pairs)} overlapping pairs",
                 **TITLE)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path, dpi=100)


def plot_correlations(path: Path, quality: np.ndarray, discrepancy: np.ndarray,
                      accepted: np.ndarray | None = None,
                      min_peak_quality: float | None = None,
                      max_stage_discrepancy: float | None = None) -> None:
    """``stitching_correlations.png``: peak quality against stage discrepancy, per pair.

    The x axis is ``1 - peak quality`` on a log scale (sharper peaks to the left),
    because qualities crowd just below 1.
    """
    fig, ax = _figure(figsize=(9, 6))
    ok = np.isfinite(quality) & np.isfinite(discrepancy)
    x = np.clip(1 - quality[ok], 1e-7, 1)
    y = np.clip(discrepancy[ok], 1e-2, None)
    if accepted is None:
        ax.scatter(x, y, s=12, color="tab:blue", label="pairs")
    else:
        acc = accepted[ok]
        ax.scatter(x[acc], y[acc], s=12, color="tab:green", label=f"used ({acc.sum()})")
        ax.scatter(x[~acc], y[~acc], s=12, color="tab:red",
                   label=f"stage only ({(~acc).sum()})")
    if min_peak_quality is not None:
        ax.axvline(max(1 - min_peak_quality, 1e-7), color="k", linestyle="--", linewidth=1,
                   label=f"min peak quality {min_peak_quality:.6f}")
    if max_stage_discrepancy is not None:
        ax.axhline(max(max_stage_discrepancy, 1e-2), color="k", linestyle=":", linewidth=1,
                   label=f"max stage discrepancy {max_stage_discrepancy:.1f} px")
    _log_scale(ax, "x")
    _log_scale(ax, "y")
    ax.set_xlabel("1 - peak quality (left is a sharper peak)")
    ax.set_ylabel("|correlation shift - stage shift| / px (lower agrees with the stage)")
    ax.set_title("Pair correlations", **TITLE)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path, dpi=100)


def plot_placement(path: Path, placement, quality: np.ndarray, discrepancy: np.ndarray) -> None:
    """``stitching_correlations.png`` for the placement that was made.

    Robust placement: each pair's score (overlap NCC of its chosen peak) against the
    chance level (what tiles that do not overlap score), the threshold, how each pair
    was used, and the placement's report in plain words. Reference placement:
    :func:`plot_correlations`.
    """
    if placement.method != "robust" or placement.score is None:
        plot_correlations(path, quality, discrepancy, placement.accepted,
                          placement.min_peak_quality, placement.max_stage_discrepancy)
        return
    from .place import RESEARCHED, STAGE_ONLY, TRUSTED

    fig, (ax_hist, ax_scatter) = _figure((11, 5.5), ncols=2,
                                         gridspec_kw={"width_ratios": [1, 1.3]})
    score = np.nan_to_num(placement.score, nan=-1.0)
    null = placement.null_score[np.isfinite(placement.null_score)] \
        if placement.null_score is not None else np.zeros(0)
    bins = np.linspace(-0.2, 1.0, 49)
    if len(null):
        ax_hist.hist(np.clip(null, -0.2, 1), bins=bins, density=True, histtype="stepfilled",
                     color="0.6", alpha=0.8,
                     label=f"chance level: tiles that do not overlap ({len(null)})")
    ax_hist.hist(np.clip(score, -0.2, 1), bins=bins, density=True, histtype="step",
                 color="tab:blue", linewidth=1.5, label=f"overlapping pairs ({len(score)})")
    ax_hist.axvline(placement.score_threshold, color="k", linestyle="--", linewidth=1,
                    label=f"chance level {placement.score_threshold:.2f}")
    ax_hist.set_xlabel("score: NCC of the overlap at the chosen peak")
    ax_hist.set_ylabel("density")
    ax_hist.set_title("Scores against chance", **TITLE)
    ax_hist.legend(loc="upper left", fontsize=8)
    status = placement.status
    styles = [(TRUSTED, "tab:green", "trusted"), (RESEARCHED, "tab:orange",
                                                  "re-searched near the stage"),
              (STAGE_ONLY, "tab:red", "placed by stage only")]
    y = np.clip(np.nan_to_num(discrepancy, nan=1e4), 1e-2, 1e4)
    for value, colour, label in styles:
        sel = status == value
        ax_scatter.scatter(score[sel], y[sel], s=12, color=colour,
                           label=f"{label} ({int(sel.sum())})")
    ax_scatter.axvline(placement.score_threshold, color="k", linestyle="--", linewidth=1)
    _log_scale(ax_scatter, "y")
    ax_scatter.set_xlabel("score (best peak)")
    ax_scatter.set_ylabel("|highest peak shift - stage shift| / px")
    ax_scatter.set_title(f"Pairs (stage repeatability {placement.stage_sigma_px:.1f} px)", **TITLE)
    ax_scatter.legend(loc="best", fontsize=8)
    report = getattr(placement, "report", None)
    if report is not None:
        lines = report.lines()
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, va="bottom", wrap=True,
                 color="tab:red" if report.doubtful else "0.2")
        fig.subplots_adjust(bottom=0.1 + 0.03 * (len(lines) + 1))
    _save(fig, path, dpi=100)


def plot_residuals(path: Path, placement, pairs: np.ndarray, tile_shape: tuple[int, int]
                   ) -> None:
    """``stitching_residuals.png``: each pair's final residual, drawn on the mosaic layout.

    A pair is a segment between its tiles' centres at their final positions: colour
    is the residual ``|x_b - x_a - shift|`` of the pairs that were used (green to
    red, clipped at 3 px); pairs placed by the stage alone are thin grey lines.
    """
    from matplotlib.collections import LineCollection

    fig, ax = _figure(figsize=(10, 8))
    th, tw = tile_shape
    pos = placement.positions_px
    centres = pos + np.array([th, tw]) / 2
    ax.scatter(centres[:, 1], centres[:, 0], s=4, color="0.3", zorder=3)
    if len(pairs) and placement.residual_px is not None:
        segments = np.stack([centres[pairs[:, 0]][:, ::-1], centres[pairs[:, 1]][:, ::-1]], 1)
        used = placement.accepted
        if (~used).any():
            ax.add_collection(LineCollection(segments[~used], colors="0.75", linewidths=0.6,
                                             linestyles="dashed", zorder=1,
                                             label=f"placed by stage only "
                                                   f"({int((~used).sum())})"))
        if used.any():
            lines = LineCollection(segments[used], cmap="RdYlGn_r", linewidths=2, zorder=2)
            lines.set_array(np.clip(placement.residual_px[used], 0, 3))
            lines.set_clim(0, 3)
            ax.add_collection(lines)
            fig.colorbar(lines, ax=ax, label="residual / px (used pairs)", shrink=0.8)
    ax.set_xlim(pos[:, 1].min() - 0.1 * tw, pos[:, 1].max() + 1.1 * tw)
    ax.set_ylim(pos[:, 0].max() + 1.1 * th, pos[:, 0].min() - 0.1 * th)
    ax.set_aspect("equal")
    ax.set_xlabel("column / px")
    ax.set_ylabel("row / px")
    ax.set_title(f"Pair residuals at the final positions (RMS {placement.rms_error_px:.2f} px)",
                 **TITLE)
    _save(fig, path, dpi=100)
