"""The comparison's tables and pooled curves: mean +/- std over folds, the paper's table layout."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.compare.runs import DISPLAY, METRICS, TABLE_ORDER, TRIVIAL, Settings
from scripts.evaluation.evaluate import read_tables
from scripts.evaluation.patch_protocol import PatchProtocol
from scripts.evaluation.report import THRESHOLD_TEXT, json_safe
from scripts.outputs.formats import Columns
from scripts.scoring.references import LESION_REFERENCES


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan, int(finite.size)


def aggregate(per_fold: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{fold: {method: metrics}}`` -> ``{method: {"auc", "auc_std", "ap", ..., "n_folds", "folds", ...}}``."""
    methods: list[str] = []
    for results in per_fold.values():
        methods += [m for m in results if m not in methods]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = {fold: results[method] for fold, results in per_fold.items() if method in results}
        entry: dict[str, Any] = {}
        for metric in METRICS:
            mean, std, n = _mean_std([r.get(metric, math.nan) for r in rows.values()])
            entry[metric], entry[f"{metric}_std"] = mean, std
        entry["n_folds"] = _mean_std([r.get("auc", math.nan) for r in rows.values()])[2]
        for level, keys in (("case", ("auc", "ap")), ("pixel", ("pixel_auc", "pixel_ap", "dice_best_upper_bound"))):
            found = [r[level] for r in rows.values() if level in r]
            if found:
                entry[level] = {}
                for key in keys:
                    mean, std, n = _mean_std([f.get(key, math.nan) for f in found])
                    entry[level].update({key: mean, f"{key}_std": std, "n_folds": n})
        entry["folds"] = {fold: {k: r.get(k) for k in ("auc", "ap", "sensitivity", "specificity", "specificity_ci95",
                                                        "level_r2", "level_adjusted_auc", "validation_auc", "threshold",
                                                        "n_normal", "n_abnormal")}
                          for fold, r in rows.items()}
        out[method] = entry
    return out


def _ordered(names: Sequence[str]) -> list[str]:
    known = [m for m in TABLE_ORDER if m in names]
    trivial = sorted(m for m in names if m.startswith("trivial_"))
    return known + [m for m in names if m not in known and m not in trivial] + trivial


def _cell(mean: float, std: float) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None and np.isfinite(std) else f"{mean:.3f}"


