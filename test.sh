#!/usr/bin/env bash
# Install the environment (idempotent), lint, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
