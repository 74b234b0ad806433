"""Cross-validation summary on hand-written fold outputs."""

import json

import numpy as np
import pytest

from experiments.cv_summary import main


def write_scores(folder, scores, labels):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["case_id,slice_index,score,trivial_intensity,trivial_position,trivial_darkness,label"]
    rows += [f"c,{i},{s},{i % 3},{1 - i / len(scores)},0.5,{y}" for i, (s, y) in enumerate(zip(scores, labels))]
    (folder / "slice_scores.csv").write_text("\n".join(rows) + "\n")
    (folder / "scores.csv").write_text(f"case_id,score,label\nc,{max(scores)},1\n")


def test_summary_averages_folds_and_uses_validation_thresholds(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0] * 20 + [1] * 20
    for fold in range(2):
        separable = list(rng.normal(0, 1, 20)) + list(rng.normal(5, 1, 20))
        write_scores(tmp_path / f"fold{fold}" / "ranking", separable, labels)
        write_scores(tmp_path / f"fold{fold}" / "ranking" / "validation", list(rng.normal(0, 1, 20)), [0] * 20)
        write_scores(tmp_path / f"fold{fold}" / "no_ranking", list(rng.normal(0, 1, 40)), labels)
    assert main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranking"]["auc"]["mean"] > 0.95
    assert summary["no_ranking"]["auc"]["mean"] == pytest.approx(0.5, abs=0.2)
    assert len(summary["ranking"]["auc"]["per_fold"]) == 2
    assert summary["ranking"]["specificity"]["mean"] is not None
    assert "trivial_intensity" in summary
    assert "| ranking |" in (tmp_path / "summary.md").read_text()
