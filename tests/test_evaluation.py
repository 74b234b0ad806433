"""Evaluation: metrics against scikit-learn, normal-only thresholds, pixel metrics, and the written report."""

import csv
import json
import logging
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from scripts.evaluation.__main__ import main
from scripts.evaluation.evaluate import evaluate
from scripts.evaluation.metrics import (
    best_dice,
    cross_fitted_level,
    detection_metrics,
    operating_point,
    pixel_metrics,
    threshold_from_normal,
)
from scripts.outputs.formats import read_scores
from scripts.scoring.references import volume_standardised_intensity

SLICE_HEADER = ["case_id", "slice_index", "score", "trivial_intensity", "trivial_position", "label"]


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def fake_run(folder, rng, n_normal=30, n_abnormal=20, shift=1.5, cases=("001", "002", "003", "004")):
    """scores.csv and slice_scores.csv of a run whose abnormal slices score ``shift`` higher on average."""
    labels = [0] * n_normal + [1] * n_abnormal
    rows = []
    for i, label in enumerate(labels):
        score = rng.normal(shift * label, 1.0)
        rows.append([cases[i % len(cases)], i, score, rng.normal(0.5 * label, 1.0), rng.uniform(), label])
    rows.append([cases[0], 99, 0.3, math.nan, 0.1, ""])  # an unlabelled slice: ignored
    write_csv(folder / "slice_scores.csv", SLICE_HEADER, rows)
    write_csv(folder / "scores.csv", ["case_id", "score", "label"], [[c, i * 0.5, i % 2] for i, c in enumerate(cases)])
    return np.array(labels), np.array([r[2] for r in rows[:-1]])


def test_detection_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(labels * 0.8, 1.0)
    out = detection_metrics(labels, scores)
    assert out["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert (out["n_normal"], out["n_abnormal"]) == (int((labels == 0).sum()), int((labels == 1).sum()))


def test_detection_metrics_nan_with_a_warning_when_one_class_is_missing(caplog):
    with caplog.at_level(logging.WARNING):
        out = detection_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(out["auc"]) and math.isnan(out["ap"])
    assert (out["n_normal"], out["n_abnormal"]) == (3, 0)
    assert "undefined" in caplog.text


def test_cross_fitted_level_is_the_smallest_level_whose_left_out_specificity_reaches_the_target():
    # patient a: 0 1 2 3, patient b: 1 2 3 4, target specificity 0.75 (6 of the 8 left-out slices at or below).
    # Leaving a out, the threshold is b's quantile 1 + 3L; leaving b out, a's quantile 3L. At L = 2/3: all 4 of a
    # (<= 3) and 2 of b (<= 2) are kept, 6 of 8; just below 2/3, 3 + 1. The plain quantile level would be 0.75.
    scores, groups = np.array([0, 1, 2, 3, 1, 2, 3, 4.0]), np.array(["a"] * 4 + ["b"] * 4)
    assert cross_fitted_level(scores, groups, fpr=0.25) == pytest.approx(2 / 3, abs=1e-3)
    assert cross_fitted_level(scores, np.array(["a"] * 8), fpr=0.25) == 0.75  # one patient: nothing to leave out
    # a patient whose normal slices all lie above the others' maximum: no level reaches the target, the maximum it is
    assert cross_fitted_level([0, 1, 10, 11], ["a", "a", "b", "b"], fpr=0.05) == 1.0
    with pytest.raises(ValueError, match="groups"):
        cross_fitted_level([0, 1, 2], ["a", "b"], fpr=0.05)
    # rows that are each their own group (patch level) are left out 20 folds at a time: i.i.d. rows need no correction
    rows = np.random.default_rng(0).normal(size=20_000)
    assert cross_fitted_level(rows, np.arange(rows.size).astype(str), fpr=0.05) == pytest.approx(0.95, abs=0.005)


def test_cross_fitted_threshold_holds_on_new_patients_where_the_plain_quantile_does_not():
    rng = np.random.default_rng(0)

    def patients(n):  # each patient's normal slices shifted by its own offset (scanner, head, shading)
        offsets = rng.normal(0, 1, n)
        return np.concatenate([rng.normal(o, 0.5, 25) for o in offsets]), np.repeat(np.arange(n).astype(str), 25)

    plain, crossed = [], []
    for _ in range(40):
        validation, groups = patients(11)
        new, _ = patients(11)
        level = cross_fitted_level(validation, groups, fpr=0.05)
        plain.append(np.mean(new <= threshold_from_normal(validation, 0.05)))
        crossed.append(np.mean(new <= threshold_from_normal(validation, 0.05, level)))
    assert np.mean(plain) < 0.94  # 11 patients' 95th percentile is optimistic for new patients
    assert abs(np.mean(crossed) - 0.95) < abs(np.mean(plain) - 0.95)


def test_threshold_uses_normal_scores_only_and_gives_the_target_specificity():
    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, 100)
    labels = np.r_[np.zeros(100, int), np.ones(30, int)]
    thresholds = set()
    for abnormal_mean in (0.0, 3.0, -5.0):
        validation_scores = np.r_[normal, rng.normal(abnormal_mean, 1, 30)]
        thresholds.add(threshold_from_normal(validation_scores[labels == 0], fpr=0.05))
    assert len(thresholds) == 1
    threshold = thresholds.pop()
    point = operating_point(np.zeros(100, int), normal, threshold)
    assert point["specificity"] == pytest.approx(0.95, abs=0.01)
    assert math.isnan(point["sensitivity"])
    assert threshold_from_normal(normal, fpr=0.2) < threshold


