"""``python -m tools.package_bundle``: the zip layout MONAI expects, weights, large_files.yml, atomic writes."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NAME = json.loads((ROOT / "configs" / "metadata.json").read_text())["name"]
VERSION = json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
ZIP_NAME = f"{NAME}_v{VERSION}.zip"
MIB = 1024 * 1024


def package(*args: str) -> subprocess.CompletedProcess:
    """Run the real CLI from the repository root."""
    cmd = [sys.executable, "-m", "tools.package_bundle", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def packaged(*args: str) -> Path:
    result = package(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> Path:
    """A copy of the bundle's packaged parts, with stale caches and a tiny trained model added."""
    root = tmp_path / "bundle"
    root.mkdir()
    for folder in ("configs", "scripts", "docs", "experiments", "tools", "tests"):  # what a checkout holds
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("LICENSE", "README.md", "requirements.txt"):
        shutil.copy2(ROOT / name, root / name)
    os.symlink("configs/metadata.json", root / "metadata.json")
    cache = root / "scripts" / "__pycache__"
    cache.mkdir()
    (cache / "io.cpython-311.pyc").write_bytes(b"stale")
    (root / "scripts" / "baselines" / "__pycache__").mkdir(exist_ok=True)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"tiny reconstructor weights")
    (root / "models" / "normal_stats.pt").write_bytes(b"normal statistics")
    (root / "models" / "checkpoint_final.pt").write_bytes(b"resume-only training state")
    return root


def names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.testzip() is None
        return archive.namelist()


def read(zip_path: Path, member: str) -> bytes:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(f"{NAME}/{member}")


def test_zip_has_one_top_level_folder_and_the_bundle_layout(bundle_copy, tmp_path):
    out = tmp_path / "dist"
    zip_path = packaged("--output", str(out), "--bundle-root", str(bundle_copy))
    assert zip_path == out / ZIP_NAME
    members = names(zip_path)
    assert {m.split("/", 1)[0] for m in members} == {NAME}
    inside = {m.split("/", 1)[1] for m in members}
    for required in ("configs/metadata.json", "configs/train.json", "configs/inference.json", "scripts/__init__.py",
                     "scripts/data/io.py", "scripts/scoring/inferer.py", "docs/data_license.txt", "LICENSE", "metadata.json",
                     "README.md", "requirements.txt", "models/model.pt", "models/normal_stats.pt"):
        assert required in inside, required
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)
    research = ("experiments/", "tools/", "tests/", "scripts/compare", "scripts/benchmark", "scripts/package_bundle")
    assert not [m for m in inside if m.startswith(research)], "the research tools do not ship in the bundle"
    assert "models/checkpoint_final.pt" not in inside
    assert "large_files.yml" not in inside
    assert read(zip_path, "models/model.pt") == b"tiny reconstructor weights"
    assert sorted(p.name for p in out.iterdir()) == [ZIP_NAME], "no temporary file may be left behind"


def test_metadata_json_in_the_zip_is_a_real_file_equal_to_the_configs_copy(bundle_copy, tmp_path):
    zip_path = packaged("--output", str(tmp_path), "--bundle-root", str(bundle_copy))
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(f"{NAME}/metadata.json")
    assert not stat.S_ISLNK(info.external_attr >> 16)
    assert stat.S_ISREG(info.external_attr >> 16)
    expected = (ROOT / "configs" / "metadata.json").read_bytes()
    assert read(zip_path, "metadata.json") == expected == read(zip_path, "configs/metadata.json")


def test_the_repository_itself_packages_with_weights_passed_on_the_command_line(tmp_path):
    weights = tmp_path / "trained" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights from a training run")
    zip_path = packaged("--output", str(tmp_path / "dist"), "--weights", str(weights), "--require-weights")
    members = names(zip_path)
    assert {m.split("/", 1)[0] for m in members} == {NAME}
    assert read(zip_path, "models/model.pt") == b"weights from a training run"
    assert f"{NAME}/configs/metadata.json" in members
    assert not any("__pycache__" in m or m.endswith(".pyc") or "/." in m for m in members)
    assert not any(m.startswith(f"{NAME}/{top}/") for m in members for top in ("tests", "runs", "eval", ".venv"))


