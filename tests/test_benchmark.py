"""The benchmark command: a --quick run prints valid JSON, and the fast scoring path gives the plain fp32 scores."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.benchmark.__main__ import _child_argv
from experiments.benchmark.data import phantom_slices
from experiments.benchmark.model import compare_paths
from scripts.model.networks import reconstructor
from scripts.scoring.inferer import PatchRankingInferer

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}


def test_quick_run_prints_json_with_every_section(tmp_path):
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "experiments.benchmark", "--quick", "--json", str(tmp_path / "bench.json"),
           "--data-dir", str(tmp_path / "volumes")]
    (tmp_path / "volumes").mkdir()
    from scripts.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "volumes", n_cases=2, shape=(48, 48, 16), seed=1)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "bench.json").read_text())
    assert {"device", "config", "model", "e2e", "train", "targets"} <= set(printed)
    assert printed["device"]["device"] == "cpu" and printed["config"]["quick"] is True

    model = printed["model"]
    for test_input, passes in (("inpaint", 4), ("image", 1)):
        assert model[test_input]["network_passes_per_slice"] == passes
        for batch in ("batch_1", "batch_8"):
            assert model[test_input][batch]["slices_per_s"] > 0 and model[test_input][batch]["latency_ms_median"] > 0
    assert model["consistency"]["within_tolerance"] is True
    assert model["host_peak_rss_mb"] > 0 and model["gpu_peak_allocated_mb"] is None

    e2e = printed["e2e"]
    assert e2e["volumes"] == 2 and e2e["failed"] == 0
    assert e2e["volumes_per_s"] > 0 and e2e["slices_per_s"] > 0
    assert {"read", "normalise", "network", "write", "data_wait"} <= set(e2e["stage_s_per_volume"])
    assert e2e["bottleneck"] in ("read_normalise", "network", "write")

    train = printed["train"]
    assert train["images_per_s"] > 0 and train["iterations"] == 2 and train["batch_size"] == 4
    assert train["cached_slices"] >= train["batch_size"] and 0 <= train["data_wait_fraction"] <= 1

    # GPU targets are not judged on a CPU, nor are the 256x256 targets at --quick sizes
    assert all(t["met"] is None for t in printed["targets"].values())
    assert "model inpaint batch_1" in result.stderr and "e2e bottleneck" in result.stderr  # the table
    print(f"--quick benchmark took {elapsed:.1f} s")


@pytest.fixture(scope="module")
def volume():
    """Eight normalised phantom slices at 64x64 with a real background, as a volume ``(1, 1, 64, 64, 8)``."""
    return phantom_slices(64, 8, seed=2).permute(1, 2, 3, 0).unsqueeze(0)


def _network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return reconstructor(**TINY_NET).eval()


@pytest.mark.parametrize("test_input", ["inpaint", "image"])
def test_fast_path_scores_match_the_plain_per_slice_fp32_path(volume, test_input):
    """Batched slices and a channels_last network (the CPU fast path) against one slice per call in fp32."""
    plain_net = _network()
    fast_net = _network().to(memory_format=torch.channels_last)
    common = {"image_size": 64, "patch_size": 8, "test_input": test_input}
    fast = PatchRankingInferer(**common, slice_batch_size=32).score(volume, fast_net)
    plain = PatchRankingInferer(**common, slice_batch_size=1).score(volume, plain_net)
    assert torch.equal(fast.slice_valid, plain.slice_valid) and int(plain.slice_valid.sum()) >= 4
    valid = plain.slice_valid
    torch.testing.assert_close(fast.slice_scores[valid], plain.slice_scores[valid], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.case_scores, plain.case_scores, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.heatmap, plain.heatmap, rtol=1e-4, atol=1e-7)
    # fp32 convolutions in another memory layout sum in another order: ~1e-6 apart on O(1) intensities
    torch.testing.assert_close(fast.reconstruction, plain.reconstruction, rtol=1e-4, atol=1e-5)


def test_plain_path_is_one_network_call_per_slice_image(volume):
    """The reference really is per slice: slice_batch_size=1 calls the network once per (pass, slice)."""
    calls = []
    net = _network()
    net.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    result = PatchRankingInferer(image_size=64, patch_size=8, slice_batch_size=1).score(volume, net)
    assert set(calls) == {1} and len(calls) == 4 * int(result.slice_valid.sum())


def test_compare_paths_reports_agreement_and_catches_a_different_network(volume):
    slices = volume[0].permute(3, 0, 1, 2)
    kwargs = {"image_size": 64, "patch_size": 8, "test_input": "inpaint"}
    same = compare_paths(_network(), _network(), kwargs, slices, "cpu", amp=False, slice_batch_size=16)
    assert same["within_tolerance"] and same["fast_path"]["bf16"] is False
    assert same["slice_scores_max_rel_diff"] < 1e-4
    other = compare_paths(_network(seed=1), _network(), kwargs, slices, "cpu", amp=False, slice_batch_size=16)
    assert not other["within_tolerance"]


def test_amp_on_a_bf16_cpu_stays_within_bf16_tolerance_of_fp32(volume):
    """``amp`` runs the network in bf16 on a CPU with native bf16 (elsewhere it is fp32): scores move only at bf16
    precision, and the slice ranking that decides every metric is kept."""
    from scripts.config import uses_bf16

    net = _network()
    fp32 = PatchRankingInferer(image_size=64, patch_size=8, amp=False).score(volume, net)
    amp = PatchRankingInferer(image_size=64, patch_size=8, amp=True).score(volume, net)
    valid = fp32.slice_valid
    rel = (amp.slice_scores[valid] - fp32.slice_scores[valid]).abs().max() / fp32.slice_scores[valid].abs().max()
    if not uses_bf16(True, "cpu"):
        assert float(rel) == 0.0  # no native bf16: amp changes nothing on this CPU
        return
    assert 0.0 < float(rel) < 2e-2
    assert torch.equal(amp.slice_scores[valid].argsort()[-3:], fp32.slice_scores[valid].argsort()[-3:])


def test_phantom_slices_are_normalised_brain_slices():
    slices = phantom_slices(32, 3)
    assert slices.shape == (3, 1, 32, 32) and slices.dtype == torch.float32
    brain = slices > 0
    assert float(slices.min()) == 0.0 and 0.2 < float(brain.float().mean()) < 0.9  # a brain on a zero background
    assert 0.5 < float(np.percentile(slices[brain].numpy(), 99)) < 3.0  # normalised: brain intensities around 0..1


def test_child_command_line_replaces_section_paths_and_isolation():
    argv = ["--quick", "--only", "model,e2e", "--json=out.json", "--data-dir", "/d", "--isolate", "--workers", "2"]
    out = _child_argv(argv, "e2e", Path("/w/e2e.json"), Path("/w/e2e"), "/data")
    assert out[:3] == ["--quick", "--workers", "2"]
    assert out[3:] == ["--only", "e2e", "--json", "/w/e2e.json", "--work-dir", "/w/e2e", "--no-isolate", "--child",
                       "--data-dir", "/data"]