def test_evaluate_threshold_ignores_abnormal_validation_rows(tmp_path):
    fake_run(tmp_path / "test", np.random.default_rng(10))
    thresholds = set()
    for shift in (0.0, 5.0):
        fake_run(tmp_path / "val", np.random.default_rng(11), n_abnormal=10, shift=shift)  # same normal rows
        thresholds.add(evaluate(tmp_path / "test", validation_output_dir=tmp_path / "val")["model"]["threshold"])
    assert len(thresholds) == 1


def test_operating_point_counts_scores_above_the_threshold_as_abnormal():
    point = operating_point([0, 0, 0, 1, 1], [0.1, 0.5, 0.9, 0.5, 1.0], threshold=0.5)
    assert point == {"sensitivity": 0.5, "specificity": pytest.approx(2 / 3), "threshold": 0.5}


def test_pixel_metrics_perfect_and_inverted_heatmaps():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    heatmap = mask * 0.9 + 0.05
    perfect = pixel_metrics([heatmap], [mask])
    assert perfect["pixel_auc"] == 1.0 and perfect["pixel_ap"] == 1.0
    assert perfect["dice_best_upper_bound"] == 1.0
    inverted = pixel_metrics([1.0 - heatmap], [mask])
    assert inverted["pixel_auc"] == 0.0


def test_pixel_metrics_count_only_pixels_inside_the_region():
    mask = np.zeros((6, 6), np.uint8)
    mask[2:4, 2:4] = 1
    heatmap = mask.astype(float)
    heatmap[0, :] = 5.0  # very hot background row outside the region
    region = np.ones((6, 6), bool)
    region[0, :] = False
    assert pixel_metrics([heatmap], [mask])["pixel_auc"] < 1.0
    inside = pixel_metrics([heatmap], [mask], [region])
    assert inside["pixel_auc"] == 1.0 and inside["n_pixels"] == 30


def test_best_dice_equals_a_brute_force_threshold_loop():
    rng = np.random.default_rng(2)
    lesion = rng.random(300) < 0.2
    scores = np.round(rng.normal(lesion * 1.0, 1.0), 1)  # rounding makes ties
    brute = max(
        2 * np.sum((scores >= t) & lesion) / (np.sum(scores >= t) + lesion.sum()) for t in np.unique(scores)
    )
    dice, threshold = best_dice(lesion, scores)
    assert dice == pytest.approx(brute)
    predicted = scores >= threshold
    assert 2 * np.sum(predicted & lesion) / (predicted.sum() + lesion.sum()) == pytest.approx(dice)


def test_pixel_metrics_subsample_deterministically_above_the_cap():
    rng = np.random.default_rng(3)
    masks = [rng.random((40, 40)) < 0.1 for _ in range(3)]
    heatmaps = [m + rng.normal(0, 1, m.shape) for m in masks]
    full = pixel_metrics(heatmaps, masks)
    capped = [pixel_metrics(heatmaps, masks, max_pixels=1200, seed=7) for _ in range(2)]
    assert capped[0] == capped[1]
    assert capped[0]["n_pixels"] == 1200 and full["n_pixels"] == 4800
    assert capped[0]["pixel_auc"] == pytest.approx(full["pixel_auc"], abs=0.08)


