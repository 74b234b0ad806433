"""experiments.threshold_transfer: the spread of held-out specificity, from validation patients only."""

import numpy as np
import pytest

from experiments.threshold_transfer import main, nested_specificities
from scripts.outputs.formats import write_table

HEADER = ["case_id", "slice_index", "score", "label"]


def patients(rng, n, offset_sd, prefix):
    """Normal slices of ``n`` patients, each shifted by its own offset (scanner, head, shading), 25 slices each."""
    offsets = rng.normal(0, offset_sd, n)
    scores = np.concatenate([rng.normal(o, 0.5, 25) for o in offsets])
    return scores, np.repeat([f"{prefix}{i:02d}" for i in range(n)], 25)


def write_fold(folder, rng, offset_sd):
    """A compare fold: the method's test slices (normal and some abnormal) and its validation patients' slices."""
    for where, prefix in ((folder, "test"), (folder / "validation", "val")):
        scores, ids = patients(rng, 11, offset_sd, prefix)
        rows = [[case, i, score, 0] for i, (case, score) in enumerate(zip(ids, scores, strict=True))]
        rows += [[f"{prefix}00", 99, 9.0, 1]]  # an abnormal slice: not a normal one, never counted
        write_table(where / "slice_scores.csv", HEADER, rows)


def test_halved_validation_finds_the_plain_quantile_optimistic_and_the_cross_fitted_level_on_target():
    rng = np.random.default_rng(0)
    validation = patients(rng, 12, 1.0, "p")
    plain = nested_specificities(validation, "quantile", 0.05, repeats=60, seed=0)
    crossed = nested_specificities(validation, "cross_fitted", 0.05, repeats=60, seed=0)
    assert plain.mean() < 0.93  # six patients' 95th percentile is optimistic for six others
    assert abs(crossed.mean() - 0.95) < abs(plain.mean() - 0.95)
    independent = patients(rng, 12, 0.0, "p")  # no patient effect: both rules are on target
    assert nested_specificities(independent, "quantile", 0.05, repeats=60, seed=0).mean() == pytest.approx(0.95, abs=0.02)


def test_the_table_has_every_rule_and_the_test_specificity_of_every_fold(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for k in range(2):
        write_fold(tmp_path / f"fold_{k}" / "patchgan_ranking", rng, offset_sd=1.0)
    assert main([str(tmp_path), "--repeats", "20"]) == 0
    table = (tmp_path / "threshold_transfer_patchgan_ranking.md").read_text()
    assert table in capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"cross_fitted", "quantile"}
    assert rows["cross_fitted"].endswith("of 2 |") and rows["cross_fitted"].count(", ") == 1  # two folds' test figures


def test_a_folder_without_folds_or_with_too_few_patients_is_an_error_in_words(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no fold_*/patchgan_ranking/validation" in capsys.readouterr().err
    assert main([str(tmp_path), "--method", "../elsewhere"]) == 2  # the table is written inside the run folder only
    scores, ids = patients(np.random.default_rng(2), 3, 1.0, "p")
    with pytest.raises(ValueError, match="3 validation patient"):
        nested_specificities((scores, ids), "cross_fitted", 0.05, repeats=5, seed=0)
    with pytest.raises(ValueError, match="threshold_rule"):
        nested_specificities(patients(np.random.default_rng(3), 6, 1.0, "p"), "median", 0.05, repeats=2, seed=0)
