"""Drive a real MONAI Label server with this bundle and check what it returns (run by run_server_check.sh).

Runs inside the MONAI Label virtual environment. Steps, all on 127.0.0.1:

1. a working folder: a copy of the bundle (configs, scripts, metadata) under ``app/model/<name>`` of a copy of the
   sample app ``apps/patchgan_anomaly``, its configs set to tiny sizes so that a CPU finishes in minutes, a
   randomly initialised ``models/model.pt``; a studies folder of synthetic FLAIR volumes (flat, as MONAI Label's
   local datastore wants), every study but one with a final label: all zeros for a normal study, the lesion mask
   for an abnormal one (its lesion slices are kept out of training), the last one unlabelled (not used);
2. ``monailabel start_server`` on a free port; waits for ``/info/``;
3. ``/infer`` on an LPS-oriented volume: the heatmap must be on the volume's own grid (shape, affine) and equal
   the bundle's own inference (``monai.bundle run run`` with the same weights) within 1e-4;
4. ``/train`` for one epoch (MONAI Label's ``BundleTrainTask``, background task as a user starts it): must end
   ``DONE`` and write a new ``model.pt``, ``checkpoint_final.pt``, ``normal_stats.pt`` and ``residual_calibration.pt``;
5. ``/infer`` again: the new weights are picked up and the heatmap again equals the bundle's own.

Prints one JSON summary line (``MONAILABEL_CHECK {...}``) and exits non-zero on the first failed step; the
server log is ``<work>/server.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {
    "image_size": 32, "patch_size": 8, "batch_size": 8, "num_workers": 0,
    "network_def": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "critic_def": {"channels": 8},
}
ATOL = 1e-4


def log(message: str) -> None:
    print(f"[check_server] {message}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_tiny(config_path: Path) -> None:
    """Shrink a copied config in place (top-level values; dicts merged one level down)."""
    config = json.loads(config_path.read_text())
    for key, value in TINY.items():
        if isinstance(value, dict) and key in config:
            config[key].update(value)
        elif key in config:
            config[key] = value
    config_path.write_text(json.dumps(config, indent=4))


def copy_bundle(root: Path, target: Path) -> str:
    """Copy the bundle's configs, scripts and metadata into ``target``; return the bundle's name."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target.mkdir(parents=True)
    shutil.copytree(root / "configs", target / "configs", ignore=ignore)
    shutil.copytree(root / "scripts", target / "scripts", ignore=ignore)
    shutil.copyfile(root / "configs" / "metadata.json", target / "metadata.json")
    for name in ("train.json", "inference.json"):
        set_tiny(target / "configs" / name)
    (target / "models").mkdir()
    return json.loads((root / "configs" / "metadata.json").read_text())["name"]


def init_weights(bundle: Path) -> None:
    """A randomly initialised reconstructor as ``models/model.pt`` (BundleInferTask needs one at start-up), with
    the neutral residual calibration an untrained model has."""
    code = (
        "import sys, torch; from monai.bundle import ConfigParser; sys.path.insert(0, sys.argv[1]);"
        "from scripts.scoring.calibration import neutral_residual_calibration;"
        "p = ConfigParser(); p.read_config(sys.argv[1] + '/configs/inference.json'); torch.manual_seed(0);"
        "torch.save(p.get_parsed_content('network_def').state_dict(), sys.argv[1] + '/models/model.pt');"
        "torch.save(neutral_residual_calibration(), sys.argv[1] + '/models/residual_calibration.pt')"
    )
    subprocess.run([sys.executable, "-c", code, str(bundle)], check=True, cwd=bundle)


def make_studies(bundle: Path, studies: Path, n_cases: int) -> dict:
    """Synthetic FLAIR studies in MONAI Label's flat layout, with final labels on all but the last one."""
    source = studies.parent / "synthetic"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
        "from scripts.data.synthetic import generate_dataset;"
        "generate_dataset(Path(sys.argv[2]), n_cases=int(sys.argv[3]), shape=(40, 40, 16), seed=5, abnormal_fraction=0.5)"
    )
    subprocess.run([sys.executable, "-c", code, str(bundle), str(source), str(n_cases)], check=True, cwd=bundle)
    import nibabel as nib
    import numpy as np

    labels = studies / "labels" / "final"
    labels.mkdir(parents=True)
    cases = sorted(p for p in source.iterdir() if p.is_dir())
    summary: dict = {"normal": [], "abnormal": [], "unlabelled": []}
    for i, case in enumerate(cases):
        flair = case / f"{case.name}_flair.nii.gz"
        shutil.copyfile(flair, studies / flair.name)
        if i == len(cases) - 1:
            summary["unlabelled"].append(flair.name)
            continue
        seg = nib.load(case / f"{case.name}_seg.nii.gz")
        mask = np.asarray(seg.dataobj) > 0
        kind = "abnormal" if mask.any() else "normal"
        summary[kind].append(flair.name)
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), seg.affine), labels / flair.name)
    return summary


def request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 600) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


