"""AnomalyScorer + AnomalyScoreWriter: CSV contents, labels, trivial scores and per-case failures."""

import csv

import numpy as np
import pytest
import torch
from torch import nn

from scripts.data.rules import AMBIGUOUS, slice_labels
from scripts.data.transforms import to_original_grid
from scripts.outputs.writer import AnomalyScoreWriter
from scripts.scoring.engine import AnomalyScorer
from scripts.scoring.inferer import PatchRankingInferer


class Half(nn.Module):
    def forward(self, x):
        return torch.full_like(x, 0.5)


def volume_batch(case_id, depth=6, lesion_slice=3, label=1):
    image = torch.zeros(1, 1, 16, 16, depth)
    image[..., 1:-1] = 0.5
    seg = torch.zeros(1, 1, 16, 16, depth, dtype=torch.uint8)
    seg[0, 0, 2:12, 2:12, lesion_slice] = 1
    image[0, 0, 4:8, 4:8, lesion_slice] = 1.5
    meta = {"original_affine": torch.eye(4).unsqueeze(0)}
    return {"image": image, "seg": seg, "case_id": [case_id], "label": torch.tensor([label]), "image_meta_dict": meta}


def read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run(batches, tmp_path, inferer=None):
    inferer = inferer or PatchRankingInferer(image_size=16, patch_size=4, test_input="image")
    evaluator = AnomalyScorer(device="cpu", val_data_loader=batches, network=Half(), inferer=inferer)
    AnomalyScoreWriter(tmp_path, min_lesion_voxels=20, overlay_slices=2).attach(evaluator)
    evaluator.run()


def test_writer_rows_labels_and_heatmaps(tmp_path):
    run([volume_batch("A")], tmp_path)
    cases = read(tmp_path / "scores.csv")
    assert cases == [{"case_id": "A", "score": cases[0]["score"], "label": "1"}]
    rows = read(tmp_path / "slice_scores.csv")
    assert [int(r["slice_index"]) for r in rows] == [1, 2, 3, 4]  # empty end slices are not scored
    by_index = {int(r["slice_index"]): r for r in rows}
    assert by_index[3]["label"] == "1" and by_index[2]["label"] == "0"
    assert float(by_index[3]["score"]) > float(by_index[2]["score"])
    assert float(by_index[3]["trivial_intensity"]) == pytest.approx(1.5)
    assert float(by_index[3]["trivial_position"]) > float(by_index[1]["trivial_position"])
    assert (tmp_path / "heatmaps" / "A_heatmap.nii.gz").exists()
    assert (tmp_path / "overlays" / "A_top_slices.png").exists()
    assert read(tmp_path / "errors.csv") == []


def test_a_case_that_cannot_be_scored_is_listed_and_the_others_are_written(tmp_path):
    broken = volume_batch("B")
    broken["image"] = torch.zeros(1, 1, 16, 16, 4)  # nothing but background: no slice to score
    broken["image"][0, 0, 0, 0, 0] = 1.0
    failing = {"case_id": ["C"], "error": ["InputError: /data/C_flair.nii.gz: file not found"]}

    class Picky(PatchRankingInferer):
        def score(self, inputs, network):
            if inputs.shape[-1] == 4:
                raise ValueError("volume too small to score")
            return super().score(inputs, network)

    run([volume_batch("A"), broken, failing], tmp_path, Picky(image_size=16, patch_size=4, test_input="image"))
    assert [r["case_id"] for r in read(tmp_path / "scores.csv")] == ["A"]
    errors = {r["case_id"]: r["error"] for r in read(tmp_path / "errors.csv")}
    assert set(errors) == {"B", "C"} and "too small" in errors["B"] and "C_flair.nii.gz" in errors["C"]


def test_slice_labels_follow_the_lesion_voxel_rule():
    seg = torch.zeros(3, 1, 10, 10)
    seg[1, 0, :2, :5] = 1  # 10 voxels: ambiguous
    seg[2, 0, :5, :5] = 1  # 25 voxels
    assert slice_labels(seg, 20).tolist() == [0, AMBIGUOUS, 1]


def test_heatmaps_go_back_to_the_input_orientation():
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = np.arange(24, dtype=float).reshape(2, 3, 4)
    back = to_original_grid(ras, lps)
    np.testing.assert_array_equal(back, ras[::-1, ::-1, :])
