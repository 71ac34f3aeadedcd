"""Diagnostic plots: the scan's inputs and the pair correlations (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def _figure(figsize: tuple[float, float]):
    """A figure on the Agg canvas, without pyplot (no global state, faster import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)


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
    ax.set_title(f"{len(stage_px)} tiles, {0 if pairs is None else len(pairs)} overlapping pairs")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path, dpi=100, bbox_inches="tight")


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
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("1 - peak quality (left is a sharper peak)")
    ax.set_ylabel("|correlation shift - stage shift| / px (lower agrees with the stage)")
    ax.set_title("Pair correlations")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path, dpi=100, bbox_inches="tight")
