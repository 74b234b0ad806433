#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned dependencies.
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    # Pinned explicitly: an open range would pull a multi-GB CUDA build where a CPU wheel is all we need.
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -r requirements-dev.txt