def comparison_markdown(summary: Mapping[str, Mapping[str, Any]], described: Mapping[str, Any], settings: Settings,
                        folds: Sequence[str], failures: Sequence[str], seconds: float, level: str = "slice",
                        patches: PatchProtocol | None = None) -> str:
    """``comparison.md``: the paper's table layout (methods by row, AUC and AP), per-fold AUCs, other levels."""
    brain = described.get("layout") != "images"
    # the paper's Table 1 holds both data sets (its Table 2 is the ranking ablation: the two Patch-GAN rows)
    table = f"Table 1, {'brain FLAIR' if brain else 'dermoscopy (ISIC)'} column: {level} level"
    source = described.get("dataset") or f"train {described.get('train')} / test {described.get('test')}"
    spread = "mean ± sample standard deviation over folds" if len(folds) > 1 else "one train/test split (no spread)"
    lines = [
        "# Method comparison",
        "",
        f"Data: `{source}` ({described.get('n_cases')} cases, layout {described.get('layout')}); "
        f"{len(folds)} fold(s) split by case; {spread}.",
        "In each fold the methods train on the same normal training slices; the validation cases' normal slices "
        "select the checkpoint and set the threshold (target false positive rate "
        f"{settings.fpr:g}: " + THRESHOLD_TEXT[settings.threshold_rule].format(1 - settings.fpr) + "); no setting "
        "was chosen on test labels.",
        *(["", f"Patch level: a {patches.grid}x{patches.grid} grid of patches per slice (the scoring patches); normal "
            f"= at least {patches.brain_fraction:g} foreground and no lesion pixel, abnormal = at least "
            f"{patches.brain_fraction:g} foreground and {patches.lesion_fraction:g} lesion; test sets balanced by a "
            "seeded subsample" + (f" of at most {patches.per_class} per class and fold" if patches.per_class else "")
            + ", the same patches for every method. A patch's score is its heatmap value (its patch "
            "error), so both Patch-GAN rows coincide (ranking only aggregates patches), ALOCC is scored by its "
            "reconstruction error and the OCSVM, which has no heatmap, is absent."] if patches else []),
        "",
        f"## {table}",
        "",
        "| Method | AUC | AP | Sensitivity @thr | Specificity @thr | Level R² (normal) | AUC beyond level | "
        "Validation AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in _ordered(list(summary)):
        r = summary[name]
        lines.append(f"| {DISPLAY.get(name, name)} (`{name}`) | " + " | ".join(_cell(r[m], r[f"{m}_std"]) for m in METRICS) + " |")
    if len(folds) > 1:
        lines += ["", "## AUC per fold", "", "| Method | " + " | ".join(folds) + " |", "| --- |" + " ---: |" * len(folds)]
        for name in _ordered(list(summary)):
            values = [summary[name]["folds"].get(f, {}).get("auc") for f in folds]
            lines.append(f"| `{name}` | " + " | ".join(_cell(v, math.nan) if v is not None else "n/a" for v in values) + " |")
    if brain and level == "slice":
        lines += _transfer_lines(summary, folds, settings.fpr)
    for level, title, keys in (("case", "Case level (one score per volume or image)", ("auc", "ap")),
                               ("pixel", "Pixel level (heatmaps inside the foreground)", ("pixel_auc", "pixel_ap"))):
        rows = [name for name in _ordered(list(summary)) if level in summary[name]]
        if rows:
            lines += ["", f"## {title}", "", "| Method | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
            for name in rows:
                r = summary[name][level]
                lines.append(f"| `{name}` | " + " | ".join(_cell(r[k], r[f"{k}_std"]) for k in keys) + " |")
    lines += ["", "## Settings", "", "```", json.dumps(json_safe(_settings_dict(settings)), indent=1), "```", "",
              f"Wall time: {seconds / 60:.1f} min. Plots: `roc.png`, `score_distribution.png` (test scores pooled over "
              "folds after z-scoring each fold against its own normal validation scores). Per fold: "
              "`<fold>/evaluation/metrics.md`."]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"


def held_out_specificity(summary: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> dict[str, dict]:
    """``methods`` -> fold -> (held-out specificity, its patient-bootstrap interval or None), for the folds where
    a threshold was set (what ``plots.plot_specificity`` draws); methods without any are left out."""
    out = {}
    for name in methods:
        folds = {fold: (r["specificity"], r.get("specificity_ci95")) for fold, r in summary[name]["folds"].items()
                 if r.get("specificity") is not None and np.isfinite(r["specificity"])}
        if folds:
            out[name] = folds
    return out


def _transfer_lines(summary: Mapping[str, Mapping[str, Any]], folds: Sequence[str], fpr: float) -> list[str]:
    """Held-out specificity per fold against the target, with its patient-bootstrap interval, and how much of each
    score the axial level explains (R² of a quadratic in the level, normal test slices)."""
    lines = ["", f"## Operating point on held-out patients (target specificity {1 - fpr:g})", "",
             "Specificity of the test patients' normal slices at the threshold fitted on the validation patients' "
             "normal slices; in brackets the 95% bootstrap interval over test patients.", "",
             "| Method | " + " | ".join(folds) + " |", "| --- |" + " ---: |" * len(folds)]
    for name in _ordered(list(summary)):
        cells = []
        for fold in folds:
            r = summary[name]["folds"].get(fold, {})
            spec, ci = r.get("specificity"), r.get("specificity_ci95")
            if spec is None or not np.isfinite(spec):
                cells.append("n/a")
            else:
                cells.append(f"{spec:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return {k: v for k, v in vars(settings).items()}


def _series(folder: Path, column: str, read: dict[Path, Columns | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, scores) of ``column`` in ``folder``'s slice table; ``read`` keeps each folder's table, so a folder
    read for one method and several references is read (and its derived references computed) once."""
    if folder not in read:
        try:
            read[folder] = read_tables(folder)[1]
        except FileNotFoundError:
            read[folder] = None
    slices = read[folder]
    if slices is None or column not in slices or "label" not in slices:
        return None
    keep = (slices["label"] >= 0) & np.isfinite(slices[column])
    return slices["label"][keep], slices[column][keep]


def pooled_series(fold_dirs: Mapping[str, Path], methods: Sequence[str], first: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test scores of every method (and the trivial references) pooled over folds, each fold z-scored against
    its own normal validation scores (raw scores when the fold has no validation output)."""
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    references = (*TRIVIAL, "trivial_darkness", "trivial_texture", *LESION_REFERENCES)
    wanted = [(m, m, "score") for m in methods] + [(t, first, t) for t in references]
    read: dict[Path, Columns | None] = {}
    for fold_dir in fold_dirs.values():
        for name, method, column in wanted:
            test = _series(fold_dir / method, column, read)
            if test is None or len(test[0]) == 0:
                continue
            validation = _series(fold_dir / method / "validation", column, read)
            normal = validation[1][validation[0] == 0] if validation is not None else np.empty(0)
            if normal.size > 1 and np.std(normal) > 0:
                test = (test[0], (test[1] - normal.mean()) / normal.std())
            pooled.setdefault(name, []).append(test)
    out = {}
    for name, parts in pooled.items():
        labels, scores = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if name.startswith("trivial_") and np.ptp(scores) == 0:
            continue
        if len(np.unique(labels)) == 2:
            out[name] = (labels, scores)
    return out
