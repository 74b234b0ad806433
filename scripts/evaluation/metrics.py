"""Detection metrics, operating thresholds and pixel metrics (scikit-learn), on plain arrays.

* The operating threshold comes from NORMAL VALIDATION scores only: an unsupervised detector has no abnormal
  examples to tune on, and tuning on the test set would inflate sensitivity and specificity. Its quantile level is
  cross-fitted over the validation patients (``cross_fitted_level``) so that it holds on patients it has not seen.
* The best Dice over thresholds picks the threshold on the test masks themselves; it is reported as
  ``dice_best_upper_bound`` because it is an optimistic bound, not an achievable operating point.
* Pixel metrics pool the pixels of all cases inside the foreground region (the brain); above ``max_pixels`` a
  seeded uniform subsample is used so memory stays bounded and results are reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

logger = logging.getLogger(__name__)

Series = tuple[np.ndarray, np.ndarray]  # (labels 0/1, scores) of one method
MAX_PIXELS = 5_000_000


def detection_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """AUROC and average precision of ``scores`` (higher = more abnormal) against 0/1 ``labels``.

    Both are undefined when a class is absent; they are then NaN (with a warning) rather than an exception, so
    that one incomplete split does not stop the evaluation of the others.
    """
    labels, scores = as_series(labels, scores)
    n_normal, n_abnormal = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    if n_normal == 0 or n_abnormal == 0:
        logger.warning("AUROC and AP are undefined with %d normal and %d abnormal examples", n_normal, n_abnormal)
        auc = ap = math.nan
    else:
        auc, ap = float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))
    return {"auc": auc, "ap": ap, "n_normal": n_normal, "n_abnormal": n_abnormal}


THRESHOLD_RULES = ("cross_fitted", "quantile")


def threshold_from_normal(
    normal_scores: Sequence[float] | np.ndarray, fpr: float = 0.05, level: float | None = None
) -> float:
    """Operating threshold: the ``level`` quantile (default ``1 - fpr``) of NORMAL validation scores.

    A score strictly above the threshold is called abnormal, so about ``fpr`` of normal validation cases are
    false positives. Only normal scores are used: abnormal examples are not available to an unsupervised
    detector, and the threshold must not be tuned on the test set. Non-finite scores are ignored.
    """
    values = _normal_values(normal_scores, fpr)
    return float(np.quantile(values, 1.0 - fpr if level is None else level))


def cross_fitted_level(
    normal_scores: Sequence[float] | np.ndarray, groups: Sequence[str] | np.ndarray, fpr: float = 0.05,
    tolerance: float = 1e-4, max_folds: int = 20,
) -> float:
    """The quantile level of normal validation scores whose threshold keeps ``1 - fpr`` specificity on new patients.

    The ``1 - fpr`` quantile of a few patients' normal scores calls more than ``fpr`` of another patient's normal
    slices abnormal: patients differ (scanner, head, shading, lesion burden) and slices of one patient move
    together, so the quantile of 11 patients is optimistic for the 12th (TCGA-LGG: 0.86-0.97 held-out specificity
    for a 0.95 target, docs/results.md). Cross-fitting measures that on the validation patients themselves: leave
    each ``groups`` value (patient) out in turn, set the threshold at level ``a`` on the others' scores, and count
    the left-out patient's normal slices at or below it. The level returned is the smallest ``a`` in [0, 1] at
    which that pooled left-out specificity reaches ``1 - fpr`` (bisection to ``tolerance``; 1, the others'
    maximum, when no level does). With fewer than two groups nothing can be left out: ``1 - fpr``. Beyond
    ``max_folds`` groups (e.g. patch-level rows, each its own group) they are left out ``max_folds`` at a time,
    dealt round in sorted order, so that the cost stays that of ``max_folds`` folds.
    """
    scores, groups = np.asarray(normal_scores, dtype=np.float64).ravel(), np.asarray(groups).ravel()
    if groups.shape != scores.shape:
        raise ValueError(f"{groups.size} groups for {scores.size} normal scores")
    values, groups = _normal_values(scores, fpr), groups[np.isfinite(scores)]
    names, index = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        return 1.0 - fpr
    fold = index % min(len(names), max_folds)
    left_out = [(values[fold == k], values[fold != k]) for k in range(min(len(names), max_folds))]

    def specificity(level: float) -> float:
        kept = sum(int(np.sum(own <= np.quantile(others, level))) for own, others in left_out)
        return kept / values.size

    if specificity(1.0) < 1.0 - fpr:
        return 1.0
    low, high = 0.0, 1.0  # specificity(high) >= 1 - fpr throughout
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if specificity(middle) >= 1.0 - fpr else (middle, high)
    return high


def check_threshold_rule(rule: str) -> None:
    """ValueError unless ``rule`` is one of ``THRESHOLD_RULES``."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {rule!r}")