def test_read_scores_types_the_columns(tmp_path):
    fake_run(tmp_path, np.random.default_rng(4))
    cases, slices = read_scores(tmp_path)
    assert cases["case_id"].tolist() == ["001", "002", "003", "004"]  # ids stay text
    assert slices["label"][-1] == -1 and slices["label"].dtype.kind == "i"
    assert slices["slice_index"].dtype.kind == "i" and math.isnan(slices["trivial_intensity"][-1])
    with pytest.raises(FileNotFoundError):
        read_scores(tmp_path / "nothing")


def assert_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_the_plain_quantile_rule_is_there_from_the_command_line(tmp_path):
    rng = np.random.default_rng(5)
    fake_run(tmp_path / "test", rng)
    fake_run(tmp_path / "val", rng, n_normal=40, n_abnormal=0)
    results = main(["--output-dir", str(tmp_path / "test"), "--validation-output-dir", str(tmp_path / "val"),
                    "--threshold-rule", "quantile"])
    _, val = read_scores(tmp_path / "val")
    assert results["model"]["threshold"] == pytest.approx(threshold_from_normal(val["score"][val["label"] == 0], 0.05))
    assert results["model"]["threshold_level"] == 0.95
    assert "the 0.95 quantile of the normal validation scores" in (tmp_path / "test" / "metrics.md").read_text()
    with pytest.raises(ValueError, match="threshold_rule"):
        evaluate(tmp_path / "test", validation_output_dir=tmp_path / "val", threshold_rule="percentile")


