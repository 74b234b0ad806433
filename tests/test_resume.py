"""Fault injection: training killed with SIGKILL at several points and resumed ends with the uninterrupted weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 32, "patch_size": 8, "batch_size": 8, "num_workers": 0, "network_def#channels": "[8, 16, 32]",
        "network_def#strides": "[2, 2]", "network_def#num_res_units": 1, "critic_def#channels": 8,
        "max_epochs": 5, "val_interval": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    generate_dataset(folder / "data", n_cases=6, shape=(32, 32, 16), seed=4, abnormal_fraction=0.5)
    path = folder / "datalist.json"
    path.write_text(json.dumps(build_datalist(folder / "data", val_fraction=0.34, test_fraction=0.0, seed=0)))
    return path


def _command(datalist: Path, run_dir: Path, resume: str = "") -> list[str]:
    settings = {**TINY, "datalist": str(datalist), "output_dir": str(run_dir / "train"), "ckpt_dir": str(run_dir / "models"),
                "cache_dir": str(run_dir.parent / "cache"), "resume_from": resume}
    args = [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(datalist: Path, run_dir: Path, resume: str = "") -> None:
    result = subprocess.run(_command(datalist, run_dir, resume), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _train_until_killed(datalist: Path, run_dir: Path, wait_for: str, resume: str = "") -> None:
    """Start training and SIGKILL it as soon as ``models/<wait_for>`` exists (the run is then mid-way)."""
    process = subprocess.Popen(_command(datalist, run_dir, resume), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    try:
        while not (run_dir / "models" / wait_for).is_file():
            assert process.poll() is None, f"training ended before {wait_for} was written"
            assert time.time() < deadline, f"no {wait_for} after 300 s"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _weights(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state[key] if key else state


def test_killed_and_resumed_training_ends_with_the_uninterrupted_weights(datalist: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(datalist, straight)
    _train_until_killed(datalist, resumed, "checkpoint_epoch=1.pt")
    _train_until_killed(datalist, resumed, "checkpoint_epoch=3.pt", resume="latest")
    _train(datalist, resumed, resume="latest")
    # exact: the same arithmetic on the same batches in the same order (one CPU thread in both runs)
    for name in ("network", "critic", "optimizer"):
        want, got = _weights(straight / "models" / "checkpoint_final.pt", name), _weights(resumed / "models" / "checkpoint_final.pt", name)
        if name == "optimizer":
            want, got = {k: v for k, v in want["state"].items()}, {k: v for k, v in got["state"].items()}
            want = {f"{k}.{n}": t for k, s in want.items() for n, t in s.items()}
            got = {f"{k}.{n}": t for k, s in got.items() for n, t in s.items()}
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name} {key} differs after resuming"
    best_straight, best_resumed = _weights(straight / "models" / "model.pt"), _weights(resumed / "models" / "model.pt")
    assert all(torch.equal(best_straight[k], best_resumed[k]) for k in best_straight), "model.pt is not the same best model"


def test_resuming_from_a_weights_file_says_which_checkpoint_to_use(datalist: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _train(datalist, run_dir)
    result = subprocess.run(_command(datalist, run_dir, str(run_dir / "models" / "checkpoint_best.pt")), cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode != 0
    assert "checkpoint_best.pt" in result.stderr and "resumes from checkpoint_final.pt or checkpoint_epoch=N.pt" in result.stderr


def test_a_checkpoint_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """The saver writes beside the target and replaces it in one step; the file it replaces goes only afterwards."""
    from scripts.model.checkpoints import AtomicDiskSaver

    saver = AtomicDiskSaver(tmp_path)
    saver({"a": torch.zeros(2)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # ignite removes the old file before it saves the new one
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file(), "the old checkpoint must stay until the new one is complete"
    saver({"a": torch.ones(2)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    assert oct((tmp_path / "checkpoint_epoch=2.pt").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
