"""The configs satisfy MONAI's bundle properties and the metadata's network format, checked by MONAI's own tools."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("config", "kind"), [("configs/train.json", "train"), ("configs/inference.json", "infer")])
def test_configs_have_every_required_bundle_property(config, kind, tmp_path):
    # A fresh clone has no demo data: point the workflow at a tiny generated set of its own.
    generate_dataset(tmp_path / "data", n_cases=4, shape=(24, 24, 16), seed=0, abnormal_fraction=0.5)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(build_datalist(tmp_path / "data", val_fraction=0.25, test_fraction=0.25, seed=0)))
    workflow = ConfigWorkflow(
        config_file=str(ROOT / config), workflow_type=kind, meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=None, bundle_root=str(ROOT), output_dir=str(tmp_path), ckpt_dir=str(tmp_path),
        datalist=str(datalist),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_top_level_metadata_is_a_relative_link_to_the_configs_copy():
    link = ROOT / "metadata.json"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == (ROOT / "configs" / "metadata.json").resolve()


def test_network_matches_the_metadata_input_and_output_format():
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified with no error" in result.stdout + result.stderr


def test_shipped_commands_pass_booleans_as_python_literals():
    """``monai.bundle run`` reads ``false`` as a string, which the bundle refuses: scripts and docs say ``False``."""
    import re

    files = [ROOT / "demo.sh", *sorted((ROOT / "experiments").glob("*.sh")), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    lowercase = re.compile(r"--[\w#]+\s+(true|false)\b")
    offending = [f"{path.name}: {match.group(0)}" for path in files for match in lowercase.finditer(path.read_text())]
    assert offending == []
