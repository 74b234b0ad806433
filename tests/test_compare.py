"""The one-command comparison: folds, aggregation, and a tiny end-to-end run of every method."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.compare import runs
from experiments.compare.__main__ import main
from experiments.compare.folds import Fold
from experiments.compare.report import aggregate
from experiments.compare.runs import Settings, infer, train_model
from scripts.data.synthetic import generate_dataset
from scripts.evaluation.patch_protocol import PatchProtocol

ROOT = Path(__file__).resolve().parents[1]
METHODS_RUN = ("patchgan_ranking", "patchgan_no_ranking", "patchgan_squared", "patchgan_no_ranking_squared", "ae",
               "ocsvm", "alocc", "ocsvm_guided")
REQUIRED = (*METHODS_RUN,
            "trivial_intensity", "trivial_intensity_volume_z", "trivial_intensity_volume_lower_half", "trivial_position")
TINY = ["--image-size", "32", "--max-epochs", "1", "--batch-size", "8", "--channels", "8,16,32", "--threads", "1",
        "--override", "network_def#num_res_units=1", "--override", "min_lesion_voxels=5"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_aggregate_gives_mean_and_sample_std_over_folds_and_skips_undefined_folds():
    per_fold = {
        "fold_0": {"ae": {"auc": 0.6, "ap": 0.5, "sensitivity": 0.2, "specificity": 0.9}},
        "fold_1": {"ae": {"auc": 0.8, "ap": 0.7, "sensitivity": 0.4, "specificity": 1.0, "case": {"auc": 1.0, "ap": 1.0}}},
        "fold_2": {"ae": {"auc": math.nan, "ap": math.nan, "sensitivity": math.nan, "specificity": 0.8}},
    }
    summary = aggregate(per_fold)["ae"]
    assert summary["auc"] == pytest.approx(0.7) and summary["auc_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert summary["n_folds"] == 2 and summary["specificity"] == pytest.approx(0.9)
    assert summary["case"]["auc"] == 1.0 and math.isnan(summary["case"]["auc_std"])
    assert set(summary["folds"]) == {"fold_0", "fold_1", "fold_2"}


def test_held_out_specificity_keeps_the_folds_with_a_threshold(tmp_path):
    from experiments.compare.report import held_out_specificity
    from scripts.evaluation.plots import plot_specificity

    summary = {"ae": {"folds": {"fold_0": {"specificity": 0.97, "specificity_ci95": [0.9, 1.0]},
                                "fold_1": {"specificity": math.nan}}},
               "ocsvm": {"folds": {"fold_0": {"specificity": math.nan}}}}
    held_out = held_out_specificity(summary, ["ae", "ocsvm"])
    assert held_out == {"ae": {"fold_0": (0.97, [0.9, 1.0])}}
    plot_specificity(held_out, tmp_path / "specificity.png", 0.95, "held-out specificity")
    assert (tmp_path / "specificity.png").stat().st_size > 5_000


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_compare_trains_every_method_and_writes_the_comparison(tmp_path):
    generate_dataset(tmp_path / "data", n_cases=8, shape=(40, 40, 16), seed=3, abnormal_fraction=0.5)
    out = tmp_path / "out"
    summary = main(["--dataset", str(tmp_path / "data"), "--output", str(out), "--folds", "3", *TINY])
    data = json.loads((out / "comparison.json").read_text())
    assert set(REQUIRED) <= set(data) and set(data) == set(summary)
    for method in REQUIRED:
        assert {"auc", "ap", "auc_std", "ap_std", "sensitivity", "specificity", "n_folds", "folds"} <= set(data[method])
        assert data[method]["n_folds"] >= 1 and 0.0 <= data[method]["auc"] <= 1.0
        assert "validation_auc" in data[method]["folds"]["fold_0"] and "level_r2" in data[method]
        assert "level_adjusted_auc" in data[method]["folds"]["fold_0"]
    table = (out / "comparison.md").read_text()
    assert "| Method | AUC | AP |" in table and "±" in table and "Failures" not in table
    assert "Operating point on held-out patients" in table and "Validation AUC" in table and "AUC beyond level" in table
    assert "cross-fitted over the validation patients" in table
    assert all(f"`{method}`" in table for method in REQUIRED)
    for name in ("roc.png", "score_distribution.png", "specificity.png"):
        assert (out / name).stat().st_size > 10_000
    for fold in ("fold_0", "fold_1", "fold_2"):
        datalist = json.loads((out / fold / "datalist.json").read_text())
        test_cases = {item["case_id"] for item in datalist["testing"]}
        assert not test_cases & {item["case_id"] for item in datalist["training"] + datalist["validation"]}
        for method in METHODS_RUN:
            rows = read_csv(out / fold / method / "slice_scores.csv")
            assert {r["case_id"] for r in rows} == test_cases
            assert all(np.isfinite(float(r["score"])) for r in rows)
            assert (out / fold / method / "validation" / "slice_scores.csv").is_file()
        assert (out / fold / "evaluation" / "metrics.json").is_file()


def test_compare_trains_on_one_folder_and_tests_on_another(tmp_path):
    generate_dataset(tmp_path / "a", n_cases=6, shape=(40, 40, 16), seed=1, abnormal_fraction=0.5)
    generate_dataset(tmp_path / "b", n_cases=4, shape=(40, 40, 16), seed=2, abnormal_fraction=0.5)
    for case in sorted((tmp_path / "b").iterdir()):  # another site's patients: other case ids
        for file in case.iterdir():
            file.rename(case / file.name.replace("SYN", "SITEB"))
        case.rename(case.with_name(case.name.replace("SYN", "SITEB")))
    out = tmp_path / "out"
    main(["--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"), "--output", str(out),
                  "--methods", "patchgan_ranking,ocsvm", "--threshold-rule", "quantile", *TINY])
    data = json.loads((out / "comparison.json").read_text())
    assert "the 0.95 quantile of the normal validation scores" in (out / "comparison.md").read_text()
    metrics = json.loads((out / "fold_0" / "evaluation" / "metrics.json").read_text())
    assert metrics["ocsvm"]["threshold_rule"] == "quantile" and metrics["ocsvm"]["threshold_level"] == 0.95
    assert {"patchgan_ranking", "ocsvm", "trivial_intensity"} <= set(data)
    assert data["ocsvm"]["n_folds"] == 1 and data["ocsvm"]["auc_std"] is None  # one split: no spread
    datalist = json.loads((out / "fold_0" / "datalist.json").read_text())
    assert all(str(tmp_path / "b") in item["image"] for item in datalist["testing"])
    assert all(str(tmp_path / "a") in item["image"] for item in datalist["training"] + datalist["validation"])
    assert len(datalist["testing"]) == 4


def test_train_and_test_folders_that_share_case_ids_are_refused(tmp_path):
    generate_dataset(tmp_path / "a", n_cases=4, shape=(32, 32, 16), seed=1, abnormal_fraction=0.5)
    generate_dataset(tmp_path / "b", n_cases=3, shape=(32, 32, 16), seed=2, abnormal_fraction=0.5)
    with pytest.raises(SystemExit, match="SYN_000"):
        main(["--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"), "--output", str(tmp_path / "out"), *TINY])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--dataset", str(tmp_path), "--output", str(tmp_path), "--methods", "ae,unknown"])


def test_evaluate_config_wraps_the_evaluation(tmp_path):
    """configs/evaluate.json through MONAI's bundle runner, on a hand-written inference output."""
    for folder, shift in ((tmp_path / "test", 1.0), (tmp_path / "val", 0.0)):
        folder.mkdir()
        rows = ["case_id,slice_index,score,trivial_intensity,trivial_position,label"]
        rows += [f"c{i},{i},{0.1 * i + shift * (i % 2)},{i},{0.5},{i % 2 if shift else 0}" for i in range(12)]
        (folder / "slice_scores.csv").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "configs/evaluate.json",
           "--output_dir", str(tmp_path / "test"), "--eval_dir", str(tmp_path / "eval"),
           "--validation_output_dir", str(tmp_path / "val"), "--fpr", "0.1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"]["auc"] == 1.0 and metrics["model"]["fpr_target"] == 0.1
    assert metrics["model"]["threshold_source"] == str(tmp_path / "val")
    assert (tmp_path / "eval" / "roc.png").is_file()


