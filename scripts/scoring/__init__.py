"""Scoring: anomaly maps, the patch grid and targeted ranking, the inferer, the scoring engine, calibration, references."""