def operating_threshold(
    normal_scores: Sequence[float] | np.ndarray, groups: Sequence[str] | np.ndarray, fpr: float = 0.05,
    rule: str = "cross_fitted",
) -> tuple[float, float]:
    """``(threshold, level)``: the threshold that ``rule`` (one of ``THRESHOLD_RULES``) fits on the normal
    validation scores of the patients ``groups``, and the quantile level it sits at: ``cross_fitted_level`` over
    the patients, or the plain ``1 - fpr`` (``threshold_from_normal``)."""
    check_threshold_rule(rule)
    level = cross_fitted_level(normal_scores, groups, fpr) if rule == "cross_fitted" else 1.0 - fpr
    return threshold_from_normal(normal_scores, fpr, level), level


def _normal_values(normal_scores: Sequence[float] | np.ndarray, fpr: float) -> np.ndarray:
    """The finite normal scores as a flat array; ValueError for an ``fpr`` outside [0, 1) or no finite score."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    values = np.asarray(normal_scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite normal scores to set a threshold from")
    return values


def operating_point(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, float]:
    """Sensitivity and specificity when a score strictly above ``threshold`` is called abnormal.

    A rate whose class is absent is NaN.
    """
    labels, scores = as_series(labels, scores)
    called = scores > threshold
    sensitivity = float(np.mean(called[labels == 1])) if np.any(labels == 1) else math.nan
    specificity = float(np.mean(~called[labels == 0])) if np.any(labels == 0) else math.nan
    return {"sensitivity": sensitivity, "specificity": specificity, "threshold": float(threshold)}


def clustered_rate_ci(
    hits: Sequence[bool] | np.ndarray, groups: Sequence[str] | np.ndarray, n_boot: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a rate (e.g. specificity: the share of normal slices called normal) that
    resamples whole ``groups`` (patients), not rows: slices of one patient are not independent, and a threshold
    that fails on one scanner fails on all its slices. NaN when there are no rows."""
    hits, groups = np.asarray(hits, dtype=np.float64), np.asarray(groups)
    if hits.size == 0:
        return math.nan, math.nan
    names, index = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(index, hits, len(names)), np.bincount(index, minlength=len(names))
    picks = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    rates = sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def level_dependence(levels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """How much of a score the axial level explains: R^2 of a quadratic in the relative level (0 lowest scored
    slice, 1 highest) fitted to the scores. Measured on normal slices, where nothing but anatomy, coverage and
    artefact changes with the level; NaN with fewer than 4 finite pairs, constant scores or one level."""
    levels, scores = np.asarray(levels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(levels) & np.isfinite(scores)
    levels, scores = levels[keep], scores[keep]
    curve = level_curve(levels, scores)
    if curve is None or np.ptp(scores) == 0:  # pictures and patches have no level
        return math.nan
    fitted = np.polyval(curve, levels)
    return float(1 - np.sum((scores - fitted) ** 2) / np.sum((scores - scores.mean()) ** 2))


def level_curve(levels: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """The quadratic in the relative level that ``level_dependence`` fits: its coefficients, or None with fewer
    than 4 finite pairs or a single level."""
    keep = np.isfinite(levels) & np.isfinite(scores)
    if keep.sum() < 4 or np.ptp(levels[keep]) == 0:
        return None
    return np.polyfit(levels[keep], scores[keep], 2)


def level_adjusted_auc(levels: np.ndarray, scores: np.ndarray, labels: np.ndarray, normal_levels: np.ndarray,
                       normal_scores: np.ndarray) -> float:
    """AUROC of what a slice score says beyond its axial level: the score minus the normal score expected at
    that level, a quadratic in the relative level fitted on other (validation) patients' normal slices.

    Tumours sit in the middle slices and the lowest and highest slices are normal, so a score that merely grows
    towards the middle of the brain detects tumours; this AUROC keeps only what the score adds at a given level
    (the position reference itself drops to about 0.5). NaN without a level curve or both classes.
    """
    curve = level_curve(np.asarray(normal_levels, dtype=np.float64), np.asarray(normal_scores, dtype=np.float64))
    keep = np.isfinite(levels) & np.isfinite(scores) & (labels >= 0)
    if curve is None or len(np.unique(labels[keep])) < 2:
        return math.nan
    return float(roc_auc_score(labels[keep], scores[keep] - np.polyval(curve, levels[keep])))


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
        region_pixels(heatmap, mask, None if regions is None else regions[i], f"#{i}")
        for i, (heatmap, mask) in enumerate(zip(heatmaps, masks))
    ]
    total = sum(len(scores) for scores, _ in pooled)
    fraction = min(1.0, max_pixels / max(total, 1))
    rng = np.random.default_rng(seed)
    picked = [subsample(scores, lesion, int(len(scores) * fraction), rng) for scores, lesion in pooled]
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


def as_series(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> Series:
    """Flat ``(labels, scores)`` arrays of equal length with 0/1 labels, or ValueError."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (abnormal)")
    return labels, scores


def region_pixels(
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


def subsample(
    scores: np.ndarray, lesion: np.ndarray, keep: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random subset of ``keep`` pixels (all of them when there are no more than that)."""
    if keep >= scores.size:
        return scores, lesion
    index = np.sort(rng.choice(scores.size, size=keep, replace=False))
    return scores[index], lesion[index]