def test_evaluate_writes_metrics_and_plots(tmp_path):
    rng = np.random.default_rng(5)
    labels, scores = fake_run(tmp_path / "test", rng)
    fake_run(tmp_path / "val", rng, n_normal=40, n_abnormal=0)
    results = evaluate(tmp_path / "test", eval_dir=tmp_path / "eval", validation_output_dir=tmp_path / "val")
    for name in ("metrics.json", "metrics.md", "roc.png", "score_distribution.png"):
        assert (tmp_path / "eval" / name).is_file()
    assert not list((tmp_path / "eval").glob(".*"))  # no temporary files left behind
    assert_png(tmp_path / "eval" / "roc.png")
    assert_png(tmp_path / "eval" / "score_distribution.png")
    assert set(results) == {"model", "trivial_intensity", "trivial_intensity_volume_z",
                            "trivial_intensity_volume_lower_half", "trivial_position"}
    _, test = read_scores(tmp_path / "test")
    z = volume_standardised_intensity(test["trivial_intensity"], test["case_id"])  # the like-for-like floor
    keep = (test["label"] >= 0) & np.isfinite(z)
    assert results["trivial_intensity_volume_z"]["auc"] == pytest.approx(roc_auc_score(test["label"][keep], z[keep]))
    model = results["model"]
    assert model["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert (model["n_normal"], model["n_abnormal"]) == (30, 20)
    _, val = read_scores(tmp_path / "val")
    normal = val["label"] == 0
    level = cross_fitted_level(val["score"][normal], val["case_id"][normal], 0.05)
    expected = threshold_from_normal(val["score"][normal], 0.05, level)
    assert model["threshold_level"] == level and model["threshold_rule"] == "cross_fitted"
    assert model["threshold"] == pytest.approx(expected)
    assert model["specificity"] == pytest.approx(np.mean(scores[labels == 0] <= expected))
    assert model["case"]["n_normal"] == 2 and model["case"]["n_abnormal"] == 2
    assert math.isfinite(results["trivial_intensity"]["threshold"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["model"]["auc"] == pytest.approx(model["auc"])
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| method | AUROC | AP | n normal | n abnormal | sens@thr | spec@thr |" in table
    assert "| trivial_position |" in table


def test_evaluate_without_validation_reports_no_operating_point(tmp_path):
    fake_run(tmp_path, np.random.default_rng(6))
    results = evaluate(tmp_path)
    assert math.isnan(results["model"]["sensitivity"]) and results["model"]["threshold_source"] is None
    assert json.loads((tmp_path / "metrics.json").read_text())["model"]["threshold"] is None  # strict JSON
    assert "n/a" in (tmp_path / "metrics.md").read_text()


def test_evaluate_several_methods_from_the_command_line(tmp_path):
    rng = np.random.default_rng(7)
    fake_run(tmp_path / "gan", rng, shift=2.0)
    fake_run(tmp_path / "ae", rng, shift=0.5)
    fake_run(tmp_path / "val_ae", rng, n_abnormal=0)
    results = main([
        "--output-dir", str(tmp_path / "gan"), "--eval-dir", str(tmp_path / "eval"),
        "--method", f"patchgan={tmp_path / 'gan'}", "--method", f"ae={tmp_path / 'ae'}",
        "--validation-output-dir", f"ae={tmp_path / 'val_ae'}", "--fpr", "0.1",
    ])
    assert {"patchgan", "ae", "trivial_intensity"} <= set(results)
    assert math.isfinite(results["ae"]["threshold"]) and math.isnan(results["patchgan"]["threshold"])
    assert results["patchgan"]["auc"] > results["ae"]["auc"]
    assert_png(tmp_path / "eval" / "roc.png")


def write_volume_case(root, case_id, with_heatmap=True):
    """A tiny FLAIR-like volume (zero background), its lesion mask and a heatmap hot on the lesion."""
    image = np.zeros((12, 12, 6), np.float32)
    image[2:10, 2:10, :] = 1.0
    seg = np.zeros(image.shape, np.uint8)
    seg[4:7, 4:7, 2:4] = 1
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(image, affine), root / f"{case_id}_flair.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), root / f"{case_id}_seg.nii.gz")
    if with_heatmap:
        heatmap = seg.astype(np.float32) * 0.8 + 0.1
        heatmap[0, 0, 0] = 10.0  # background voxel outside the brain: must not count
        (root / "run" / "heatmaps").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(heatmap, affine), root / "run" / "heatmaps" / f"{case_id}_heatmap.nii.gz")
    return {"case_id": case_id, "image": str(root / f"{case_id}_flair.nii.gz"),
            "seg": str(root / f"{case_id}_seg.nii.gz")}


def test_pixel_metrics_from_heatmaps_skip_a_missing_heatmap_or_mask(tmp_path, caplog):
    cases = ("001", "002", "003", "004")
    fake_run(tmp_path / "run", np.random.default_rng(8), cases=cases)
    datalist = [write_volume_case(tmp_path, c, with_heatmap=c != "002") for c in cases]
    (tmp_path / "004_seg.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        results = evaluate(tmp_path / "run", datalist=datalist)
    pixel = results["model"]["pixel"]
    assert pixel["n_cases"] == 2 and "case 002" in caplog.text and "case 004" in caplog.text
    assert pixel["pixel_auc"] == 1.0 and pixel["dice_best_upper_bound"] == 1.0
    assert pixel["n_pixels"] == 2 * 8 * 8 * 6  # brain voxels only
    assert "Pixel level" in (tmp_path / "run" / "metrics.md").read_text()


def test_pixel_metrics_from_2d_png_heatmaps(tmp_path):
    fake_run(tmp_path / "run", np.random.default_rng(9), cases=("isic1",))
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "isic1_mask.png")
    heatmap = np.full((40, 40), 100, np.uint16)  # heatmaps are written at the picture's own size
    heatmap[10:30, 10:30] = 3000
    (tmp_path / "run" / "heatmaps").mkdir()
    Image.fromarray(heatmap).save(tmp_path / "run" / "heatmaps" / "isic1_heatmap.png")
    item = {"case_id": "isic1", "image": str(tmp_path / "isic1.png"), "seg": str(tmp_path / "isic1_mask.png")}
    pixel = evaluate(tmp_path / "run", datalist=[item])["model"]["pixel"]
    assert pixel["pixel_auc"] == 1.0 and pixel["n_pixels"] == 1600


def test_a_mask_of_another_size_is_named_and_skipped_for_pixel_metrics(tmp_path, caplog):
    fake_run(tmp_path / "run", np.random.default_rng(9), cases=("isic1", "isic2"))
    (tmp_path / "run" / "heatmaps").mkdir()
    items = []
    for case_id, mask_size in (("isic1", 40), ("isic2", 30)):
        mask = np.zeros((mask_size, mask_size), np.uint8)
        mask[10:20, 10:20] = 255
        Image.fromarray(mask).save(tmp_path / f"{case_id}_mask.png")
        heatmap = np.full((40, 40), 100, np.uint16)
        heatmap[10:20, 10:20] = 3000
        Image.fromarray(heatmap).save(tmp_path / "run" / "heatmaps" / f"{case_id}_heatmap.png")
        items.append({"case_id": case_id, "image": str(tmp_path / f"{case_id}.png"), "seg": str(tmp_path / f"{case_id}_mask.png")})
    with caplog.at_level(logging.WARNING):
        pixel = evaluate(tmp_path / "run", datalist=items)["model"]["pixel"]
    assert pixel["n_cases"] == 1 and pixel["pixel_auc"] == 1.0
    assert "isic2" in caplog.text and "isic2_mask.png" in caplog.text and "differs from the image size" in caplog.text


def test_the_specificity_interval_resamples_patients_not_slices():
    from scripts.evaluation.metrics import clustered_rate_ci

    # patient a: 10 normal slices all called normal; patient b: 10 slices all false positives
    hits = np.array([True] * 10 + [False] * 10)
    groups = np.array(["a"] * 10 + ["b"] * 10)
    low, high = clustered_rate_ci(hits, groups, n_boot=4000)
    # resampling 2 patients gives 0, 0.5 or 1: the interval spans them; slice resampling would give ~0.3-0.7
    assert low == 0.0 and high == 1.0
    low, high = clustered_rate_ci(np.ones(30, dtype=bool), np.repeat(list("abc"), 10))
    assert low == high == 1.0
    assert all(np.isnan(clustered_rate_ci(np.array([]), np.array([]))))


def test_level_dependence_is_the_r2_of_a_quadratic_in_the_level():
    from scripts.data.rules import relative_levels
    from scripts.evaluation.metrics import level_dependence

    levels = relative_levels(["a"] * 5 + ["b"] * 3, [10, 11, 12, 13, 14, 0, 1, 2])
    assert levels.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.5, 1.0]
    assert level_dependence(levels, 3 * levels**2 - levels + 2) == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=400)
    assert abs(level_dependence(np.linspace(0, 1, 400), noise)) < 0.05
    assert np.isnan(level_dependence(np.full(8, 0.5), np.arange(8.0)))  # pictures: one level


