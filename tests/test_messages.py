"""Bad input a user hands the bundle gets an error in words naming the file; nothing scored is a failure."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.config import bundle_parser
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = str(ROOT / "configs" / "inference.json")
TINY = {"image_size": 32, "patch_size": 8, "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
        "network_def#num_res_units": 1, "num_workers": 0, "overlay_slices": 0, "bundle_root": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, untrained) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("messages")
    generate_dataset(root / "data", n_cases=2, shape=(32, 32, 16), seed=5, abnormal_fraction=0.5)
    parser = bundle_parser(INFERENCE, TINY)
    untrained(parser.get_parsed_content("network_def").state_dict(), root / "model.pt")
    return {"root": root, "data": root / "data", "model": root / "model.pt"}


def _cli(args: dict, config: str = INFERENCE, run_id: str = "run") -> subprocess.CompletedProcess:
    flat = [a for key, value in args.items() for a in (f"--{key}", value if isinstance(value, str) else repr(value))]
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *flat],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _infer(setup, tmp_path: Path, **overrides) -> subprocess.CompletedProcess:
    return _cli({**TINY, "ckpt_path": str(setup["model"]), "output_dir": str(tmp_path / "out"), **overrides})


def test_a_device_given_as_a_string_works(setup, tmp_path):
    result = _infer(setup, tmp_path, input_path=str(setup["data"]), device="cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "scores.csv").is_file()


def test_a_run_that_scored_nothing_fails_and_says_where_the_errors_are(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("A_flair.nii.gz", "B_flair.nii.gz"):
        (bad / name).write_bytes(b"\x1f\x8b not really a volume")
    result = _infer(setup, tmp_path, input_path=str(bad))
    assert result.returncode != 0
    assert "nothing was scored: 2 case(s) failed" in result.stdout + result.stderr
    with open(tmp_path / "out" / "errors.csv") as handle:
        errors = {row["case_id"]: row["error"] for row in csv.DictReader(handle)}
    assert set(errors) == {"A", "B"} and "A_flair.nii.gz" in errors["A"]
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_a_slice_batch_of_zero_is_refused(setup, tmp_path):
    result = _infer(setup, tmp_path, input_path=str(setup["data"]), slice_batch_size=0)
    assert result.returncode != 0 and "slice_batch_size must be a positive number" in result.stderr


def test_a_rerun_leaves_no_result_of_the_previous_run_and_results_are_readable_by_others(setup, tmp_path):
    stale = tmp_path / "out" / "heatmaps" / "OLD_CASE_heatmap.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    result = _infer(setup, tmp_path, input_path=str(setup["data"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists() and (tmp_path / "out" / "notes.txt").is_file()
    for path in (tmp_path / "out" / "scores.csv", next((tmp_path / "out" / "heatmaps").iterdir())):
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by group and others"


def _message(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _case_error(tmp_path: Path) -> str:
    with open(tmp_path / "out" / "errors.csv") as handle:
        return " ".join(row["error"] for row in csv.DictReader(handle))


def test_truncated_and_wrong_files_are_named_in_words(setup, tmp_path):
    data = tmp_path / "cases"
    data.mkdir()
    good = next(setup["data"].glob("*/*_flair.nii.gz"))
    (data / "cut_flair.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (data / "tiny_flair.nii.gz").write_bytes(b"")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32), np.eye(4)),
             data / "tiny_flair.nii.gz")
    import shutil

    shutil.copy(good, data / "good_flair.nii.gz")
    result = _infer(setup, tmp_path, input_path=str(data))
    assert result.returncode == 0, result.stderr[-3000:]
    errors = _case_error(tmp_path)
    assert "cut_flair.nii.gz: cannot read NIfTI file" in errors
    assert "tiny_flair.nii.gz: too small to score (10x10 pixels per slice" in errors


def test_pictures_of_another_channel_count_truncated_or_constant_are_named(setup, tmp_path, untrained):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(pictures / "colour.png")
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(pictures / "grey.png")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(pictures / "flat.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(pictures / "cut.jpg")
    (pictures / "cut.jpg").write_bytes((pictures / "cut.jpg").read_bytes()[:300])
    derm = bundle_parser([INFERENCE, str(ROOT / "configs" / "dermoscopy.json")], TINY)
    untrained(derm.get_parsed_content("network_def").state_dict(), tmp_path / "rgb.pt", channels=3)
    result = _cli({**TINY, "ckpt_path": str(tmp_path / "rgb.pt"), "output_dir": str(tmp_path / "out"),
                   "input_path": str(pictures), "score_maps": ["ssim"]}, config=f"['{INFERENCE}','{ROOT / 'configs' / 'dermoscopy.json'}']")
    assert result.returncode == 0, result.stderr[-3000:]
    errors = _case_error(tmp_path)
    assert "grey.png: 1 channel(s), the model expects 3" in errors
    assert "flat.png: all pixels equal" in errors
    assert "cut.jpg: cannot read image file" in errors


@pytest.mark.parametrize("problem", ["other_width", "text_file", "missing"])
def test_a_wrong_checkpoint_is_named_with_what_is_wrong(setup, tmp_path, problem, untrained):
    path = untrained({}, tmp_path / "model.pt")  # the residual calibration beside it is fine; the weights are not
    path.unlink()
    if problem == "other_width":
        wide = bundle_parser(INFERENCE, {**TINY, "network_def#channels": [16, 32, 64]})
        torch.save(wide.get_parsed_content("network_def").state_dict(), path)
    elif problem == "text_file":
        path.write_text("these are not weights")
    result = _cli({**TINY, "ckpt_path": str(path), "output_dir": str(tmp_path / "out"),
                   "input_path": str(setup["data"])})
    assert result.returncode != 0
    message = _message(result)
    expected = {"other_width": "its weights do not fit the configured network", "text_file": "not a PyTorch checkpoint",
                "missing": "checkpoint not found"}[problem]
    assert f"{path}: {expected}" in message
    if problem == "other_width":
        assert "network_def#channels" in message and len(message.splitlines()) < 400


def test_an_output_dir_that_is_a_file_and_missing_inputs_are_said_in_words(setup, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    result = _cli({**TINY, "ckpt_path": str(setup["model"]), "output_dir": str(blocker), "input_path": str(setup["data"])})
    assert result.returncode != 0 and f"{blocker}: is a file" in _message(result)
    missing = _infer(setup, tmp_path / "x", input_path=str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and f"{tmp_path / 'nowhere'}: no such file or folder to score" in _message(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _infer(setup, tmp_path / "y", input_path=str(empty))
    assert result.returncode != 0 and f"{empty}: no volumes" in _message(result)


def test_training_with_only_a_dataset_folder_splits_it_by_patient(setup, tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, n_cases=5, shape=(32, 32, 16), seed=6, abnormal_fraction=0.4)
    result = _cli({**TINY, "critic_def#channels": 8, "dataset_dir": str(data), "max_epochs": 1, "val_interval": 1,
                   "batch_size": 8, "output_dir": str(tmp_path / "train"), "ckpt_dir": str(tmp_path / "models"),
                   "device": "cpu"}, config=str(ROOT / "configs" / "train.json"), run_id="training")
    assert result.returncode == 0, result.stderr[-3000:]
    datalist = json.loads((tmp_path / "train" / "datalist.json").read_text())
    ids = [i["case_id"] for split in ("training", "validation", "testing") for i in datalist[split]]
    assert sorted(ids) == [f"SYN_{i:03d}" for i in range(5)] and datalist["testing"]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_user_files_are_never_unpickled(tmp_path):
    """A normal-statistics file with code in it is refused; the code does not run."""
    from scripts.data.io import InputError
    from scripts.scoring.inferer import load_calibration

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "stats.pt", "wb") as handle:
        pickle.dump({"squared": Payload()}, handle)
    with pytest.raises(InputError, match="not a normal statistics file"):
        load_calibration(str(tmp_path / "stats.pt"))
    with pytest.raises(InputError, match="residual calibration file not found"):
        load_calibration(str(tmp_path / "absent.pt"), "residual calibration")
    assert not marker.exists()


def test_a_killed_rerun_leaves_no_old_scores_beside_new_heatmaps(setup, tmp_path):
    import signal
    import time

    assert _infer(setup, tmp_path, input_path=str(setup["data"])).returncode == 0
    scores = tmp_path / "out" / "scores.csv"
    first = scores.read_text()
    args = {**TINY, "ckpt_path": str(setup["model"]), "output_dir": str(tmp_path / "out"), "input_path": str(setup["data"])}
    flat = [a for key, value in args.items() for a in (f"--{key}", value if isinstance(value, str) else repr(value))]
    process = subprocess.Popen([sys.executable, "-m", "monai.bundle", "run", "run", "--config_file", INFERENCE, *flat],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while scores.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    heatmaps = sorted(p.name.split("_heatmap")[0] for p in (tmp_path / "out" / "heatmaps").glob("*_heatmap.*"))
    if scores.is_file():  # the re-run finished before the kill: its tables and heatmaps agree
        with scores.open() as handle:
            assert sorted(row["case_id"] for row in csv.DictReader(handle)) == heatmaps
    else:  # killed mid-way: the old tables are gone with the old heatmaps
        assert first and not (tmp_path / "out" / "slice_scores.csv").exists()
