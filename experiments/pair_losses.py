"""Where a pooled slice AUROC is lost: in pairs of slices of one patient, or of two.

A pooled AUROC is the share of (abnormal slice, normal slice) pairs that a score orders right (ties count half).
``1 - AUROC`` splits exactly into the pairs lost **within** a patient (the score misorders that patient's own
slices) and those lost **across** patients (one patient's normal slice outscores another's abnormal one: the
patients do not share a scale). The across part is also split by the patient of the abnormal slice. Reads the
test slices of each fold of an ``experiments.compare`` output, as the evaluation reads them
(``evaluate.read_tables``, ``evaluate.labelled_rows``: the derived volume-z references included).

    python -m experiments.pair_losses runs/lgg_v080_seed1 --fold fold_4

Writes ``pair_losses_<method>.md`` into the run folder and prints it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.reports import run_parser, write_run_report
from scripts.data.rules import check_case_id
from scripts.evaluation.evaluate import Rows, labelled_rows, read_tables

DEFAULT_COLUMNS = ("score", "trivial_intensity_volume_lower_half")


def pair_losses(rows: Rows) -> tuple[float, float, dict[str, float]]:
    """``(within, across, across by patient)``: the shares of all (abnormal, normal) pairs that ``rows`` orders
    wrong within one patient and across two, and the across share by the abnormal slice's patient. Their sum
    ``within + across`` is ``1 - AUROC``."""
    abnormal = rows.labels == 1
    if abnormal.all() or not abnormal.any():
        raise ValueError("both normal and abnormal slices are needed")
    high, low = rows.scores[abnormal][:, None], rows.scores[~abnormal][None, :]
    lost = (low > high) + 0.5 * (low == high)
    across = rows.case_ids[abnormal][:, None] != rows.case_ids[~abnormal][None, :]
    lost_across = (lost * across).sum(1) / lost.size
    patients = rows.case_ids[abnormal]
    by_patient = {str(case): float(lost_across[patients == case].sum()) for case in np.unique(patients)}
    return float((lost * ~across).sum() / lost.size), float(lost_across.sum()), by_patient


def losses_table(run: Path, method: str, folds: Sequence[str], columns: Sequence[str]) -> str:
    """The markdown table of ``pair_losses`` for each fold and score column (see the module docstring)."""
    folds = list(folds) or sorted(path.name for path in run.glob("fold_*") if (path / method).is_dir())
    if not folds:
        raise ValueError(f"{run}: no fold_*/{method} folder (an experiments.compare output?)")
    lines = [f"Pairs (abnormal slice, normal slice) of `{method}`'s test slices that each score orders wrong, as a "
             "share of all pairs (1 - AUROC = within + across).", "",
             "| fold | score | AUROC | lost within a patient | lost across patients | most lost across, by abnormal patient |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for fold in folds:
        folder = run / check_case_id(fold, "--fold", "fold folder") / method
        slices = read_tables(folder)[1]
        for column in columns:
            rows = labelled_rows(method, slices, column)
            if rows is None:
                raise ValueError(f"{folder}: no labelled slices with a {column!r} column")
            within, across, by_patient = pair_losses(rows)
            worst = sorted(by_patient.items(), key=lambda item: -item[1])[:3]
            lines.append(f"| {fold} | {column} | {1 - within - across:.3f} | {within:.3f} | {across:.3f} | "
                         f"{', '.join(f'{case} {share:.3f}' for case, share in worst)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = run_parser(__doc__, "fold_*/METHOD")
    parser.add_argument("--fold", action="append", default=[], help="a fold folder name (repeatable; default: all)")
    parser.add_argument("--column", action="append", default=[],
                        help=f"a score column of slice_scores.csv or a derived reference (repeatable; default: "
                             f"{', '.join(DEFAULT_COLUMNS)})")
    args = parser.parse_args(argv)
    columns = args.column or DEFAULT_COLUMNS
    return write_run_report(args.run, "pair_losses", args.method,
                            lambda: losses_table(args.run, args.method, args.fold, columns))


if __name__ == "__main__":
    sys.exit(main())
