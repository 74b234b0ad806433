#!/usr/bin/env bash
# Check of the bundle in a real MONAI Label server (run by .ci/run): installs MONAI Label into its own virtual environment
# (idempotent; the first run takes several minutes and ~7 GB), then runs check_server.py there, which starts
# `monailabel start_server` on 127.0.0.1 with the sample app apps/patchgan_anomaly and synthetic FLAIR studies,
# calls /infer and /train and checks the returned heatmaps. Extra arguments go to check_server.py.
#
#   MONAILABEL_VENV   where the environment lives (default: monailabel/.venv)
#   PYTHON            the interpreter that creates it (default: python3; 3.11 finds torch on this machine's disk)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
VENV=${MONAILABEL_VENV:-$HERE/.venv}
PYTHON=${PYTHON:-python3}

if ! "$VENV/bin/python" -c "import monailabel.app, torchvision, nibabel, SimpleITK" >/dev/null 2>&1; then
    echo "[run_server_check] installing MONAI Label into $VENV ($(df -h --output=avail "$(dirname "$VENV")" | tail -1 | tr -d ' ') free there)"
    "$PYTHON" -m venv "$VENV"
    # MONAI Label 0.8.5 imports torchvision, whose PyPI wheels load only beside a CUDA build of torch (~5 GB with its
    # libraries; the pair lies on local disk for Python 3.11 here), needs numpy<2, pydicom<3 (for its pydicom-seg
    # 0.4.1), and builds sam2 from source (against the torch already installed, without CUDA). --no-compile: the
    # server imports a small part of these packages, and their byte code would take ~0.5 GB.
    PIP="$VENV/bin/python -m pip install -q --no-compile"
    $PIP "torch==2.14.1" "torchvision==0.29.1" setuptools wheel
    # the bundle's own runtime needs, without those MONAI Label pins differently (numpy, jsonschema) or does not
    # need in the server (torch is above; onnx/onnxruntime serve only the export)
    grep -v -E '^\s*(#|$)|^(torch|numpy|jsonschema|onnx|onnxruntime)([<>=! ]|$)' "$ROOT/requirements.txt" > "$VENV/bundle-requirements.txt"
    SAM2_BUILD_CUDA=0 $PIP --no-build-isolation "monailabel==0.8.5" "numpy<2" "pydicom<3" \
        "torch==2.14.1" "torchvision==0.29.1" -r "$VENV/bundle-requirements.txt"
    # triton (~0.9 GB) is torch's GPU kernel compiler: nothing on this CPU check imports it
    "$VENV/bin/python" -m pip uninstall -q -y triton
fi
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" "$HERE/check_server.py" --bundle-root "$ROOT" "$@"
