"""Evaluation of inference outputs: metrics, thresholds, plots, report and the patch-level protocol."""