def test_patch_cells_recover_the_patch_grid_of_a_heatmap_on_the_input_grid(tmp_path):
    """A heatmap written as the core writes it (patch grid upsampled, on the input's own, LPS, grid) gives back the
    grid values, with lesion and foreground fractions per patch."""
    import nibabel as nib
    import torch.nn.functional as F

    from scripts.data.io import save_nifti_atomic
    from scripts.data.transforms import LoadCased, to_original_grid

    generate_dataset(tmp_path / "data", n_cases=2, shape=(40, 36, 16), seed=3, abnormal_fraction=1.0)
    case = tmp_path / "data" / "SYN_001"  # stored LPS
    item = {"case_id": "SYN_001", "image": str(case / "SYN_001_flair.nii.gz"), "seg": str(case / "SYN_001_seg.nii.gz")}
    ras = LoadCased()(dict(item))
    grid = torch.rand(16, 1, 4, 4)
    heat = F.interpolate(grid, size=(40, 36), mode="nearest")[:, 0].permute(1, 2, 0).numpy()  # (H, W, D) in RAS
    affine = nib.load(item["image"]).affine
    save_nifti_atomic(to_original_grid(heat, affine).astype(np.float32), affine, tmp_path / "heat.nii.gz")
    protocol = PatchProtocol(grid=4, brain_fraction=0.5, lesion_fraction=0.05)
    patches = protocol.case_patches(item, tmp_path / "heat.nii.gz", [5, 8])
    np.testing.assert_allclose(patches["score"], grid[[5, 8]].flatten().numpy(), rtol=1e-6)
    assert patches["slice"].tolist() == [5] * 16 + [8] * 16 and patches["cell"].tolist() == list(range(16)) * 2
    lesion = ras["seg"][0][..., 8] > 0
    assert patches["lesion"][16:].sum() * 10 * 9 == pytest.approx(lesion.sum())  # 40x36 in 4x4 patches of 10x9
    labels = protocol.labels(patches)
    assert set(labels.tolist()) <= {-1, 0, 1} and np.all(patches["lesion"][labels == 0] == 0)
    from scripts.data.transforms import BrainPercentileNormalized

    patch = BrainPercentileNormalized("image").normalise(ras["image"])[0][10:20, 18:27, 8]  # slice 8, cell 6
    assert patches["darkness"][16 + 6] == pytest.approx(1 - patch.mean(), rel=1e-5)
    assert patches["texture"][16 + 6] == pytest.approx(patch.std(), rel=1e-4)