def test_require_weights_fails_clearly_without_model_pt(bundle_copy, tmp_path):
    (bundle_copy / "models" / "model.pt").unlink()
    result = package("--output", str(tmp_path / "dist"), "--bundle-root", str(bundle_copy), "--require-weights")
    assert result.returncode != 0
    assert "--require-weights" in result.stderr and "model.pt" in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_missing_weights_file_is_an_error(bundle_copy, tmp_path):
    result = package("--output", str(tmp_path), "--bundle-root", str(bundle_copy), "--weights",
                     str(tmp_path / "nope.pt"))
    assert result.returncode != 0 and "nope.pt" in result.stderr


def test_a_model_over_25_mib_goes_to_large_files_yml_not_into_the_zip(bundle_copy, tmp_path):
    big = tmp_path / "big" / "model.pt"
    big.parent.mkdir()
    with open(big, "wb") as handle:  # sparse: 26 MiB of zeros without writing them
        handle.truncate(26 * MIB)
    expected_hash = hashlib.sha256(big.read_bytes()).hexdigest()
    zip_path = packaged("--output", str(tmp_path / "dist"), "--bundle-root", str(bundle_copy), "--weights",
                        str(big), "--large-file-url-base", "https://example.org/weights/v0.1.0/")
    inside = {m.split("/", 1)[1] for m in names(zip_path)}
    assert "models/model.pt" not in inside
    assert "models/normal_stats.pt" in inside and "models/" in inside
    assert zip_path.stat().st_size < 5 * MIB
    listing = yaml.safe_load(read(zip_path, "large_files.yml"))
    assert listing == {"large_files": [{
        "path": "models/model.pt",
        "url": "https://example.org/weights/v0.1.0/model.pt",
        "hash_val": expected_hash,
        "hash_type": "sha256",
    }]}


def test_without_a_url_base_large_files_get_a_placeholder_and_a_warning(bundle_copy, tmp_path):
    with open(bundle_copy / "models" / "model.pt", "wb") as handle:
        handle.truncate(26 * MIB)
    result = package("--output", str(tmp_path), "--bundle-root", str(bundle_copy), "--require-weights")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "large_files.yml" in result.stderr
    listing = yaml.safe_load(read(tmp_path / ZIP_NAME, "large_files.yml"))
    assert [row["path"] for row in listing["large_files"]] == ["models/model.pt"]
    assert ".invalid/" in listing["large_files"][0]["url"]


def test_a_file_just_under_the_limit_stays_in_the_zip(bundle_copy, tmp_path):
    with open(bundle_copy / "models" / "model.pt", "wb") as handle:
        handle.truncate(25 * MIB)
    zip_path = packaged("--output", str(tmp_path), "--bundle-root", str(bundle_copy))
    inside = {m.split("/", 1)[1] for m in names(zip_path)}
    assert "models/model.pt" in inside and "large_files.yml" not in inside


def test_rebuilding_replaces_the_zip_atomically_with_identical_bytes(bundle_copy, tmp_path):
    first = packaged("--output", str(tmp_path), "--bundle-root", str(bundle_copy)).read_bytes()
    second_path = packaged("--output", str(tmp_path), "--bundle-root", str(bundle_copy))
    assert second_path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [ZIP_NAME]


def test_a_failed_write_leaves_no_partial_zip(bundle_copy, tmp_path, monkeypatch):
    from tools import package_bundle as pb

    def explode(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pb.shutil, "copyfileobj", explode)
    out = tmp_path / "dist"
    with pytest.raises(OSError, match="disk full"):
        pb.package_bundle(out, bundle_copy)
    assert list(out.iterdir()) == []
