"""The written form of an evaluation: markdown tables and strict JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# how each threshold_rule (metrics.THRESHOLD_RULES) sets the threshold, formatted with the target specificity
THRESHOLD_TEXT = {
    "cross_fitted": "a quantile of the normal validation scores whose level is cross-fitted over the validation "
                    "patients, so that about {:g} of the normal slices of a patient left out stay below it",
    "quantile": "the {:g} quantile of the normal validation scores",
}


def metrics_markdown(results: Mapping[str, Mapping[str, Any]], level: str, fpr: float) -> str:
    """The results as markdown tables: detection at ``level``, then case-level and pixel-level when present."""
    lines = [
        f"# Anomaly detection, {level} level",
        "",
        f"Threshold (thr), target false positive rate {fpr:g}: {THRESHOLD_TEXT[_rule(results)].format(1 - fpr)}; "
        f"a score above it is called abnormal. thr quantile: the level used ({1 - fpr:g} with fewer than two "
        "validation patients). n/a: no validation scores given.",
        "",
        *_table(
            ["method", "AUROC", "AP", "n normal", "n abnormal", "sens@thr", "spec@thr", "spec 95% CI", "thr quantile",
             "level R²", "AUROC beyond level"],
            [[name, r["auc"], r["ap"], r["n_normal"], r["n_abnormal"], r["sensitivity"], r["specificity"],
              _interval(r.get("specificity_ci95")), r.get("threshold_level", ""), r.get("level_r2", ""),
              r.get("level_adjusted_auc", "")]
             for name, r in results.items()],
        ),
    ]
    if level == "slice":
        lines += ["", "spec 95% CI: bootstrap over test patients (their normal slices move together). level R²: share "
                  "of the score's variance on normal test slices that a quadratic in the axial level explains (0: "
                  "the level says nothing; trivial_position is the level itself). AUROC beyond level: AUROC of the "
                  "score minus the normal score expected at the slice's level (a quadratic fitted on the normal "
                  "validation slices): what the score detects that the axial position does not."]
    failed = {name: r["n_failed_cases"] for name, r in results.items() if r.get("n_failed_cases")}
    if failed:
        lines += ["", "**Failed cases are not in these figures**: " + ", ".join(
            f"{name}: {n} case(s) (its errors.csv)" for name, n in failed.items()) + "."]
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


def _rule(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The threshold rule the results were evaluated with (the default when none had a threshold)."""
    return next((r["threshold_rule"] for r in results.values() if "threshold_rule" in r), "cross_fitted")


def _interval(bounds: Any) -> str:
    if not bounds or not all(np.isfinite(bounds)):
        return "n/a"
    return f"{bounds[0]:.3f}-{bounds[1]:.3f}"


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
