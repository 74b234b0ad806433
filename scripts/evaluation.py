"""Evaluation of inference outputs: detection metrics, operating thresholds, pixel metrics and plots.

Reads what ``scripts.handlers.AnomalyScoreWriter`` wrote (``scores.csv``, ``slice_scores.csv``, ``heatmaps/``;
formats in docs/architecture.md) for one or several methods and writes ``metrics.json``, ``metrics.md``,
``roc.png`` and ``score_distribution.png``. Every file is written atomically (temporary file, then
``os.replace``), so a crash never leaves a half-written result that looks complete.

Choices that matter for honest numbers:

* The operating threshold comes from NORMAL VALIDATION scores only: an unsupervised detector has no abnormal
  examples to tune on, and tuning on the test set would inflate sensitivity and specificity.
* The trivial reference scores in ``slice_scores.csv`` (``trivial_*`` columns: brightest foreground intensity,
  axial position, darkness) are evaluated as methods of their own, so that a model's AUROC can be read against
  what needs no model at all.
* The best Dice over thresholds picks the threshold on the test masks themselves; it is reported as
  ``dice_best_upper_bound`` because it is an optimistic bound, not an achievable operating point.
* Pixel metrics pool the pixels of all cases inside the foreground region (the brain); above ``max_pixels`` a
  seeded uniform subsample is used so memory stays bounded and results are reproducible.

Command line: ``python -m scripts.evaluation --output-dir DIR [--eval-dir DIR] [--validation-output-dir DIR]
[--method NAME=DIR ...] [--fpr 0.05] [--level slice|case] [--datalist JSON [--split testing]]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]
Series = tuple[np.ndarray, np.ndarray]  # (labels 0/1, scores) of one method

DEFAULT_METHOD = "model"
TRIVIAL_PREFIX = "trivial_"
LEVELS = ("slice", "case")
SCORE_FILES = {"case": "scores.csv", "slice": "slice_scores.csv"}
MAX_PIXELS = 5_000_000
DPI = 150
POINT_STYLE = {"marker": "o", "markersize": 7, "markeredgecolor": "black", "linestyle": "none"}
OUTPUT_FILES = ("metrics.json", "metrics.md", "roc.png", "score_distribution.png")


# ----------------------------------------------------------------------------------------------- metrics


def detection_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """AUROC and average precision of ``scores`` (higher = more abnormal) against 0/1 ``labels``.

    Both are undefined when a class is absent; they are then NaN (with a warning) rather than an exception, so
    that one incomplete split does not stop the evaluation of the others.
    """
    labels, scores = _as_series(labels, scores)
    n_normal, n_abnormal = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    if n_normal == 0 or n_abnormal == 0:
        logger.warning("AUROC and AP are undefined with %d normal and %d abnormal examples", n_normal, n_abnormal)
        auc = ap = math.nan
    else:
        auc, ap = float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))
    return {"auc": auc, "ap": ap, "n_normal": n_normal, "n_abnormal": n_abnormal}


def threshold_from_normal(normal_scores: Sequence[float] | np.ndarray, fpr: float = 0.05) -> float:
    """Operating threshold: the ``1 - fpr`` quantile of NORMAL validation scores.

    A score strictly above the threshold is called abnormal, so about ``fpr`` of normal validation cases are
    false positives. Only normal scores are used: abnormal examples are not available to an unsupervised
    detector, and the threshold must not be tuned on the test set. Non-finite scores are ignored.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    values = np.asarray(normal_scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite normal scores to set a threshold from")
    return float(np.quantile(values, 1.0 - fpr))


def operating_point(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, float]:
    """Sensitivity and specificity when a score strictly above ``threshold`` is called abnormal.

    A rate whose class is absent is NaN.
    """
    labels, scores = _as_series(labels, scores)
    called = scores > threshold
    sensitivity = float(np.mean(called[labels == 1])) if np.any(labels == 1) else math.nan
    specificity = float(np.mean(~called[labels == 0])) if np.any(labels == 0) else math.nan
    return {"sensitivity": sensitivity, "specificity": specificity, "threshold": float(threshold)}


def pixel_metrics(
    heatmaps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    regions: Sequence[np.ndarray] | None = None,
    max_pixels: int = MAX_PIXELS,
    seed: int = 0,
) -> dict[str, Any]:
    """Pixel-level AUROC, AP and best Dice of heatmaps against lesion masks, pooled over all cases.

    Only pixels inside ``regions`` (e.g. the brain; nonzero = inside) count when given, so the easy background
    does not inflate the scores. Above ``max_pixels`` pooled pixels, every case keeps the same seeded random
    fraction of its pixels. ``dice_best_upper_bound`` is the best Dice over all thresholds (``heatmap >=
    dice_best_threshold``); the threshold is chosen on the test masks, so it is an upper bound.
    """
    if not heatmaps:
        raise ValueError("no heatmaps to evaluate")
    if len(masks) != len(heatmaps) or (regions is not None and len(regions) != len(heatmaps)):
        raise ValueError("heatmaps, masks and regions must have the same length")
    pooled = [
        _region_pixels(heatmap, mask, None if regions is None else regions[i], f"#{i}")
        for i, (heatmap, mask) in enumerate(zip(heatmaps, masks))
    ]
    total = sum(len(scores) for scores, _ in pooled)
    fraction = min(1.0, max_pixels / max(total, 1))
    rng = np.random.default_rng(seed)
    picked = [_subsample(scores, lesion, int(len(scores) * fraction), rng) for scores, lesion in pooled]
    scores = np.concatenate([s for s, _ in picked])
    lesion = np.concatenate([m for _, m in picked])
    ranking = detection_metrics(lesion, scores)
    dice, threshold = best_dice(lesion, scores)
    return {
        "pixel_auc": ranking["auc"],
        "pixel_ap": ranking["ap"],
        "dice_best_upper_bound": dice,
        "dice_best_threshold": threshold,
        "n_cases": len(heatmaps),
        "n_pixels": int(scores.size),
        "n_pixels_in_regions": int(total),
        "n_lesion_pixels": int(lesion.sum()),
    }


def best_dice(lesion: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best Dice of ``scores >= t`` against a boolean ``lesion`` over every threshold ``t``, and that ``t``.

    One sort and a cumulative sum give the true positives of every threshold at once: with scores in
    descending order, thresholding at the k-th score predicts the first k pixels (ties are cut only where the
    score changes). NaN when there is no lesion pixel (Dice is then meaningless).
    """
    lesion, scores = np.asarray(lesion, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    n_lesion = int(lesion.sum())
    if n_lesion == 0 or scores.size == 0:
        logger.warning("best Dice is undefined without lesion pixels")
        return math.nan, math.nan
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    cut = np.append(ranked[1:] != ranked[:-1], True)  # last position of each run of equal scores
    true_positives = np.cumsum(lesion[order])[cut]
    predicted = np.flatnonzero(cut) + 1
    dice = 2.0 * true_positives / (predicted + n_lesion)
    best = int(np.argmax(dice))
    return float(dice[best]), float(ranked[cut][best])


def _as_series(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> Series:
    """Flat ``(labels, scores)`` arrays of equal length with 0/1 labels, or ValueError."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    return labels, scores


def _region_pixels(
    heatmap: np.ndarray, mask: np.ndarray, region: np.ndarray | None, case: str
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap values and lesion flags of one case's pixels inside its region, as flat arrays."""
    heatmap, lesion = np.asarray(heatmap), np.asarray(mask) != 0
    if heatmap.shape != lesion.shape or (region is not None and np.shape(region) != heatmap.shape):
        region_shape = np.shape(region) if region is not None else "-"
        shapes = f"heatmap {heatmap.shape}, mask {lesion.shape}, region {region_shape}"
        raise ValueError(f"case {case}: shapes differ ({shapes})")
    if region is None:
        return heatmap.astype(np.float32).ravel(), lesion.ravel()
    inside = np.asarray(region) != 0
    return heatmap[inside].astype(np.float32), lesion[inside]


def _subsample(
    scores: np.ndarray, lesion: np.ndarray, keep: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random subset of ``keep`` pixels (all of them when there are no more than that)."""
    if keep >= scores.size:
        return scores, lesion
    index = np.sort(rng.choice(scores.size, size=keep, replace=False))
    return scores[index], lesion[index]


# ----------------------------------------------------------------------------------------------- reading


def read_scores(output_dir: str | os.PathLike) -> tuple[Columns, Columns]:
    """Read ``scores.csv`` and ``slice_scores.csv`` of an inference output folder as columns.

    Each is a dict of numpy arrays keyed by column name: ``case_id`` as strings, ``label`` as int with -1 for
    unknown (empty), ``slice_index`` as int, the others as float (empty = NaN). A missing file gives ``{}``;
    FileNotFoundError when both are missing.
    """
    folder = Path(output_dir)
    cases, slices = _read_csv(folder / SCORE_FILES["case"]), _read_csv(folder / SCORE_FILES["slice"])
    if not cases and not slices:
        raise FileNotFoundError(f"neither {SCORE_FILES['case']} nor {SCORE_FILES['slice']} in {folder}")
    return cases, slices


def _read_csv(path: Path) -> Columns:
    """One CSV as typed columns (see ``read_scores``); ``{}`` when the file is missing or empty."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = reader.fieldnames or []
    return {name: _column(name, [(row.get(name) or "").strip() for row in rows]) for name in names}


def _column(name: str, values: list[str]) -> np.ndarray:
    """Type one CSV column by its name (identifiers, labels, indices) or its content (numbers, else text)."""
    if name == "case_id":
        return np.array(values, dtype=str)
    if name == "label":
        return np.array([int(float(v)) if v else -1 for v in values], dtype=np.int64)
    if name == "slice_index":
        return np.array([int(float(v)) for v in values], dtype=np.int64)
    try:
        return np.array([float(v) if v else math.nan for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)


def load_items(datalist_path: str | os.PathLike, split: str = "testing") -> list[dict[str, Any]]:
    """The items of one split of a datalist JSON, with ``image`` and ``seg`` resolved against ``dataset_dir``."""
    with open(datalist_path) as handle:
        datalist = json.load(handle)
    base = Path(datalist.get("dataset_dir") or Path(datalist_path).parent)
    if split not in datalist:
        splits = sorted(key for key, value in datalist.items() if isinstance(value, list))
        raise KeyError(f"{datalist_path} has no split {split!r} (splits: {splits})")
    return [{**item, **{k: str(base / item[k]) for k in ("image", "seg") if item.get(k)}} for item in datalist[split]]


# ----------------------------------------------------------------------------------------------- plots


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
        labels, scores = _as_series(labels, scores)
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
        _distribution_panel(ax, name, *_as_series(*dists[name]))
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
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
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it only when the ``with`` block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate(
    output_dir: str | os.PathLike,
    eval_dir: str | os.PathLike | None = None,
    methods: Mapping[str, str | os.PathLike] | None = None,
    level: str = "slice",
    validation_output_dir: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    datalist: Sequence[Mapping[str, Any]] | None = None,
    fpr: float = 0.05,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, dict[str, Any]]:
    """Evaluate one or several inference output folders and write the results into ``eval_dir``.

    Args:
        output_dir: the inference output folder; the default method (named ``model``) and default ``eval_dir``.
        eval_dir: where ``metrics.json``, ``metrics.md``, ``roc.png`` and ``score_distribution.png`` go.
        methods: method name -> inference output folder, evaluated instead of ``output_dir`` alone. The
            trivial reference scores (``trivial_*`` columns) are taken from the first method's folder.
        level: ``slice`` (``slice_scores.csv``, one row per slice or 2D image; case-level metrics from
            ``scores.csv`` are added when both classes are present) or ``case`` (``scores.csv`` only).
        validation_output_dir: inference output of the validation split: a folder (for the first method, and
            the trivial references) or a mapping method name -> folder. The threshold of each method is set
            from its normal (label 0) validation rows; without one, sensitivity and specificity are NaN.
        datalist: items with ``case_id``, ``image`` and ``seg`` paths; enables pixel metrics on the heatmaps.
        fpr: target false positive rate on normal validation cases.
        max_pixels: cap on pooled pixels for the pixel metrics (seeded subsample above it).

    Returns:
        ``{method: {"level", "auc", "ap", "n_normal", "n_abnormal", "threshold", "sensitivity", "specificity",
        "fpr_target", "threshold_source"[, "case": {...}][, "pixel": {...}]}}``, as written to ``metrics.json``.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    methods = {name: Path(folder) for name, folder in (methods or {DEFAULT_METHOD: output_dir}).items()}
    first = next(iter(methods))
    validation = _validation_folders(validation_output_dir, list(methods))
    tables = {name: read_scores(folder) for name, folder in methods.items()}
    series = _method_series(tables, level, first)
    if not series:
        folders = ", ".join(str(folder) for folder in methods.values())
        raise ValueError(f"nothing to evaluate: no labelled rows (label 0/1) in {SCORE_FILES[level]} of {folders}")
    validation_series = _method_series({name: read_scores(folder) for name, folder in validation.items()}, level, first)
    results = {}
    for name, (labels, scores) in series.items():
        source = validation.get(first if name.startswith(TRIVIAL_PREFIX) else name)
        results[name] = _method_result(labels, scores, validation_series.get(name), source, fpr, level)
    for name in (name for name in results if name in tables):
        if level == "slice":
            _add_case_level(results[name], tables[name][0])
        if datalist is not None:
            _add_pixel_level(results[name], methods[name], datalist, max_pixels)
    _write_outputs(Path(eval_dir or output_dir), results, series, level, fpr)
    return results


def _validation_folders(
    validation_output_dir: str | os.PathLike | Mapping[str, str | os.PathLike] | None, names: list[str]
) -> dict[str, Path]:
    """Method name -> validation output folder; a single folder belongs to the first method."""
    if validation_output_dir is None:
        return {}
    if isinstance(validation_output_dir, Mapping):
        unknown = set(validation_output_dir) - set(names)
        if unknown:
            raise ValueError(f"validation folders for unknown methods {sorted(unknown)} (methods: {names})")
        return {name: Path(folder) for name, folder in validation_output_dir.items()}
    return {names[0]: Path(validation_output_dir)}


def _method_series(tables: Mapping[str, tuple[Columns, Columns]], level: str, trivial_source: str) -> dict[str, Series]:
    """Method name -> (labels, scores) of its labelled rows at ``level``, then the trivial references found in
    the ``trivial_source`` method's table (one set of references, listed after the methods).
    """
    columns = {name: slices if level == "slice" else cases for name, (cases, slices) in tables.items()}
    wanted = [(name, name, "score") for name in columns]
    if trivial_source in columns:
        references = [c for c in columns[trivial_source] if c.startswith(TRIVIAL_PREFIX)]
        wanted += [(column, trivial_source, column) for column in references]
    out: dict[str, Series] = {}
    for method, table, column in wanted:
        picked = _labelled_rows(method, columns[table], column)
        if picked is not None:
            out[method] = picked
    return out


def _labelled_rows(method: str, columns: Columns, column: str) -> Series | None:
    """(labels, scores) of the rows with a known label and a score, or None (logged) when there are none.

    Rows of unknown label (-1) cannot be scored against; rows with a NaN score are dropped with a warning.
    """
    if column not in columns or "label" not in columns:
        logger.warning("%s: no %r or no 'label' column, skipped", method, column)
        return None
    labels, scores = columns["label"], columns[column]
    labelled = labels >= 0
    keep = labelled & np.isfinite(scores)
    if np.any(labelled & ~keep):
        logger.warning("%s: %d labelled rows without a score dropped", method, int(np.sum(labelled & ~keep)))
    if not np.any(keep):
        logger.warning("%s: no labelled rows with a score, skipped", method)
        return None
    if method.startswith(TRIVIAL_PREFIX) and np.ptp(scores[keep]) == 0:
        logger.info("%s is constant on these data (no reference), skipped", method)
        return None
    return labels[keep], scores[keep]


def _method_result(
    labels: np.ndarray, scores: np.ndarray, validation: Series | None, source: Path | None, fpr: float, level: str
) -> dict[str, Any]:
    """Detection metrics of one method on the test rows and its operating point at the threshold set from the
    normal rows of its ``validation`` series (read from ``source``); NaN operating point without them.
    """
    result: dict[str, Any] = {"level": level, **detection_metrics(labels, scores), "fpr_target": fpr}
    normal = validation[1][validation[0] == 0] if validation is not None else np.empty(0)
    if normal.size:
        result.update(operating_point(labels, scores, threshold_from_normal(normal, fpr)), threshold_source=str(source))
    else:
        if source is not None:
            logger.warning("no normal validation rows in %s: no threshold", source)
        result.update(threshold=math.nan, sensitivity=math.nan, specificity=math.nan, threshold_source=None)
    return result


def _add_case_level(result: dict[str, Any], cases: Columns) -> None:
    """Case (volume or image) level metrics from ``scores.csv`` when it holds both classes."""
    if "label" not in cases or "score" not in cases:
        return
    keep = np.isfinite(cases["score"]) & (cases["label"] >= 0)
    labels = cases["label"][keep]
    if np.any(labels == 0) and np.any(labels == 1):
        result["case"] = detection_metrics(labels, cases["score"][keep])


def _add_pixel_level(
    result: dict[str, Any], folder: Path, datalist: Sequence[Mapping[str, Any]], max_pixels: int
) -> None:
    """Pixel metrics of a method's heatmaps; a case without heatmap or mask is logged and skipped."""
    rng = np.random.default_rng(0)
    per_case = max(1, max_pixels // max(len(datalist), 1))
    heatmaps, masks, total = [], [], 0
    for item in datalist:
        pixels = _case_pixels(folder, item)
        if pixels is not None:
            total += pixels[0].size
            scores, lesion = _subsample(*pixels, per_case, rng)
            heatmaps.append(scores)
            masks.append(lesion)
    if heatmaps:
        result["pixel"] = {**pixel_metrics(heatmaps, masks, max_pixels=max_pixels), "n_pixels_in_regions": total}
    else:
        logger.warning("no heatmap with a lesion mask in %s: no pixel metrics", folder / "heatmaps")


def _case_pixels(folder: Path, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """A case's heatmap values and lesion flags inside its region, or None (logged) when unavailable."""
    case_id = item.get("case_id", "?")
    volume, picture = (folder / "heatmaps" / f"{case_id}_heatmap{suffix}" for suffix in (".nii.gz", ".png"))
    if not item.get("seg"):
        logger.warning("case %s has no lesion mask, skipped for pixel metrics", case_id)
        return None
    try:
        if volume.is_file():
            heatmap, lesion, region = _volume_case(volume, item)
        elif picture.is_file():
            heatmap, lesion, region = _picture_case(picture, item)
        else:
            logger.warning("case %s: no heatmap in %s, skipped for pixel metrics", case_id, folder / "heatmaps")
            return None
        return _region_pixels(heatmap, lesion, region, str(case_id))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
        logger.warning("case %s skipped for pixel metrics: %s", case_id, error)
        return None


def _volume_case(heatmap_path: Path, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NIfTI heatmap, lesion mask and foreground region (voxels above the image's background minimum).

    The heatmap was written on the input's own grid, so the three arrays align voxel for voxel.
    """
    heatmap = np.asanyarray(nib.load(heatmap_path).dataobj, dtype=np.float32)
    lesion = np.asanyarray(nib.load(item["seg"]).dataobj) != 0
    image = np.asanyarray(nib.load(item["image"]).dataobj)
    if image.ndim == 4:
        image = image[..., int(item.get("channel", 0))]
    return heatmap, lesion, image != image.min()


def _picture_case(heatmap_path: Path, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, None]:
    """2D heatmap (in error units) and lesion mask resized to the heatmap's grid (nearest); every pixel counts."""
    with Image.open(heatmap_path) as picture:
        scale = float(getattr(picture, "text", {}).get("scale", 1.0))
        heatmap = np.asarray(picture, dtype=np.float32) / scale
    with Image.open(item["seg"]) as mask_picture:
        lesion = np.asarray(mask_picture)
    lesion = lesion.any(axis=-1) if lesion.ndim == 3 else lesion != 0
    if lesion.shape != heatmap.shape:
        resized = Image.fromarray(lesion.astype(np.uint8)).resize(heatmap.shape[::-1], Image.Resampling.NEAREST)
        lesion = np.asarray(resized) != 0
    return heatmap, lesion, None


# ----------------------------------------------------------------------------------------------- writing


def _write_outputs(
    eval_dir: Path, results: Mapping[str, dict], series: Mapping[str, Series], level: str, fpr: float
) -> None:
    """metrics.json, metrics.md, roc.png and score_distribution.png, each atomically."""
    write_text(eval_dir / "metrics.json", json.dumps(json_safe(results), indent=2) + "\n")
    write_text(eval_dir / "metrics.md", metrics_markdown(results, level, fpr))
    points = {
        name: (1.0 - r["specificity"], r["sensitivity"])
        for name, r in results.items()
        if np.isfinite(r["sensitivity"]) and np.isfinite(r["specificity"])
    }
    plot_roc(series, eval_dir / "roc.png", f"ROC, {level} level", points)
    title = f"Anomaly scores, {level} level: normal vs abnormal"
    plot_score_distribution(series, eval_dir / "score_distribution.png", title)
    logger.info("evaluation of %s written to %s (%s)", ", ".join(results), eval_dir, ", ".join(OUTPUT_FILES))


def metrics_markdown(results: Mapping[str, Mapping[str, Any]], level: str, fpr: float) -> str:
    """The results as markdown tables: detection at ``level``, then case-level and pixel-level when present."""
    lines = [
        f"# Anomaly detection, {level} level",
        "",
        f"Threshold (thr): the {100 * (1 - fpr):g}th percentile of normal validation scores (target false positive "
        f"rate {fpr:g}); a score above it is called abnormal. n/a: no validation scores given.",
        "",
        *_table(
            ["method", "AUROC", "AP", "n normal", "n abnormal", "sens@thr", "spec@thr"],
            [[name, r["auc"], r["ap"], r["n_normal"], r["n_abnormal"], r["sensitivity"], r["specificity"]]
             for name, r in results.items()],
        ),
    ]
    cases = {name: r["case"] for name, r in results.items() if "case" in r}
    if cases:
        lines += ["", "## Case level (scores.csv: one score per volume or image)", ""]
        lines += _table(
            ["method", "AUROC", "AP", "n normal", "n abnormal"],
            [[name, c["auc"], c["ap"], c["n_normal"], c["n_abnormal"]] for name, c in cases.items()],
        )
    pixels = {name: r["pixel"] for name, r in results.items() if "pixel" in r}
    if pixels:
        lines += ["", "## Pixel level (inside the foreground region)", "",
                  "Best Dice is maximised over thresholds on the test masks: an upper bound, not an operating point.",
                  ""]
        lines += _table(
            ["method", "pixel AUROC", "pixel AP", "best Dice (upper bound)", "cases", "pixels used"],
            [[name, p["pixel_auc"], p["pixel_ap"], p["dice_best_upper_bound"], p["n_cases"], p["n_pixels"]]
             for name, p in pixels.items()],
        )
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines; floats with 3 decimals (n/a for NaN), numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}" if np.isfinite(value) else "n/a"
    return str(value)


def json_safe(value: Any) -> Any:
    """NaN -> null (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------- CLI


def _name_dir(text: str) -> tuple[str, str]:
    """Parse ``NAME=DIR``."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="inference output folder (default method and eval dir)")
    parser.add_argument("--eval-dir", help="where the metrics and plots go (default: --output-dir)")
    parser.add_argument("--method", action="append", type=_name_dir, metavar="NAME=DIR",
                        help="evaluate this method's inference output instead of --output-dir alone (repeatable)")
    parser.add_argument("--validation-output-dir", action="append", metavar="DIR|NAME=DIR",
                        help="validation inference output (thresholds): DIR for the first method, or NAME=DIR "
                        "per method (repeatable)")
    parser.add_argument("--fpr", type=float, default=0.05, help="target false positive rate on normal validation cases")
    parser.add_argument("--level", choices=LEVELS, default="slice",
                        help="slice (slice_scores.csv) or case (scores.csv)")
    parser.add_argument("--datalist", help="datalist JSON with lesion masks: enables pixel metrics on the heatmaps")
    parser.add_argument("--split", default="testing", help="datalist split that was scored (default: testing)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="pixel cap for pixel metrics (seeded subsample)")
    return parser


def _validation_arg(values: list[str] | None, names: list[str]) -> dict[str, str] | None:
    """``--validation-output-dir`` values: ``NAME=DIR`` for a named method, a plain folder for the first one."""
    if not values:
        return None
    folders: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not (sep and name in names):
            name, folder = names[0], value
        if name in folders:
            raise SystemExit(f"--validation-output-dir given twice for {name!r} (use NAME=DIR, methods: {names})")
        folders[name] = folder
    return folders


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Command-line entry point (see the module docstring)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    methods = dict(args.method) if args.method else None
    names = list(methods) if methods else [DEFAULT_METHOD]
    return evaluate(
        args.output_dir,
        eval_dir=args.eval_dir,
        methods=methods,
        level=args.level,
        validation_output_dir=_validation_arg(args.validation_output_dir, names),
        datalist=load_items(args.datalist, args.split) if args.datalist else None,
        fpr=args.fpr,
        max_pixels=args.max_pixels,
    )


if __name__ == "__main__":
    main()
