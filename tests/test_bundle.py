"""End to end through MONAI's own bundle runner: train one short run on tiny synthetic volumes, then infer."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--image_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0",
    "--network_def#channels", "[8, 16, 32]", "--network_def#strides", "[2, 2]", "--network_def#num_res_units", "1",
]


def bundle(run_id: str, config: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from the bundle root, as a user types it."""
    config_file = config if config.startswith("[") else f"configs/{config}"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *TINY, *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic BraTS-layout set, its datalist, and a model trained for two epochs on it."""
    root = tmp_path_factory.mktemp("bundle")
    generate_dataset(root / "data", n_cases=8, shape=(40, 40, 16), seed=3, abnormal_fraction=0.5)
    datalist = build_datalist(root / "data", val_fraction=0.25, test_fraction=0.25, seed=0)
    (root / "datalist.json").write_text(json.dumps(datalist))
    args = ["--datalist", str(root / "datalist.json"), "--output_dir", str(root / "train"),
            "--ckpt_dir", str(root / "models"), "--max_epochs", "2", "--val_interval", "1",
            "--critic_def#channels", "8"]
    bundle("training", "train.json", *args)
    return root, datalist


def test_training_writes_best_and_final_checkpoints(trained):
    root, _ = trained
    models = root / "models"
    assert (models / "model.pt").exists() and (models / "checkpoint_final.pt").exists()
    best = torch.load(models / "checkpoint_best.pt", map_location="cpu")
    assert {"network", "critic", "optimizer", "critic_optimizer"} <= set(best)
    final = torch.load(models / "checkpoint_final.pt", map_location="cpu")
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]
    assert (root / "train" / "slice_cache").is_dir() and any((root / "train" / "slice_cache").iterdir())
    stats = torch.load(models / "normal_stats.pt", map_location="cpu")
    assert set(stats) == {"squared", "hyperintense", "hypointense", "ssim", "critic", "feature"} and stats["squared"]["mean"].shape == (1, 1, 32, 32)


def test_a_fixed_seed_gives_a_reproducible_run(trained, tmp_path):
    root, _ = trained
    args = ["--datalist", str(root / "datalist.json"), "--output_dir", str(tmp_path / "train"),
            "--ckpt_dir", str(tmp_path), "--max_epochs", "2", "--val_interval", "1",
            "--critic_def#channels", "8"]
    bundle("training", "train.json", *args)
    first = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu")
    second = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu")
    for key in ("network", "critic"):
        for name, value in first[key].items():
            torch.testing.assert_close(second[key][name], value, rtol=0, atol=0)


def test_training_resumes_from_the_final_checkpoint(trained, tmp_path):
    root, _ = trained
    args = ["--datalist", str(root / "datalist.json"), "--output_dir", str(root / "train"),
            "--ckpt_dir", str(tmp_path), "--max_epochs", "3", "--val_interval", "1",
            "--critic_def#channels", "8", "--resume_from", str(root / "models" / "checkpoint_final.pt")]
    result = bundle("training", "train.json", *args)
    final = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu")
    assert final["trainer"]["iteration"] == 3 * final["trainer"]["epoch_length"]
    assert "Epoch[1]" not in result.stdout + result.stderr  # started from epoch 3, not from scratch


def test_fine_tuning_starts_from_published_reconstructor_weights(trained, tmp_path):
    """``--init_from models/model.pt`` loads the reconstructor before training (learning rate 0: it stays so)."""
    root, _ = trained
    args = ["--datalist", str(root / "datalist.json"), "--output_dir", str(tmp_path / "train"),
            "--ckpt_dir", str(tmp_path), "--max_epochs", "1", "--val_interval", "1", "--learning_rate", "0.0",
            "--critic_def#channels", "8", "--init_from", str(root / "models" / "model.pt")]
    bundle("training", "train.json", *args)
    published = torch.load(root / "models" / "model.pt", map_location="cpu")
    tuned = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu")
    assert tuned["trainer"]["iteration"] == tuned["trainer"]["epoch_length"]  # a fresh run, not a resumed one
    for name, value in published.items():
        torch.testing.assert_close(tuned["network"][name], value, rtol=0, atol=0)


def test_lesion_free_training_uses_the_healthy_pixels_of_lesion_slices(trained, tmp_path):
    """``configs/lesion_free.json``: lesion slices join training with zero weight on their lesions."""
    from monai.bundle import ConfigParser

    root, _ = trained
    overrides = {"datalist": str(root / "datalist.json"), "output_dir": str(tmp_path / "train"),
                 "ckpt_dir": str(tmp_path), "image_size": 32, "num_workers": 0}
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "lesion_free.json")])
    parser.update(overrides)
    dataset = parser.get_parsed_content("train#dataset")
    labels = [record["label"] for record in dataset.data]
    assert set(labels) == {0, 1}
    lesion = dataset[labels.index(1)]
    assert 0 < float(lesion["weight"].sum()) < lesion["weight"].numel() and "seg" not in lesion
    assert all(record["label"] == 0 for record in parser.get_parsed_content("validate#dataset").data)
    bundle("training", "['configs/train.json','configs/lesion_free.json']", "--datalist", str(root / "datalist.json"),
           "--output_dir", str(tmp_path / "train"), "--ckpt_dir", str(tmp_path), "--max_epochs", "1",
           "--val_interval", "1", "--critic_def#channels", "8")  # the same run from the command line
    assert (tmp_path / "model.pt").is_file()


def test_calibrate_refits_the_normal_statistics_of_the_trained_models(trained, tmp_path):
    root, _ = trained
    models = tmp_path / "models"
    shutil.copytree(root / "models", models)
    (models / "normal_stats.pt").unlink()
    bundle("calibrate", "train.json", "--datalist", str(root / "datalist.json"), "--output_dir", str(root / "train"),
           "--ckpt_dir", str(models), "--critic_def#channels", "8")
    refitted = torch.load(models / "normal_stats.pt", map_location="cpu")
    original = torch.load(root / "models" / "normal_stats.pt", map_location="cpu")
    for name, stats in original.items():
        for key in ("mean", "std"):
            torch.testing.assert_close(refitted[name][key], stats[key], rtol=1e-4, atol=1e-6)


def test_inference_writes_scores_and_heatmaps_on_the_input_grid(trained, tmp_path):
    root, datalist = trained
    out = tmp_path / "out"
    bundle("run", "inference.json", "--datalist", str(root / "datalist.json"), "--output_dir", str(out),
           "--ckpt_path", str(root / "models" / "model.pt"))
    cases = [item["case_id"] for item in datalist["testing"]]
    rows = read_csv(out / "scores.csv")
    assert [r["case_id"] for r in rows] == cases
    assert all(np.isfinite(float(r["score"])) for r in rows)
    slices = read_csv(out / "slice_scores.csv")
    assert {r["case_id"] for r in slices} == set(cases)
    assert set(slices[0]) >= {"case_id", "slice_index", "score", "trivial_intensity", "trivial_position", "label"}
    for item in datalist["testing"]:
        source = nib.load(Path(datalist["dataset_dir"]) / item["image"])
        heat = nib.load(out / "heatmaps" / f"{item['case_id']}_heatmap.nii.gz")
        assert heat.shape == source.shape
        np.testing.assert_allclose(heat.affine, source.affine, atol=1e-5)
    assert read_csv(out / "errors.csv") == []


def test_critic_and_normal_statistics_scoring_runs_through_the_same_workflow(trained, tmp_path):
    root, datalist = trained
    out = tmp_path / "z"
    bundle("run", "inference.json", "--datalist", str(root / "datalist.json"), "--output_dir", str(out),
           "--ckpt_path", str(root / "models" / "model.pt"), "--score_maps", "['squared', 'critic']",
           "--normal_stats", str(root / "models" / "normal_stats.pt"), "--overlay_slices", "0",
           "--critic_def#channels", "8")
    rows = read_csv(out / "scores.csv")
    assert len(rows) == len(datalist["testing"]) and all(np.isfinite(float(r["score"])) for r in rows)


def test_critic_snapshots_survive_a_resume_and_inference_scores_with_their_ensemble(trained, tmp_path):
    """``critic_snapshots``: training keeps the critic of the last validation epochs (also across a resume), and
    the critic map of inference averages them (``checkpoint_best.pt``, the single critic's file, is then not needed)."""
    root, datalist = trained
    args = ["--datalist", str(root / "datalist.json"), "--output_dir", str(tmp_path / "train"), "--ckpt_dir",
            str(tmp_path / "models"), "--val_interval", "1", "--critic_def#channels", "8", "--critic_snapshots", "2"]
    bundle("training", "train.json", *args, "--max_epochs", "2")
    bundle("training", "train.json", *args, "--max_epochs", "3",
           "--resume_from", str(tmp_path / "models" / "checkpoint_final.pt"))
    assert torch.load(tmp_path / "models" / "critic_snapshots.pt", weights_only=True)["epochs"] == [2, 3]
    (tmp_path / "models" / "checkpoint_best.pt").unlink()  # the snapshots stand in for the best checkpoint's critic
    out = tmp_path / "out"
    result = bundle("run", "inference.json", "--datalist", str(root / "datalist.json"), "--output_dir", str(out),
                    "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--score_maps", "['critic']",
                    "--overlay_slices", "0", "--critic_def#channels", "8")
    assert "scoring with the critics of epochs [2, 3]" in result.stdout + result.stderr
    rows = read_csv(out / "scores.csv")
    assert len(rows) == len(datalist["testing"]) and all(np.isfinite(float(r["score"])) for r in rows)


def test_one_corrupt_case_is_reported_and_the_others_are_scored(trained, tmp_path):
    root, datalist = trained
    data = tmp_path / "data"
    shutil.copytree(datalist["dataset_dir"], data)
    bad = datalist["testing"][0]
    (data / bad["image"]).write_bytes(b"this is not a nifti file")
    out = tmp_path / "out"
    bundle("run", "inference.json", "--input_path", str(data), "--output_dir", str(out),
           "--ckpt_path", str(root / "models" / "model.pt"), "--write_heatmaps", "False")
    errors = read_csv(out / "errors.csv")
    assert [e["case_id"] for e in errors] == [bad["case_id"]]
    assert Path(bad["image"]).name in errors[0]["error"]
    scored = {r["case_id"] for r in read_csv(out / "scores.csv")}
    assert len(scored) == 7 and bad["case_id"] not in scored


def test_inference_scores_a_single_unlabelled_file(trained, tmp_path):
    root, datalist = trained
    item = datalist["training"][0]
    out = tmp_path / "one"
    bundle("run", "inference.json", "--input_path", str(Path(datalist["dataset_dir"]) / item["image"]),
           "--output_dir", str(out), "--ckpt_path", str(root / "models" / "model.pt"))
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 1 and rows[0]["label"] == ""
    assert (out / "heatmaps" / f"{rows[0]['case_id']}_heatmap.nii.gz").exists()


def write_skin_folder(folder: Path, n: int = 12) -> None:
    """Tiny dermoscopy-like RGB pictures: textured skin, dark lesions in the 'malignant' half, masks and a CSV."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = ["image_id,label"]
    for i in range(n):
        skin = np.clip(0.75 + 0.05 * rng.standard_normal((40, 48, 3)), 0, 1)
        mask = np.zeros((40, 48), dtype=np.uint8)
        if i % 2:
            mask[10:22, 12:26] = 255
            skin[mask > 0] *= 0.3
        Image.fromarray((skin * 255).astype(np.uint8)).save(folder / "images" / f"IMG_{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"IMG_{i:03d}_segmentation.png")
        rows.append(f"IMG_{i:03d},{'malignant' if i % 2 else 'benign'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def test_two_dimensional_rgb_images_train_and_score(tmp_path):
    write_skin_folder(tmp_path)
    datalist = build_datalist(tmp_path / "images", labels_csv=tmp_path / "labels.csv", masks_dir=tmp_path / "masks",
                              val_fraction=0.25, test_fraction=0.25, seed=0)
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    common = ["--datalist", str(tmp_path / "datalist.json"), "--output_dir", str(tmp_path / "out")]
    bundle("training", "['configs/train.json','configs/dermoscopy.json']", *common, "--ckpt_dir", str(tmp_path / "m"),
           "--max_epochs", "1", "--val_interval", "1", "--critic_def#channels", "8")
    bundle("run", "['configs/inference.json','configs/dermoscopy.json']", *common,
           "--ckpt_path", str(tmp_path / "m" / "model.pt"), "--critic_def#channels", "8")  # the default map is D's
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert {r["case_id"] for r in rows} == {item["case_id"] for item in datalist["testing"]}
    assert {r["label"] for r in rows} <= {"0", "1"}
    for r in rows:
        assert (tmp_path / "out" / "heatmaps" / f"{r['case_id']}_heatmap.png").exists()
        assert (tmp_path / "out" / "overlays" / f"{r['case_id']}_overlay.png").exists()
