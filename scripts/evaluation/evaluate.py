"""Evaluation of inference outputs: detection metrics, operating thresholds, pixel metrics and plots.

Reads what ``scripts.outputs.writer.AnomalyScoreWriter`` wrote (``scores.csv``, ``slice_scores.csv``, ``heatmaps/``;
``scripts.outputs.formats``) for one or several methods and writes ``metrics.json``, ``metrics.md``, ``roc.png``
and ``score_distribution.png``, each atomically.

Choices that matter for honest numbers:

* The operating threshold comes from NORMAL VALIDATION scores only: an unsupervised detector has no abnormal
  examples to tune on, and tuning on the test set would inflate sensitivity and specificity. By default
  (``threshold_rule="cross_fitted"``) its quantile level is cross-fitted over the validation patients
  (``metrics.cross_fitted_level``), so that the target specificity holds on patients the threshold has not seen;
  ``"quantile"`` is the plain ``1 - fpr`` quantile.
* The trivial reference scores in ``slice_scores.csv`` (``trivial_*`` columns: brightest foreground intensity,
  axial position, darkness), and the brightest intensity z-scored within each volume (the floors of scores with
  ``slice_standardisation: "volume"`` or ``"volume_lower_half"``), are evaluated as methods of their own, so that a
  model's AUROC can be read against what needs no model at all.
* The best Dice over thresholds picks the threshold on the test masks themselves; it is reported as
  ``dice_best_upper_bound`` because it is an optimistic bound, not an achievable operating point.
* Pixel metrics pool the pixels of all cases inside the foreground region (the brain); above ``max_pixels`` a
  seeded uniform subsample is used so memory stays bounded and results are reproducible.

Command line (``scripts/evaluation/__main__.py``): ``python -m scripts.evaluation --output-dir DIR [--eval-dir DIR]
[--validation-output-dir DIR] [--method NAME=DIR ...] [--fpr 0.05] [--threshold-rule cross_fitted|quantile]
[--level slice|case] [--datalist JSON [--split testing]]``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

from scripts.data import io
from scripts.data.io import read_mask, read_mask_2d, read_volume
from scripts.data.rules import background_foreground, is_2d_image, relative_levels
from scripts.evaluation.metrics import (
    MAX_PIXELS,
    Series,
    check_threshold_rule,
    clustered_rate_ci,
    detection_metrics,
    level_adjusted_auc,
    level_dependence,
    operating_point,
    operating_threshold,
    pixel_metrics,
    region_pixels,
    subsample,
)
from scripts.evaluation.plots import TRIVIAL_PREFIX, plot_roc, plot_score_distribution
from scripts.evaluation.report import json_safe, metrics_markdown
from scripts.outputs import formats
from scripts.outputs.formats import Columns, read_scores
from scripts.scoring.references import VOLUME_Z_INTENSITIES, volume_standardised_intensity

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "model"
LEVELS = ("slice", "case")
SCORE_FILES = {"case": formats.SCORES, "slice": formats.SLICE_SCORES}
OUTPUT_FILES = ("metrics.json", "metrics.md", "roc.png", "score_distribution.png")


class Rows(NamedTuple):
    """The labelled, scored rows of one method: 0/1 labels, scores and the case (patient) of each row."""

    labels: np.ndarray
    scores: np.ndarray
    case_ids: np.ndarray


def evaluate(
    output_dir: str | os.PathLike,
    eval_dir: str | os.PathLike | None = None,
    methods: Mapping[str, str | os.PathLike] | None = None,
    level: str = "slice",
    validation_output_dir: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    datalist: Sequence[Mapping[str, Any]] | None = None,
    fpr: float = 0.05,
    max_pixels: int = MAX_PIXELS,
    threshold_rule: str = "cross_fitted",
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
        threshold_rule: ``cross_fitted`` (the quantile level cross-fitted over the validation patients,
            ``metrics.cross_fitted_level``) or ``quantile`` (the plain ``1 - fpr`` quantile).

    Returns:
        ``{method: {"level", "auc", "ap", "n_normal", "n_abnormal", "threshold", "threshold_level", "sensitivity",
        "specificity", "fpr_target", "threshold_source"[, "case": {...}][, "pixel": {...}]}}``, as written to
        ``metrics.json``.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    check_threshold_rule(threshold_rule)
    methods = {name: Path(folder) for name, folder in (methods or {DEFAULT_METHOD: output_dir}).items()}
    first = next(iter(methods))
    validation = _validation_folders(validation_output_dir, list(methods))
    tables = {name: read_tables(folder) for name, folder in methods.items()}
    rows = _method_series(tables, level, first)
    series = {name: (row.labels, row.scores) for name, row in rows.items()}
    if not series:
        folders = ", ".join(str(folder) for folder in methods.values())
        raise ValueError(f"nothing to evaluate: no labelled rows (label 0/1) in {SCORE_FILES[level]} of {folders}")
    validation_tables = {name: read_tables(folder) for name, folder in validation.items()}
    validation_rows = _method_series(validation_tables, level, first)
    results = {}
    for name, (labels, scores) in series.items():
        source = validation.get(first if name.startswith(TRIVIAL_PREFIX) else name)
        results[name] = _method_result(labels, scores, validation_rows.get(name), source, fpr, level, threshold_rule)
    if level == "slice":
        for name, result in results.items():
            owner = first if name.startswith(TRIVIAL_PREFIX) else name
            _add_slice_diagnostics(result, tables[owner][1], "score" if name in tables else name,
                                   validation_tables.get(owner, ({}, {}))[1])
    for name in (name for name in results if name in tables):
        _add_failures(results[name], methods[name])
        if level == "slice":
            _add_case_level(results[name], tables[name][0])
        if datalist is not None:
            _add_pixel_level(results[name], methods[name], datalist, max_pixels)
    _write_outputs(Path(eval_dir or output_dir), results, series, level, fpr)
    return results


def read_tables(output_dir: str | os.PathLike) -> tuple[Columns, Columns]:
    """An inference folder's (case, slice) tables (``formats.read_scores``) with the references derived from its
    slice columns added: the brightest intensity z-scored within each volume, against all its slices and against
    its lower-scoring half (``references.volume_standardised_intensity``). Every reader of scores for evaluation
    goes through here."""
    cases, slices = read_scores(output_dir)
    if "trivial_intensity" in slices and "case_id" in slices:
        slices = {**slices, **{name: volume_standardised_intensity(slices["trivial_intensity"], slices["case_id"], half)
                               for name, half in VOLUME_Z_INTENSITIES.items()}}
    return cases, slices


def _add_failures(result: dict[str, Any], folder: Path) -> None:
    """The cases the inference could not score (``errors.csv``): counted, named in the log and in metrics.md."""
    failed = formats.read_table(folder / formats.ERRORS).get("case_id", [])
    result["n_failed_cases"] = len(failed)
    if len(failed):
        logger.warning("%s: %d case(s) failed and are not in these metrics (%s): %s", folder, len(failed),
                       folder / formats.ERRORS, ", ".join(map(str, failed[:10])))


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


def _method_series(tables: Mapping[str, tuple[Columns, Columns]], level: str, trivial_source: str) -> dict[str, Rows]:
    """Method name -> the labelled rows at ``level``, then the trivial references found in the ``trivial_source``
    method's table (one set of references, listed after the methods).
    """
    columns = {name: slices if level == "slice" else cases for name, (cases, slices) in tables.items()}
    wanted = [(name, name, "score") for name in columns]
    if trivial_source in columns:
        references = [c for c in columns[trivial_source] if c.startswith(TRIVIAL_PREFIX)]
        wanted += [(column, trivial_source, column) for column in references]
    out: dict[str, Rows] = {}
    for method, table, column in wanted:
        picked = labelled_rows(method, columns[table], column)
        if picked is not None:
            out[method] = picked
    return out


def labelled_rows(method: str, columns: Columns, column: str) -> Rows | None:
    """The rows with a known label and a score, or None (logged) when there are none. A table without case ids
    (an older or hand-made one) counts every row as its own case.

    Rows of unknown label (-1) cannot be scored against; rows with a NaN score are dropped with a warning.
    """
    if column not in columns or "label" not in columns:
        logger.warning("%s: no %r or no 'label' column, skipped", method, column)
        return None
    labels, scores = columns["label"], columns[column]
    labelled = labels >= 0
    keep = labelled & np.isfinite(scores)
    if np.any(labelled & ~keep) and not method.startswith(TRIVIAL_PREFIX):
        logger.warning("%s: %d labelled rows without a score dropped", method, int(np.sum(labelled & ~keep)))
    if not np.any(keep):  # a reference that needs what these data lack (a lesion mask) is no method's failure
        (logger.info if method.startswith(TRIVIAL_PREFIX) else logger.warning)("%s: no labelled rows with a score, "
                                                                              "skipped", method)
        return None
    if method.startswith(TRIVIAL_PREFIX) and np.ptp(scores[keep]) == 0:
        logger.info("%s is constant on these data (no reference), skipped", method)
        return None
    case_ids = columns["case_id"] if "case_id" in columns else np.arange(len(labels)).astype(str)
    return Rows(labels[keep], scores[keep], np.asarray(case_ids)[keep])


def _method_result(
    labels: np.ndarray, scores: np.ndarray, validation: Rows | None, source: Path | None, fpr: float, level: str,
    threshold_rule: str,
) -> dict[str, Any]:
    """Detection metrics of one method on the test rows and its operating point at the threshold set from the
    normal rows of its ``validation`` series (read from ``source``) by ``threshold_rule``; NaN operating point
    without them.
    ``validation_auc`` is its AUROC on the validation rows (NaN unless they hold both classes): the figure a setting
    may be chosen on, since it never looks at the test labels.
    """
    result: dict[str, Any] = {"level": level, **detection_metrics(labels, scores), "fpr_target": fpr}
    both = validation is not None and np.any(validation.labels == 0) and np.any(validation.labels == 1)
    result["validation_auc"] = detection_metrics(validation.labels, validation.scores)["auc"] if both else math.nan
    if validation is not None and np.any(validation.labels == 0):
        normal = validation.labels == 0
        threshold, quantile = operating_threshold(validation.scores[normal], validation.case_ids[normal], fpr,
                                                  threshold_rule)
        result.update(operating_point(labels, scores, threshold), threshold_level=quantile,
                      threshold_rule=threshold_rule, threshold_source=str(source))
    else:
        if source is not None:
            logger.warning("no normal validation rows in %s: no threshold", source)
        result.update(threshold=math.nan, threshold_level=math.nan, sensitivity=math.nan, specificity=math.nan,
                      threshold_source=None)
    return result


def _add_slice_diagnostics(result: dict[str, Any], slices: Columns, column: str, validation: Columns) -> None:
    """What a slice score owes to the axial level, and how far its operating point transfers to new patients.

    ``level_r2``: ``metrics.level_dependence`` of the score on the normal test slices (levels from
    ``rules.relative_levels`` over every scored slice of a case). ``level_adjusted_auc``: the test AUROC of the
    score minus the level curve of the normal ``validation`` slices (``metrics.level_adjusted_auc``).
    ``specificity_ci95``: the patient-bootstrap interval of the test specificity at the validation threshold
    (``metrics.clustered_rate_ci``), with ``n_normal_cases`` patients contributing normal slices.
    """
    scores, labels = slices[column], slices["label"]
    levels = _levels(slices, scores)
    normal = np.isfinite(scores) & (labels == 0)
    result["level_r2"] = level_dependence(levels[normal], scores[normal])
    if column in validation and "label" in validation:
        reference = validation["label"] == 0
        result["level_adjusted_auc"] = level_adjusted_auc(
            levels, scores, labels, _levels(validation, validation[column])[reference], validation[column][reference])
    if np.isfinite(result.get("threshold", math.nan)) and np.any(normal):
        low, high = clustered_rate_ci(scores[normal] <= result["threshold"], slices["case_id"][normal])
        result.update(specificity_ci95=[low, high], n_normal_cases=int(len(np.unique(slices["case_id"][normal]))))


def _levels(slices: Columns, scores: np.ndarray) -> np.ndarray:
    """Each scored slice's relative axial level in its case (``rules.relative_levels``), NaN where not scored."""
    scored = np.isfinite(scores)
    levels = np.full(scores.shape, np.nan)
    levels[scored] = relative_levels(slices["case_id"][scored], slices["slice_index"][scored])
    return levels


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
            scores, lesion = subsample(*pixels, per_case, rng)
            heatmaps.append(scores)
            masks.append(lesion)
    if heatmaps:
        result["pixel"] = {**pixel_metrics(heatmaps, masks, max_pixels=max_pixels), "n_pixels_in_regions": total}
    else:
        logger.warning("no heatmap with a lesion mask in %s: no pixel metrics", folder / "heatmaps")