def test_the_auc_beyond_level_keeps_what_a_score_adds_at_a_given_level():
    from scripts.evaluation.metrics import level_adjusted_auc

    rng = np.random.default_rng(1)
    levels = rng.random(2000)
    middle = 1 - np.abs(2 * levels - 1)  # tumours sit in the middle slices, the end slices are normal
    labels = (rng.random(2000) < middle).astype(int)
    val_levels = rng.random(500)  # the level curve comes from other patients' normal slices
    position = lambda lv: 1 - (2 * lv - 1) ** 2  # noqa: E731  (a smooth function of the level)
    assert detection_metrics(labels, middle)["auc"] > 0.75
    # a score that is the level alone detects "tumours", and nothing beyond the level
    level_only, val_level_only = position(levels) + rng.normal(0, 0.2, 2000), position(val_levels) + rng.normal(0, 0.2, 500)
    assert detection_metrics(labels, level_only)["auc"] > 0.7
    assert level_adjusted_auc(levels, level_only, labels, val_levels, val_level_only) == pytest.approx(0.5, abs=0.04)
    # a score that grows with the level *and* sees the lesion keeps what it sees
    seeing = position(levels) + 0.5 * labels + rng.normal(0, 0.2, 2000)
    normal_val = position(val_levels) + rng.normal(0, 0.2, 500)
    assert level_adjusted_auc(levels, seeing, labels, val_levels, normal_val) > 0.9
    assert np.isnan(level_adjusted_auc(levels, seeing, labels, np.full(5, 0.5), np.arange(5.0)))  # no level curve


def test_the_threshold_never_sees_the_test_labels_and_its_transfer_is_reported_per_patient(tmp_path):
    rng = np.random.default_rng(12)
    fake_run(tmp_path / "val", rng, n_normal=40, n_abnormal=0)
    labels, scores = fake_run(tmp_path / "test", np.random.default_rng(13))
    first = evaluate(tmp_path / "test", validation_output_dir=tmp_path / "val")["model"]
    # the same test scores with the labels flipped: AUROC changes, the threshold (validation normals) does not
    rows = list(csv.reader((tmp_path / "test" / "slice_scores.csv").open()))
    for row in rows[1:]:
        row[-1] = {"0": "1", "1": "0"}.get(row[-1], row[-1])
    write_csv(tmp_path / "test" / "slice_scores.csv", rows[0], rows[1:])
    second = evaluate(tmp_path / "test", validation_output_dir=tmp_path / "val")["model"]
    assert second["threshold"] == first["threshold"] and second["auc"] == pytest.approx(1 - first["auc"])
    low, high = first["specificity_ci95"]
    assert low <= first["specificity"] <= high and first["n_normal_cases"] == 4
    assert "spec 95% CI" in (tmp_path / "test" / "metrics.md").read_text()
