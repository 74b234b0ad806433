"""Summarise a patient-level cross-validation: per-fold evaluation, then mean +/- std over folds.

Reads ``<out>/fold<k>/<variant>/`` inference outputs (each with a ``validation/`` twin holding the normal
validation scores that fix its threshold) as written by ``experiments/crossval.sh``, evaluates every fold with
``scripts.evaluation.evaluate`` (all variants and the trivial reference scores together, so ROC curves share
axes), and writes ``summary.md`` and ``summary.json`` into ``<out>``:

    python -m experiments.cv_summary runs/cv_brats
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.data.datalist import load_datalist
from scripts.data.io import write_json, write_text
from scripts.evaluation.evaluate import evaluate
from scripts.evaluation.metrics import detection_metrics
from scripts.outputs.formats import read_scores

logger = logging.getLogger(__name__)

METRICS = ("auc", "ap", "sensitivity", "specificity", "validation_auc")


def fold_results(fold_dir: Path) -> dict[str, dict[str, Any]]:
    """Evaluate every variant of one fold; returns ``{method: metrics}`` (see ``scripts.evaluation``)."""
    variants = {d.name: str(d) for d in sorted(fold_dir.iterdir()) if (d / "slice_scores.csv").exists()}
    if not variants:
        raise FileNotFoundError(f"{fold_dir}: no variant folder with slice_scores.csv")
    ordered = dict(sorted(variants.items(), key=lambda kv: kv[0] != "ranking"))  # trivial scores from 'ranking'
    validation = {name: str(Path(path) / "validation") for name, path in ordered.items()
                  if (Path(path) / "validation" / "slice_scores.csv").exists()}
    datalist = fold_dir / "datalist.json"
    items = load_datalist(datalist, "testing") if datalist.exists() else None
    results = evaluate(next(iter(ordered.values())), eval_dir=fold_dir / "evaluation", methods=ordered,
                       validation_output_dir=validation or None, datalist=items)
    for name, folder in validation.items():
        results[name]["validation_auc"] = validation_auc(Path(folder))
    return results


def validation_auc(folder: Path) -> float | None:
    """Slice AUROC on the validation patients: the figure that may choose a scoring variant (never the test's)."""
    _, slices = read_scores(folder)
    keep = np.isin(slices.get("label", np.array([])), (0, 1))
    if not keep.any():
        return None
    auc = detection_metrics(slices["label"][keep], slices["score"][keep])["auc"]
    return None if np.isnan(auc) else auc


def summarise(results: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean, std and per-fold values of each metric of each method over folds (NaN folds skipped)."""
    summary: dict[str, dict[str, Any]] = {}
    for method in results[0]:
        entry: dict[str, Any] = {"folds": len(results)}
        for metric in METRICS:
            values = [r[method].get(metric) for r in results if method in r]
            entry[metric] = _stats(values)
        pixel = [r[method].get("pixel", {}).get("pixel_auc") for r in results if method in r]
        if any(v is not None for v in pixel):
            entry["pixel_auc"] = _stats(pixel)
            entry["dice_best_upper_bound"] = _stats([r[method].get("pixel", {}).get("dice_best_upper_bound")
                                                     for r in results if method in r])
        summary[method] = entry
    return summary


def _stats(values: Sequence[Any]) -> dict[str, Any]:
    numbers = np.array([np.nan if v is None else float(v) for v in values])
    finite = numbers[np.isfinite(numbers)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "per_fold": [None if not np.isfinite(v) else round(float(v), 4) for v in numbers],
    }


def markdown(summary: dict[str, dict[str, Any]], title: str) -> str:
    """A table of mean +/- std over folds per method, per-fold AUCs alongside."""
    lines = [f"# {title}", "", "Mean +/- std over patient folds; sensitivity and specificity at each fold's "
             "threshold from its normal validation scores (scripts.evaluation's threshold_rule); validation AUROC is "
             "measured on the validation patients (the only figure allowed to choose a variant).", "",
             "| method | AUROC | AP | sens@thr | spec@thr | validation AUROC | pixel AUROC | per-fold AUROC |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for method, entry in summary.items():
        cells = [_cell(entry[m]) for m in METRICS] + [_cell(entry.get("pixel_auc"))]
        folds = ", ".join("n/a" if v is None else f"{v:.3f}" for v in entry["auc"]["per_fold"])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {folds} |")
    return "\n".join(lines) + "\n"


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats or stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.3f}" + (f" +/- {stats['std']:.3f}" if stats["std"] is not None else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cv_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_dir", help="folder with fold0/, fold1/, ... written by experiments/crossval.sh")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    root = Path(args.cv_dir)
    folds = sorted(d for d in root.glob("fold*") if d.is_dir())
    if not folds:
        print(f"error: {root}: no fold*/ folders", file=sys.stderr)
        return 2
    summary = summarise([fold_results(fold) for fold in folds])
    write_json(summary, root / "summary.json")
    write_text(root / "summary.md", markdown(summary, f"Cross-validation: {root}"))
    print(markdown(summary, f"Cross-validation: {root}"))
    print(f"summary written to {root / 'summary.md'} and {root / 'summary.json'}; per-fold plots in {root}/fold*/evaluation/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