def _case_pixels(folder: Path, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """A case's heatmap values and lesion flags inside its foreground, or None (logged) when unavailable.

    The heatmap was written on the input's own grid, so it aligns with the mask voxel for voxel; the foreground is
    ``rules.background_foreground`` of the input, the brain that scoring used (every pixel of a 2D picture).
    """
    case_id = str(item.get("case_id", "?"))
    if not item.get("seg"):
        logger.warning("case %s has no lesion mask, skipped for pixel metrics", case_id)
        return None
    path = formats.find_heatmap(folder, case_id)
    if path is None:
        logger.warning("case %s: no heatmap in %s, skipped for pixel metrics", case_id, folder / formats.HEATMAPS)
        return None
    try:
        heatmap = formats.read_heatmap(path)
        if is_2d_image(item["image"]):
            lesion, region = read_mask_2d(item["seg"], heatmap.shape)[0] != 0, None
        else:
            volume = read_volume(item["image"], channel=item.get("channel"))
            lesion = read_mask(item["seg"], volume, channel=item.get("channel")) != 0
            region = background_foreground(np.asarray(volume.dataobj)[None])
        return region_pixels(heatmap, lesion, region, case_id)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as error:
        logger.warning("case %s skipped for pixel metrics: %s", case_id, error)
        return None


def _write_outputs(
    eval_dir: Path, results: Mapping[str, dict], series: Mapping[str, Series], level: str, fpr: float
) -> None:
    """metrics.json, metrics.md, roc.png and score_distribution.png, each atomically."""
    io.write_json(json_safe(results), eval_dir / "metrics.json")
    io.write_text(eval_dir / "metrics.md", metrics_markdown(results, level, fpr))
    points = {
        name: (1.0 - r["specificity"], r["sensitivity"])
        for name, r in results.items()
        if np.isfinite(r["sensitivity"]) and np.isfinite(r["specificity"])
    }
    plot_roc(series, eval_dir / "roc.png", f"ROC, {level} level", points)
    title = f"Anomaly scores, {level} level: normal vs abnormal"
    plot_score_distribution(series, eval_dir / "score_distribution.png", title)
    logger.info("evaluation of %s written to %s (%s)", ", ".join(results), eval_dir, ", ".join(OUTPUT_FILES))
