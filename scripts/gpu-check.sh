#!/usr/bin/env bash
# The GPU check, on one CUDA machine without network whose Python already has torch (with CUDA), transformers,
# typer, rich, safetensors, pandas and matplotlib; any other wheel the project needs (gguf) comes from a local
# folder, $WHEELS (default ./wheels). Within 8 minutes it
#   1. installs this checkout with --no-deps (or runs it from the checkout if that fails),
#   2. replays the parity fixtures on CUDA: float32 within the CPU tolerances, bfloat16 within a stated one,
#   3. measures the bf16 matmul peak (8192^3 matmuls, CUDA events),
#   4. measures peak GPU memory of the random 8B MemoryLLM and M+ models beside the paper's,
#   5. runs a short retention sweep on CUDA (batched when bench retention has --batch-size),
#   6. runs `mplus bench speed --shape 8b --device cuda` and reports inject FLOP/s over the matmul peak,
# each step under its own time limit, and writes gpu-check.json and gpu-check.log to OUT.
#
# Usage: bash scripts/gpu-check.sh [OUT]       (OUT: the argument, else $OUT, else ./gpu-check; $PYTHON: python3)
# A CPU rehearsal of the same steps at small sizes: GPU_CHECK_DEVICE=cpu bash scripts/gpu-check.sh /tmp/check
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
log="$out/gpu-check.log" && : >"$log"
work="$(mktemp -d)" && trap 'rm -rf "$work"' EXIT
py="${PYTHON:-python3}"
device="${GPU_CHECK_DEVICE:-cuda}"
deadline=$((SECONDS + 460))  # the steps' share of the 8 minutes; the report takes the rest
# $matmul, $sweep, $batch and $speed below are lists of options: left unquoted on purpose

if [ "$device" = cuda ]; then
    shape=8b matmul="--size 8192 --repeats 50" ltm=10000 sweep="--max-distance 16k --limit 16"
    speed="--ltm-rows 10000,40000 --repeats 2" sizes=10000,40000
else  # the rehearsal: the same steps, CPU sized
    shape=tiny matmul="--size 512 --repeats 5" ltm=64 sweep="--max-distance 1k --limit 4" speed="--repeats 1" sizes=64,256
fi

# step NAME SECONDS STDOUT COMMAND...: run COMMAND within SECONDS (less if the deadline is nearer), its stdout
# into STDOUT ('-': the log) and its stderr into the log; record its exit status and time
step() {
    local name=$1 limit=$2 stdout=$3 begun=$SECONDS rc
    shift 3
    [ $((deadline - SECONDS)) -lt "$limit" ] && limit=$((deadline - SECONDS))
    echo "== $name (at most $limit s): $*" >>"$log"
    if [ "$limit" -lt 5 ]; then
        rc=124 && echo "skipped: the 8 minutes are spent" >>"$log"
    elif [ "$stdout" = - ]; then
        timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
        rc=$?
    else
        timeout --kill-after=5 "$limit" "$@" >"$stdout" 2>>"$log"
        rc=$?
    fi
    echo "== $name: exit $rc after $((SECONDS - begun)) s" >>"$log"
    printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - begun)) >>"$work/steps.jsonl"
}

install() {  # no index: nothing is fetched; the CPU rehearsal leaves the Python it runs on as it is
    [ "$device" = cuda ] && "$py" -m pip install --no-deps --no-build-isolation --no-index -e . ||
        echo "not installed: running from the checkout (python -m mplus_cli in the repository root)"
    "$py" -c "import gguf" 2>/dev/null || "$py" -m pip install --no-index --find-links "$WHEELS" gguf
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
}

retention() {  # batched when bench retention has --batch-size
    local batch="" help
    help="$("$py" -m mplus_cli bench retention --help)"
    case "$help" in *--batch-size*) batch="--batch-size 8" ;; esac
    "$py" -m mplus_cli bench retention --model tiny-mplus --model tiny-free-mplus --controls closed-book \
        $sweep $batch --device "$device" -o "$work/retention"
}

export py device work sweep WHEELS="${WHEELS:-wheels}"
export -f install retention
step install 60 - bash -c install
step parity 60 - "$py" scripts/gpu_check.py parity --device "$device" --out "$work/parity.json"
step matmul 30 - "$py" scripts/gpu_check.py matmul --device "$device" $matmul --out "$work/matmul.json"
step memory 90 - "$py" scripts/gpu_check.py memory --device "$device" --shape "$shape" --ltm-rows "$ltm" \
    --out "$work/memory.json"
step retention 60 - bash -c retention
step retrieval 60 - "$py" scripts/gpu_check.py retrieval --device "$device" --shape "$shape" --ltm-sizes "$sizes" \
    --out "$work/retrieval.json"
step kernels 30 - "$py" -m pytest -q -rs -p no:cacheprovider tests/test_model/test_attention_kernels.py \
    tests/test_model/test_device_retrieval.py tests/test_model/test_batch.py
# core only: the cold path (bench speed's other default group) saves and reloads a 3 GB state per process at 8b
step speed 240 "$work/speed.json" "$py" -m mplus_cli bench speed --groups core --shape "$shape" --device "$device" \
    $speed --json
timeout 15 "$py" scripts/gpu_check.py report --work "$work" --shape "$shape" --out "$out/gpu-check.json" >>"$log" 2>&1
echo "wrote $out/gpu-check.json and $out/gpu-check.log ($SECONDS s)"
