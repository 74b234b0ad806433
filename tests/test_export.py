"""Exported reconstructors (TorchScript via ``monai.bundle ckpt_export``, ONNX via ``scripts.export onnx``) give the
PyTorch reconstruction and anomaly scores, and scoring works from the exported file alone."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.synthetic import generate_dataset
from scripts.data.transforms import to_original_grid
from scripts.export import load_exported

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
TINY = {"image_size": 32, "patch_size": 8, "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
        "network_def#num_res_units": 1}
TINY_ARGS = [arg for key, value in TINY.items() for arg in (f"--{key}", str(value))]


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def parser() -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(ROOT / "configs" / "inference.json"))
    for key, value in TINY.items():
        p[key] = value
    p["amp"] = False  # the export is checked in fp32 (onnxruntime runs fp32; bf16 on a CPU would differ at 1e-2)
    return p


@pytest.fixture(scope="module")
def exported(tmp_path_factory, untrained):
    """Tiny reconstructor weights, their TorchScript and ONNX exports, and a synthetic LPS-oriented FLAIR volume."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    network = parser().get_parsed_content("network_def")
    untrained(network.state_dict(), root / "model.pt")
    calibration = {"edges": torch.tensor([[0.3, 0.6]]), "mean": torch.tensor([[0.2, 0.0, -0.1]]),
                   "std": torch.tensor([[0.2, 0.1, 0.15]])}
    torch.save(calibration, root / "residual_calibration.pt")  # not the neutral one: the calibrated path is checked
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(root / "model.ts"),
         "--ckpt_file", str(root / "model.pt"), "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.json", *TINY_ARGS])
    run([sys.executable, "-m", "scripts.export", "onnx", "--filepath", str(root / "model.onnx"),
         "--ckpt_file", str(root / "model.pt"), *TINY_ARGS])
    generate_dataset(root / "data", n_cases=2, shape=(40, 40, 16), seed=3, abnormal_fraction=1.0)
    volume = root / "data" / "SYN_001" / "SYN_001_flair.nii.gz"  # odd cases are stored LPS
    assert nib.aff2axcodes(nib.load(volume).affine) == ("L", "P", "S")
    network.eval()
    return root, network, volume


def pytorch_scores(network, volume):
    p = parser()
    p["residual_calibration_path"] = str(Path(volume).parents[2] / "residual_calibration.pt")
    item = p.get_parsed_content("preprocessing")({"case_id": "case", "image": str(volume)})
    inferer = p.get_parsed_content("inferer")
    return inferer, item, inferer.score(item["image"][None], network)


@pytest.mark.parametrize("name", ["model.ts", "model.onnx"])
def test_exported_reconstruction_matches_pytorch_for_any_batch_size(exported, name):
    root, network, _ = exported
    model = load_exported(root / name)
    for batch in (1, 5):
        images = torch.rand(batch, 1, 32, 32)
        with torch.no_grad():
            expected = network(images)
        got = model(images)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= ATOL


@pytest.mark.parametrize("name", ["model.ts", "model.onnx"])
def test_exported_model_gives_the_pytorch_reconstruction_and_anomaly_scores(exported, name):
    root, network, volume = exported
    inferer, item, expected = pytorch_scores(network, volume)
    got = inferer.score(item["image"][None], load_exported(root / name))
    assert int(expected.slice_valid.sum()) > 5
    for field in ("reconstruction", "resized", "patch_errors", "heatmap", "case_scores"):
        difference = (getattr(got, field) - getattr(expected, field)).abs().max()
        assert float(difference) <= ATOL, f"{field} differs by {float(difference):.3g}"
    assert torch.equal(got.slice_valid, expected.slice_valid)
    valid = expected.slice_valid
    assert float((got.slice_scores[valid] - expected.slice_scores[valid]).abs().max()) <= ATOL
    assert torch.isnan(got.slice_scores[~valid]).all()


def test_torchscript_export_carries_the_bundle_metadata(exported):
    root, _, _ = exported
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(root / "model.ts"), _extra_files=extra)
    meta, config = (extra[k].decode() if isinstance(extra[k], bytes) else extra[k] for k in extra)
    assert '"patchgan_ranking_anomaly"' in meta and "network_def" in config


@pytest.mark.parametrize("name", ["model.ts", "model.onnx"])
def test_scoring_from_the_exported_file_alone_needs_no_model_code(exported, name, tmp_path):
    """``python -m scripts.export score`` in a process where ``scripts.networks`` cannot be imported, with only the
    exported file (no checkpoint, no network definition): same scores and heatmap as PyTorch."""
    root, network, volume = exported
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copyfile(root / name, alone / name)
    shutil.copyfile(root / "residual_calibration.pt", alone / "residual_calibration.pt")  # shipped beside the model
    out = tmp_path / "out"
    argv = ["scripts.export", "score", "--model", str(alone / name), "--input_path", str(volume),
            "--output_dir", str(out), "--num_workers", "0", "--overlay_slices", "0", "--amp", "False", *TINY_ARGS[:4]]
    code = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.modules['scripts.model.networks'] = None;"
        "sys.argv = sys.argv[2:]; runpy.run_module('scripts.export', run_name='__main__', alter_sys=True);"
        "assert sys.modules.get('scripts.model.networks') is None"
    )
    run([sys.executable, "-c", code, str(ROOT), *argv], cwd=tmp_path)

    _, item, expected = pytorch_scores(network, volume)
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and abs(float(rows[0]["score"]) - float(expected.case_scores[0])) <= ATOL
    with open(out / "slice_scores.csv", newline="") as handle:
        slices = {int(r["slice_index"]): float(r["score"]) for r in csv.DictReader(handle)}
    valid = torch.nonzero(expected.slice_valid).flatten().tolist()
    assert sorted(slices) == valid
    assert max(abs(slices[i] - float(expected.slice_scores[i])) for i in valid) <= ATOL
    heat = nib.load(out / "heatmaps" / f"{rows[0]['case_id']}_heatmap.nii.gz")
    source = nib.load(volume)
    assert heat.shape == source.shape and np.allclose(heat.affine, source.affine, atol=1e-5)
    reference = to_original_grid(expected.heatmap[0, 0].numpy(), source.affine)
    assert float(np.abs(np.asarray(heat.dataobj) - reference).max()) <= ATOL
    assert (out / "errors.csv").read_text().strip() == "case_id,error"
