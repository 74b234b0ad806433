"""How far an operating threshold's specificity moves on new patients, measured on validation patients only.

One fold's held-out specificity is one draw: 11 test patients, a hundred-odd normal slices, and slices of one
patient that move together. This tool asks the validation patients how wide that draw is. In each fold of an
``experiments.compare`` output it splits the validation patients at random, many times, into a half that fits the
threshold (by each of ``metrics.THRESHOLD_RULES``) and a half that the threshold is applied to, and reports the
held-out specificity of those splits: its mean (is the rule on target?), its spread, and how often it lands within
``--tolerance`` of the target. No test label is read for that; the test specificity of each fold (the threshold
fitted on all the validation patients, as the comparison does) is printed beside it for the record.

    python -m experiments.threshold_transfer runs/lgg_v080 --method patchgan_ranking

Writes ``threshold_transfer_<method>.md`` into the run folder and prints it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.reports import run_parser, write_run_report
from scripts.evaluation.evaluate import labelled_rows
from scripts.evaluation.metrics import THRESHOLD_RULES, operating_point, operating_threshold
from scripts.outputs.formats import read_scores

Normal = tuple[np.ndarray, np.ndarray]  # (scores, patient ids) of the normal slices of one inference folder


def normal_slices(folder: Path, method: str) -> Normal:
    """The scores and case ids of the normal slices in an inference folder's ``slice_scores.csv``, among the rows
    that the evaluation counts (``evaluate.labelled_rows``: a known label and a finite score)."""
    rows = labelled_rows(method, read_scores(folder)[1], "score")
    if rows is None:
        raise ValueError(f"{folder}: no labelled slice scores")
    normal = rows.labels == 0
    return rows.scores[normal].astype(np.float64), rows.case_ids[normal]


def specificity_at(fit: Normal, applied: np.ndarray, rule: str, fpr: float) -> float:
    """Specificity of the ``applied`` normal scores at the threshold that ``rule`` fits on ``fit``."""
    threshold, _ = operating_threshold(fit[0], fit[1], fpr, rule)
    return operating_point(np.zeros(applied.size), applied, threshold)["specificity"]


def nested_specificities(validation: Normal, rule: str, fpr: float, repeats: int, seed: int) -> np.ndarray:
    """Held-out specificity of ``repeats`` random halvings of the validation patients: the threshold fitted on one
    half (the larger when odd), applied to the other."""
    scores, groups = validation
    names = np.unique(groups)
    if names.size < 4:
        raise ValueError(f"{names.size} validation patient(s) with normal slices: too few (at least 4) to halve "
                         "into a fitting and a held-out part")
    rng = np.random.default_rng(seed)
    out = np.empty(repeats)
    for k in range(repeats):
        fitting = np.isin(groups, rng.permutation(names)[: (names.size + 1) // 2])
        out[k] = specificity_at((scores[fitting], groups[fitting]), scores[~fitting], rule, fpr)
    return out


def _nested(folder: Path, validation: Normal, rule: str, fpr: float, repeats: int, seed: int) -> np.ndarray:
    """``nested_specificities`` with the method folder named in its error."""
    try:
        return nested_specificities(validation, rule, fpr, repeats, seed)
    except ValueError as error:
        raise ValueError(f"{folder / 'validation'}: {error}") from error


def transfer_table(
    run: Path, method: str, fpr: float = 0.05, tolerance: float = 0.05, repeats: int = 200, seed: int = 0
) -> str:
    """The markdown table of every threshold rule over the folds of ``run`` (see the module docstring)."""
    folds = sorted(path for path in run.glob("fold_*") if (path / method / "validation").is_dir())
    if not folds:
        raise ValueError(f"{run}: no fold_*/{method}/validation folder (an experiments.compare output?)")
    data = [(normal_slices(fold / method / "validation", method), normal_slices(fold / method, method)[0])
            for fold in folds]
    target = 1.0 - fpr

    def within(specificities: np.ndarray) -> np.ndarray:
        return np.abs(specificities - target) <= tolerance + 1e-12

    lines = [
        f"Held-out specificity of `{method}` (target {target:.2f}, tolerance {tolerance:.2f}): validation patients "
        f"halved {repeats} times per fold (seed {seed}), and the test patients of each fold.", "",
        "| threshold rule | halved validation: mean | sd | within tolerance | test, per fold | test folds within |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for rule in THRESHOLD_RULES:
        nested = np.concatenate([_nested(fold / method, val, rule, fpr, repeats, seed + i)
                                 for i, (fold, (val, _)) in enumerate(zip(folds, data, strict=True))])
        test = np.array([specificity_at(val, normal_test, rule, fpr) for val, normal_test in data])
        lines.append(f"| {rule} | {nested.mean():.3f} | {nested.std():.3f} | {within(nested).mean():.2f} | "
                     f"{', '.join(f'{value:.3f}' for value in test)} | {int(within(test).sum())} of {test.size} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = run_parser(__doc__, "fold_*/METHOD/validation")
    parser.add_argument("--fpr", type=float, default=0.05, help="target false positive rate (default 0.05)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="how far from the target counts as on it")
    parser.add_argument("--repeats", type=int, default=200, help="random halvings per fold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return write_run_report(args.run, "threshold_transfer", args.method, lambda: transfer_table(
        args.run, args.method, args.fpr, args.tolerance, args.repeats, args.seed))


if __name__ == "__main__":
    sys.exit(main())
