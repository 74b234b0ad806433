"""Another lab's path: the packaged zip served over HTTP, fetched by ``monai.bundle download``, run from the copy."""

import csv
import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data.synthetic import generate_dataset
from scripts.model.networks import reconstructor

ROOT = Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "configs" / "metadata.json").read_text())
NAME, VERSION = META["name"], META["version"]
TINY_NET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
TINY = ["--image_size", "32", "--patch_size", "8", "--num_workers", "0",
        "--network_def#channels", "[8, 16, 32]", "--network_def#strides", "[2, 2]", "--network_def#num_res_units", "1"]


@pytest.fixture()
def served_zip(tmp_path, untrained):
    """The repository packaged with tiny weights, served from 127.0.0.1 by python's http.server."""
    torch.manual_seed(0)
    weights = tmp_path / "trained" / "model.pt"
    weights.parent.mkdir()
    untrained(reconstructor(**TINY_NET).state_dict(), weights)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "tools.package_bundle", "--output", str(dist), "--weights", str(weights),
           str(weights.parent / "residual_calibration.pt")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{NAME}_v{VERSION}.zip", weights
    server.shutdown()
    server.server_close()


def test_a_bundle_downloaded_over_http_scores_a_flair_volume(served_zip, tmp_path):
    url, weights = served_zip
    bundles = tmp_path / "bundles"
    download = [sys.executable, "-m", "monai.bundle", "download", "--name", NAME, "--url", url,
                "--bundle_dir", str(bundles)]
    result = subprocess.run(download, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    copy = bundles / NAME
    assert (copy / "configs" / "inference.json").is_file() and (copy / "metadata.json").is_file()
    for name, value in torch.load(copy / "models" / "model.pt", map_location="cpu").items():
        torch.testing.assert_close(value, torch.load(weights, map_location="cpu")[name], rtol=0, atol=0)

    generate_dataset(tmp_path / "volumes", n_cases=2, shape=(40, 40, 16), seed=5, abnormal_fraction=1.0)
    flair = sorted((tmp_path / "volumes").glob("*/*_flair.nii.gz"))[0]
    out = tmp_path / "scored"
    run = [sys.executable, "-m", "monai.bundle", "run", "run", "--config_file", "configs/inference.json",
           "--input_path", str(flair), "--output_dir", str(out), *TINY]
    result = subprocess.run(run, cwd=copy, capture_output=True, text=True, timeout=600)  # from the copy alone
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    case_id = flair.name.removesuffix(".nii.gz")  # a single file is its own case
    assert [row["case_id"] for row in rows] == [case_id] and np.isfinite(float(rows[0]["score"]))
    heatmap = nib.load(out / "heatmaps" / f"{case_id}_heatmap.nii.gz")
    np.testing.assert_allclose(heatmap.affine, nib.load(flair).affine, atol=1e-5)
