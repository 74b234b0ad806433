"""experiments.pair_losses: 1 - AUROC split into pairs lost within a patient and across patients."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.pair_losses import main, pair_losses
from scripts.evaluation.evaluate import Rows
from scripts.outputs.formats import write_table


def offset_patients():
    """Three patients whose abnormal slices always outscore their own normal ones, but whose offsets differ: every
    pair lost is lost across patients. Patient c ties one of b's normal slices."""
    ids = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    labels = np.array([0, 0, 1, 1] * 3)
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0, 5.0, 6.0, 11.0, 14.0])
    return Rows(labels, scores, ids)


def test_losses_add_up_to_one_minus_auroc_and_sit_where_the_patients_differ():
    rows = offset_patients()
    within, across, by_patient = pair_losses(rows)
    assert within == 0.0
    assert within + across == pytest.approx(1 - roc_auc_score(rows.labels, rows.scores))
    assert sum(by_patient.values()) == pytest.approx(across)
    assert by_patient["b"] == 0.0 and by_patient["a"] > by_patient["c"] > 0  # a is below everyone, c ties b once
    shuffled = Rows(rows.labels, rows.scores[::-1].copy(), rows.case_ids)  # now each patient is misordered too
    within, across, _ = pair_losses(shuffled)
    assert within > 0 and within + across == pytest.approx(1 - roc_auc_score(shuffled.labels, shuffled.scores))


def test_the_table_names_each_fold_and_column_and_bad_input_is_an_error_in_words(tmp_path, capsys):
    rows = offset_patients()
    folder = tmp_path / "fold_0" / "patchgan_ranking"
    table = [[case, i, score, score / 2, label] for i, (case, score, label)
             in enumerate(zip(rows.case_ids, rows.scores, rows.labels, strict=True))]
    write_table(folder / "slice_scores.csv", ["case_id", "slice_index", "score", "trivial_intensity", "label"], table)
    assert main([str(tmp_path)]) == 0
    written = (tmp_path / "pair_losses_patchgan_ranking.md").read_text()
    assert written in capsys.readouterr().out
    assert "| fold_0 | score | 0.764 | 0.000 | 0.236 |" in written  # 27.5 of the 36 pairs ordered right
    assert "| fold_0 | trivial_intensity_volume_lower_half |" in written
    assert main([str(tmp_path), "--fold", "../fold_0"]) == 2
    assert "fold folder '../fold_0' cannot name" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no fold_*/patchgan_ranking" in capsys.readouterr().err
    assert main([str(tmp_path), "--column", "missing"]) == 2
    assert "no labelled slices with a 'missing' column" in capsys.readouterr().err
