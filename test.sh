#!/usr/bin/env bash
# Install the environment (idempotent) with the optional brain-extraction extra, lint, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
. .venv/bin/activate
# the optional HD-BET extra (brain_mask "hdbet"): CI tests the real model on real volumes
python -m pip install -q -r requirements-brain.txt
ruff check .
python -m pytest -q "$@"