def test_compare_patch_protocol_balances_the_test_patches(tmp_path):
    generate_dataset(tmp_path / "data", n_cases=6, shape=(40, 40, 16), seed=3, abnormal_fraction=0.5)
    out = tmp_path / "out"
    lesion_free = str(ROOT / "configs" / "lesion_free.json")
    main(["--dataset", str(tmp_path / "data"), "--output", str(out), "--folds", "3", "--protocol", "patch",
                  "--patch-brain-fraction", "0.5", "--methods", "patchgan_ranking,ocsvm", "--train-config", lesion_free,
                  "--patch-counts", "6", *TINY])
    assert lesion_free in (out / "comparison.md").read_text()  # the settings name the training override
    data = json.loads((out / "comparison.json").read_text())
    assert {"patchgan_ranking", "trivial_intensity", "trivial_position", "trivial_darkness", "trivial_texture"} <= set(data)
    assert "ocsvm" not in data
    assert "patch level" in (out / "comparison.md").read_text()
    for fold in ("fold_0", "fold_1", "fold_2"):
        rows = read_csv(out / fold / "patch" / "patchgan_ranking" / "slice_scores.csv")
        labels = [int(r["label"]) for r in rows]
        assert 6 >= labels.count(0) == labels.count(1) > 0
        assert (out / fold / "patch" / "patchgan_ranking" / "validation" / "slice_scores.csv").is_file()


