"""``python -m scripts.evaluation``: evaluate inference output folders (see ``scripts.evaluation.evaluate``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from scripts.data.datalist import load_datalist
from scripts.evaluation.evaluate import DEFAULT_METHOD, LEVELS, evaluate
from scripts.evaluation.metrics import MAX_PIXELS, THRESHOLD_RULES


def _name_dir(text: str) -> tuple[str, str]:
    """Parse ``NAME=DIR``."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation", description="Evaluate inference output folders: detection metrics, thresholds, pixel metrics and plots.")
    parser.add_argument("--output-dir", required=True, help="inference output folder (default method and eval dir)")
    parser.add_argument("--eval-dir", help="where the metrics and plots go (default: --output-dir)")
    parser.add_argument("--method", action="append", type=_name_dir, metavar="NAME=DIR",
                        help="evaluate this method's inference output instead of --output-dir alone (repeatable)")
    parser.add_argument("--validation-output-dir", action="append", metavar="DIR|NAME=DIR",
                        help="validation inference output (thresholds): DIR for the first method, or NAME=DIR "
                        "per method (repeatable)")
    parser.add_argument("--fpr", type=float, default=0.05, help="target false positive rate on normal validation cases")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="cross_fitted",
                        help="cross_fitted: the quantile level cross-fitted over the validation patients (default); "
                        "quantile: the plain 1 - fpr quantile")
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
        datalist=load_datalist(args.datalist, args.split) if args.datalist else None,
        fpr=args.fpr,
        max_pixels=args.max_pixels,
        threshold_rule=args.threshold_rule,
    )


if __name__ == "__main__":
    main()
