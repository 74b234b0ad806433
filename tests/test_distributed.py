"""Multi-process training with torch.distributed: ``torchrun`` with ``configs/multi_gpu_train.json`` on CPU (gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 32, "patch_size": 8, "batch_size": 8, "num_workers": 0, "network_def#channels": [8, 16, 32],
        "network_def#strides": [2, 2], "network_def#num_res_units": 1, "critic_def#channels": 8}
WORLD = 2


def torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_trains_on_two_processes_and_saves_bare_checkpoints(tmp_path):
    generate_dataset(tmp_path / "data", n_cases=8, shape=(40, 40, 16), seed=3, abnormal_fraction=0.5)
    datalist = build_datalist(tmp_path / "data", val_fraction=0.25, test_fraction=0.25, seed=0)
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    models = tmp_path / "models"
    settings = {**TINY, "datalist": str(tmp_path / "datalist.json"), "output_dir": str(tmp_path / "train"),
                "ckpt_dir": str(models), "max_epochs": 1, "val_interval": 1, "device": "cpu"}  # a string, as MONAI Label passes it
    args = [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]
    cmd = [*torchrun(), "--standalone", f"--nproc_per_node={WORLD}", "-m", "monai.bundle", "run", "training",
           "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]

    # both ranks trained; only rank 0 saved
    assert log.count("PatchGANTrainer - INFO - Epoch[1] Complete") == WORLD
    assert log.count("saved final checkpoint") == 1

    # model.pt: the bare reconstructor, loadable into network_def as the inference config builds it
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    for key, value in settings.items():
        parser[key] = value
    weights = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert weights and not any(k.startswith("module.") for k in weights)
    parser.get_parsed_content("network_def").load_state_dict(weights, strict=True)

    final = torch.load(models / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    for key in ("network", "critic"):
        assert not any(k.startswith("module.") for k in final[key])
    parser.get_parsed_content("critic_def").load_state_dict(final["critic"], strict=True)

    # each rank ran its DistributedSampler share of the slices
    slices = len(parser.get_parsed_content("train#dataset"))
    per_rank = math.ceil(slices / WORLD)
    batch = TINY["batch_size"]
    expected = per_rank // batch if slices > batch * WORLD else math.ceil(per_rank / batch)
    assert final["trainer"]["epoch_length"] == expected < math.ceil(slices / batch)
    assert final["trainer"]["iteration"] == expected
    assert (models / "normal_stats.pt").is_file()
