"""configs/metadata.json passes MONAI's own schema check offline and agrees with requirements.txt and the networks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
SCHEMA = ROOT / "schemas" / "meta_schema_20240725.json"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # the release asset, see schemas/README.md


def metadata() -> dict:
    return json.loads(META.read_text())


def requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def verify(meta_file: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle verify_metadata`` against the vendored schema, pinned by its md5."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
           "--filepath", str(SCHEMA), "--hash_val", SCHEMA_MD5, "--hash_type", "md5"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_metadata_verifies_with_monai_offline_against_the_vendored_schema():
    assert metadata()["schema"] == SCHEMA_URL
    result = verify(Path("configs/metadata.json"))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "skipped downloading" in log, "verify_metadata must use the vendored schema, not the network"
    assert "metadata is verified with no error" in log


def test_the_schema_check_really_rejects_bad_metadata(tmp_path):
    bad = metadata()
    del bad["network_data_format"]["inputs"]["image"]["dtype"]
    bad.pop("authors")
    (tmp_path / "metadata.json").write_text(json.dumps(bad))
    result = verify(tmp_path / "metadata.json")
    assert result.returncode != 0
    assert "Failed validating" in result.stdout + result.stderr


def test_top_level_metadata_is_a_relative_symlink_to_the_configs_file():
    link = ROOT / "metadata.json"
    assert link.is_symlink()
    target = os.readlink(link)
    assert not os.path.isabs(target) and Path(target) == Path("configs/metadata.json")
    assert link.resolve() == META.resolve()


def test_required_packages_agree_with_requirements_txt():
    meta, reqs = metadata(), requirements()
    expected = {"pytorch-ignite", "nibabel", "simpleitk", "scikit-learn", "matplotlib", "tensorboard", "tqdm",
                "pillow", "fire", "jsonschema"}
    pins = {canonicalize_name(name): version for name, version in meta["required_packages_version"].items()}
    assert expected <= set(pins)
    for name, version in pins.items():
        assert name in reqs, f"{name} is in metadata.json but not in requirements.txt"
        spec = reqs[name].specifier
        assert Version(version) in spec, f"{name}=={version} (metadata) is outside {spec} (requirements.txt)"
        exact = [s.version for s in spec if s.operator == "=="]
        assert not exact or exact == [version], f"{name}: metadata {version} != requirements.txt {exact[0]}"
    assert Version(meta["monai_version"]) in reqs["monai"].specifier
    assert Version(meta["pytorch_version"]) in reqs["torch"].specifier
    assert Version(meta["numpy_version"]) in reqs["numpy"].specifier


def test_versions_and_identity_fields():
    meta = metadata()
    assert meta["name"] == "patchgan_ranking_anomaly" and re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert max(meta["changelog"], key=Version) == meta["version"]  # the version is the newest changelog entry
    assert (meta["monai_version"], meta["pytorch_version"]) == ("1.6.1", "2.13.0")
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["numpy_version"])
    assert meta["data_type"] == "nibabel" and meta["supported_apps"] == {}
    assert "not for clinical" in meta["intended_use"].lower() or "not a medical device" in meta["intended_use"].lower()
    refs = " ".join(meta["references"])
    for needle in ("AAAI 2025", "Pinon", "Sabokrou", "Isola", "Menze", "1605.01397"):
        assert needle in refs


def _spatial(shape: list, n: int) -> tuple[int, ...]:
    return tuple(int(eval(str(s), {"__builtins__": {}}, {"n": n})) for s in shape)  # noqa: S307 - metadata text


@pytest.mark.parametrize("n", [1, 2, 3])
def test_default_networks_match_both_data_formats(n):
    """The UNet and PatchDiscriminator the metadata describes give the shapes it states, for several sizes."""
    from monai.networks.nets import PatchDiscriminator, UNet

    meta = metadata()
    net_in = meta["network_data_format"]["inputs"]["image"]
    net_out = meta["network_data_format"]["outputs"]["pred"]
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=[32, 64, 128, 256, 512],
                strides=[2, 2, 2, 2], num_res_units=2, norm="INSTANCE").eval()
    x = torch.rand(1, net_in["num_channels"], *_spatial(net_in["spatial_shape"], n))
    with torch.no_grad():
        y = unet(x)
    assert y.shape == (1, net_out["num_channels"], *_spatial(net_out["spatial_shape"], n))
    assert str(y.dtype) == f"torch.{net_out['dtype']}"

    d_in = meta["critic_data_format"]["inputs"]["image"]
    d_out = meta["critic_data_format"]["outputs"]["pred"]
    critic = PatchDiscriminator(spatial_dims=2, channels=64, in_channels=1, num_layers_d=3, norm="INSTANCE").eval()
    with torch.no_grad():
        logits = critic(torch.rand(1, d_in["num_channels"], *_spatial(d_in["spatial_shape"], n)))[-1]
    assert logits.shape == (1, d_out["num_channels"], *_spatial(d_out["spatial_shape"], n))