def test_scoring_variants_share_the_patchgan_training(tmp_path, monkeypatch):
    trained, inferred = [], {}
    monkeypatch.setattr(runs, "train_model", lambda model, fold, folder, settings: trained.append(model) or folder)
    monkeypatch.setattr(runs, "run_bundle", lambda run_id, configs, overrides: inferred.setdefault(
        overrides["output_dir"], overrides))
    monkeypatch.setattr(runs, "evaluate_fold", lambda *args: {})
    fold = Fold("fold_0", tmp_path, tmp_path / "datalist.json")
    runs.run_folds([fold], ["patchgan_ranking", "patchgan_volume_z", "patchgan_critic", "patchgan_squared"], Settings(),
                   resume=False)
    assert trained == ["patchgan"]
    by_method = {Path(k).name if Path(k).name != "validation" else Path(k).parent.name: v for k, v in inferred.items()}
    assert by_method["patchgan_volume_z"]["slice_standardisation"] == "volume"
    assert by_method["patchgan_critic"]["score_maps"] == ["critic"]
    assert "slice_standardisation" not in by_method["patchgan_ranking"]
    assert "score_maps" not in by_method["patchgan_ranking"]  # the configs' own map (an overlay's, if any)
    assert by_method["patchgan_squared"]["score_maps"] == ["squared"]  # the paper's, whatever the overlay says


def test_normal_stats_flag_points_patchgan_inference_at_its_own_statistics(monkeypatch, tmp_path):
    seen: dict = {}
    monkeypatch.setattr(runs, "run_bundle", lambda run_id, configs, overrides: seen.update(overrides))
    fold = Fold("fold_0", tmp_path, tmp_path / "datalist.json")
    settings = Settings(normal_stats=True)
    infer("patchgan_ranking", fold, "testing", tmp_path / "out", tmp_path / "models", settings, heatmaps=False)
    assert seen["normal_stats"] == str(tmp_path / "models" / "normal_stats.pt")
    seen.clear()
    infer("ae", fold, "testing", tmp_path / "out", tmp_path / "models", settings, heatmaps=False)
    assert "normal_stats" not in seen  # only the Patch-GAN training fits them


def test_a_config_overlay_reaches_training_and_inference_of_every_method(monkeypatch, tmp_path):
    """``--config FILE``: checked on the configs each run resolves, not on the file list alone."""
    from scripts.config import bundle_parser

    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"min_lesion_voxels": 7, "foreground": "all"}))
    resolved: list[tuple[str, str, object, object]] = []

    def record(run_id, configs, overrides):
        files = [str(runs.CONFIGS / c) if not Path(c).is_absolute() else c for c in configs]
        parser = bundle_parser(files)
        resolved.append((run_id, configs[1] if len(configs) > 1 else "", parser.get("min_lesion_voxels"), parser.get("foreground")))
        if run_id == "training":
            (Path(overrides["ckpt_dir"]) / "model.pt").parent.mkdir(parents=True, exist_ok=True)
            (Path(overrides["ckpt_dir"]) / "model.pt").write_bytes(b"weights")

    monkeypatch.setattr(runs, "run_bundle", record)
    fold = Fold("fold_0", tmp_path, tmp_path / "datalist.json")
    settings = Settings(overlay_configs=[str(overlay)])
    for method, model in (("patchgan_ranking", "patchgan"), ("ae", "ae"), ("alocc", "alocc")):
        ckpt = train_model(model, fold, tmp_path / method, settings)
        infer(method, fold, "testing", tmp_path / method / "out", ckpt, settings, heatmaps=False)
    assert [r[0] for r in resolved] == ["training", "run"] * 3
    assert all(r[2] == 7 and r[3] == "all" for r in resolved), resolved


@pytest.mark.parametrize("flag", ["--config", "--override"])
def test_a_training_only_key_in_what_reaches_inference_is_refused_in_words(tmp_path, flag):
    overlay = tmp_path / "epochs.json"
    overlay.write_text(json.dumps({"train#checkpoint#n_saved": 5}))
    value = str(overlay) if flag == "--config" else "train#checkpoint#n_saved=5"
    with pytest.raises(SystemExit, match=r"train#checkpoint#n_saved would reach inference.*--train-config"):
        main(["--dataset", str(tmp_path), "--output", str(tmp_path / "out"), flag, value])


def test_an_unreadable_config_overlay_is_refused_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=r"--config .*missing.json: not a readable JSON config"):
        main(["--dataset", str(tmp_path), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "missing.json")])