def wait_for_server(base: str, process: subprocess.Popen, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before answering")
        try:
            return json.loads(request(f"{base}/info/", timeout=10))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise TimeoutError(f"server did not answer /info/ within {timeout:.0f} s")


def bundle_reference(bundle: Path, image: Path, out: Path) -> Path:
    """The bundle's own heatmap for ``image`` with its current weights (``monai.bundle run run``)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "run", "--config_file", "configs/inference.json",
           "--bundle_root", str(bundle), "--input_path", str(image), "--output_dir", str(out),
           "--overlay_slices", "0"]
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"bundle inference failed: {result.stderr[-3000:]}")
    return next((out / "heatmaps").glob("*_heatmap.nii.gz"))


def check_heatmap(returned: Path, image: Path, reference: Path) -> dict:
    import nibabel as nib
    import numpy as np

    heat, source, ref = nib.load(returned), nib.load(image), nib.load(reference)
    values = np.asarray(heat.dataobj, dtype=np.float64)
    if heat.shape != source.shape:
        raise AssertionError(f"heatmap shape {heat.shape} != image shape {source.shape}")
    if not np.allclose(heat.affine, source.affine, atol=1e-4):
        raise AssertionError(f"heatmap affine differs from the image's:\n{heat.affine}\n{source.affine}")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() <= 0:
        raise AssertionError(f"heatmap values not finite and >= 0 with some signal: {values.min()}..{values.max()}")
    difference = float(np.abs(values - np.asarray(ref.dataobj, dtype=np.float64)).max())
    if difference > ATOL:
        raise AssertionError(f"heatmap differs from the bundle's own by {difference:.3g} (> {ATOL})")
    return {"shape": list(heat.shape), "max": float(values.max()), "max_abs_diff_vs_bundle": difference}


def infer(base: str, model: str, image_id: str, target: Path) -> Path:
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    target.write_bytes(request(f"{base}/infer/{model}?{query}", method="POST", body={}))
    return target


def train(base: str, model: str, timeout: float) -> dict:
    params = {"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False, "tracking": "None"}
    request(f"{base}/train/{model}", method="POST", body=params)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(3)
        status = json.loads(request(f"{base}/train/"))  # the latest training task
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
    raise TimeoutError(f"training did not finish within {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """End the server and the processes it started (its own session), politely first."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            pass
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children left in the group (a background training task) after the server itself has gone
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    """The five steps of the module docstring in order; one function so that the server's lifetime (started,
    always stopped in ``finally``) encloses every request in plain sight."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle-root", type=Path, default=HERE.parent)
    parser.add_argument("--work", type=Path, default=HERE / "work", help="working folder (emptied first)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for start-up and for training")
    args = parser.parse_args()

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    app = work / "app"
    shutil.copytree(HERE / "apps" / "patchgan_anomaly", app, ignore=shutil.ignore_patterns("__pycache__"))
    name = copy_bundle(args.bundle_root.resolve(), app / "model" / "patchgan_ranking_anomaly")
    bundle = app / "model" / "patchgan_ranking_anomaly"
    init_weights(bundle)
    studies = work / "studies"
    marked = make_studies(bundle, studies, args.cases)
    log(f"studies: {marked}")

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1")
    summary: dict = {"port": port, "studies": marked}
    server_log = open(work / "server.log", "w")
    log(f"starting: {' '.join(cmd)}")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.time()
        info = wait_for_server(base, server, args.timeout)
        summary["startup_s"] = round(time.time() - started, 1)
        if name not in info.get("models", {}) or name not in info.get("trainers", {}):
            raise AssertionError(f"{name} missing from /info/ models {list(info.get('models', {}))} "
                                 f"or trainers {list(info.get('trainers', {}))}")
        log(f"server up in {summary['startup_s']} s; models {list(info['models'])}, trainers {list(info['trainers'])}")

        lps = [n for n in marked["abnormal"] + marked["normal"] if int(n.split("_")[1]) % 2 == 1][0]
        image_id, image = lps.removesuffix(".nii.gz"), studies / lps
        started = time.time()
        returned = infer(base, name, image_id, work / "infer_before.nii.gz")
        summary["infer_before"] = check_heatmap(returned, image, bundle_reference(bundle, image, work / "ref_before"))
        summary["infer_before"]["s"] = round(time.time() - started, 1)
        log(f"/infer before training: {summary['infer_before']}")

        weights = bundle / "models" / "model.pt"
        before = weights.read_bytes()
        started = time.time()
        status = train(base, name, args.timeout)
        summary["train"] = {"status": status.get("status"), "s": round(time.time() - started, 1)}
        log(f"/train: {summary['train']}")
        if status.get("status") != "DONE":
            raise AssertionError(f"training ended {status.get('status')}: {json.dumps(status)[-3000:]}")
        for file in ("model.pt", "checkpoint_final.pt", "normal_stats.pt", "residual_calibration.pt"):
            if not (bundle / "models" / file).is_file():
                raise AssertionError(f"training did not write models/{file}")
        if weights.read_bytes() == before:
            raise AssertionError("training did not change models/model.pt")

        returned = infer(base, name, image_id, work / "infer_after.nii.gz")
        summary["infer_after"] = check_heatmap(returned, image, bundle_reference(bundle, image, work / "ref_after"))
        log(f"/infer after training: {summary['infer_after']}")
        summary["ok"] = True
    except Exception as error:  # reported with the server log's tail, then a non-zero exit
        summary["ok"] = False
        summary["error"] = f"{type(error).__name__}: {error}"
    finally:
        stop(server)
        server_log.close()
    print("MONAILABEL_CHECK " + json.dumps(summary), flush=True)
    if not summary["ok"]:
        print((work / "server.log").read_text()[-6000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
