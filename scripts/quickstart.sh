#!/usr/bin/env bash
# Set up .venv (CPU torch) and run the main job on the bundled example, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mplus ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
.venv/bin/python examples/quickstart.py "$@"
