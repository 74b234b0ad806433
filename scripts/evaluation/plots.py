"""The pictures of an evaluation: ROC curves with operating points, normal-vs-abnormal score distributions, and
held-out specificity against its target."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_auc_score, roc_curve

from scripts.data import io
from scripts.evaluation.metrics import Series, as_series

logger = logging.getLogger(__name__)

TRIVIAL_PREFIX = "trivial_"
DPI = 150
POINT_STYLE = {"marker": "o", "markersize": 7, "markeredgecolor": "black", "linestyle": "none"}


def plot_roc(
    curves: Mapping[str, Series],
    path: str | os.PathLike,
    title: str,
    points: Mapping[str, tuple[float, float]] | None = None,
) -> None:
    """One ROC curve per method with its AUROC in the legend, the chance diagonal, and optionally each
    method's operating point ``(false positive rate, sensitivity)``; trivial references are dashed.
    """
    fig = _figure((5.6, 5.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="0.55", linewidth=1.2, label="chance (AUC = 0.500)")
    palette = colormaps["tab10" if len(curves) <= 10 else "tab20"].colors  # one colour per curve
    for index, (name, (labels, scores)) in enumerate(curves.items()):
        labels, scores = as_series(labels, scores)
        if len(np.unique(labels)) < 2:
            logger.warning("no ROC curve for %s: one class only", name)
            continue
        false_pos, true_pos, _ = roc_curve(labels, scores)
        reference = name.startswith(TRIVIAL_PREFIX)
        (line,) = ax.plot(
            false_pos, true_pos, linewidth=1.4 if reference else 2.2, linestyle="--" if reference else "-",
            color=palette[index % len(palette)],
            label=f"{name} (AUC = {roc_auc_score(labels, scores):.3f})",
        )
        if points and name in points:
            ax.plot(*points[name], color=line.get_color(), **POINT_STYLE)
    handles, _ = ax.get_legend_handles_labels()
    if points:
        handles.append(Line2D([], [], color="0.6", label="operating point (validation threshold)", **POINT_STYLE))
    ax.legend(handles=handles, loc="lower right", fontsize=8.5, framealpha=0.9)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title)
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    _save_figure(fig, Path(path))


def plot_score_distribution(dists: Mapping[str, Series], path: str | os.PathLike, title: str) -> None:
    """Normal vs abnormal score histograms, one panel per method in a grid.

    Scores are standardised per method against its normal scores (``z = (score - mean_normal) / sd_normal``),
    so panels share a readable unit: how many normal standard deviations a score lies above the normal mean.
    Histograms are densities on bins shared by both classes of a panel.
    """
    names = list(dists)
    if not names:
        raise ValueError("no score distributions to plot")
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig = _figure((4.4 * columns, 3.5 * rows + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        _distribution_panel(ax, name, *as_series(*dists[name]))
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    _save_figure(fig, Path(path))


def plot_specificity(
    specificity: Mapping[str, Mapping[str, tuple[float, tuple[float, float] | None]]],
    path: str | os.PathLike,
    target: float,
    title: str,
    tolerance: float = 0.05,
) -> None:
    """Held-out specificity per fold (x) and method (one colour each), with its interval as an error bar, against
    the ``target`` (line) and the band ``target +/- tolerance``: where a threshold fitted on validation patients
    holds on new ones. ``specificity``: method -> fold -> (specificity, (low, high) or None); NaN is left out."""
    folds = list(dict.fromkeys(fold for per_fold in specificity.values() for fold in per_fold))
    fig = _figure((1.2 * len(folds) + 3.0, 4.2))
    ax = fig.add_subplot()
    ax.axhspan(target - tolerance, min(1.0, target + tolerance), color="tab:green", alpha=0.12,
               label=f"target ± {tolerance:g}")
    ax.axhline(target, color="tab:green", linewidth=1.2, label=f"target {target:g}")
    palette = colormaps["tab10"].colors
    width = 0.6 / max(1, len(specificity))
    lowest = target
    for index, (name, per_fold) in enumerate(specificity.items()):
        x, y, low, high = [], [], [], []
        for column, fold in enumerate(folds):
            value, interval = per_fold.get(fold, (math.nan, None))
            if np.isfinite(value):
                x.append(column + (index - (len(specificity) - 1) / 2) * width)
                y.append(value)
                low.append(value - interval[0] if interval else 0.0)
                high.append(interval[1] - value if interval else 0.0)
                lowest = min(lowest, value - low[-1])
        ax.errorbar(x, y, yerr=[low, high], color=palette[index % len(palette)], label=name, capsize=3,
                    **{**POINT_STYLE, "markersize": 6})
    ax.set_xticks(range(len(folds)), folds)
    ax.set_ylim(max(0.0, min(target - 4 * tolerance, lowest - 0.02)), 1.005)  # the same scale run after run
    ax.set(title=title, ylabel="specificity on held-out patients")
    ax.legend(fontsize=8.5, loc="lower left", framealpha=0.9)
    ax.grid(alpha=0.3, axis="y")
    _save_figure(fig, Path(path))


def _distribution_panel(ax: Any, name: str, labels: np.ndarray, scores: np.ndarray) -> None:
    """One panel of ``plot_score_distribution``."""
    z = _standardise(scores, scores[labels == 0] if np.any(labels == 0) else scores)
    bins = np.histogram_bin_edges(z[np.isfinite(z)], bins=30)
    for value, text, colour in ((0, "normal", "tab:blue"), (1, "abnormal", "tab:red")):
        values = z[labels == value]
        if values.size:
            ax.hist(values, bins=bins, density=True, color=colour, alpha=0.35, label=f"{text} (n = {values.size})")
            ax.hist(values, bins=bins, density=True, color=colour, histtype="step", linewidth=1.4)
    auc = roc_auc_score(labels, scores) if len(np.unique(labels)) == 2 else math.nan
    ax.set_title(f"{name} (AUC = {auc:.3f})", fontsize=10)
    ax.set_xlabel("score (z: normal SDs from the normal mean)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _standardise(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(scores - mean) / sd`` of the reference scores; only centred when they have no spread."""
    reference = reference[np.isfinite(reference)]
    sd = float(np.std(reference)) if reference.size > 1 else 0.0
    return (scores - float(np.mean(reference))) / (sd if sd > 0 else 1.0)


def _figure(size: tuple[float, float]) -> Figure:
    """A pyplot-free figure on the Agg canvas (no global backend state, safe in headless runs)."""
    fig = Figure(figsize=size, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    io.write_atomic(path, lambda handle: fig.savefig(handle, dpi=DPI, format="png"))
