#!/usr/bin/env bash
# Set up .venv (CPU torch) and run the main job offline: inject the bundled corpus into a session,
# then ask the bundled questions from its memory.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mplus ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
export MPLUS_HOME="${MPLUS_HOME:-$PWD/.mplus-quickstart}"
model="${MPLUS_MODEL:-tiny}"
.venv/bin/mplus session rm quickstart --yes >/dev/null 2>&1 || true
.venv/bin/mplus inject examples/corpus.txt --session quickstart --model "$model"
while IFS='|' read -r question expected; do
    echo "Q: ${question% }"
    printf 'A: '
    .venv/bin/mplus ask "Question: ${question% } Answer:" --session quickstart --max-new-tokens 12
    echo "   (expected:${expected})"
done < examples/questions.txt
