"""MemoryLLM injection timed against the authors' own code on the same random checkpoint: the README's
"Against the authors' own code" table.

The authors' code runs in its own environment, with the library versions it was written for:

    git clone https://github.com/wangyu-ustc/MemoryLLM && git -C MemoryLLM checkout 5acaf52
    python3 -m venv /tmp/authors-env
    /tmp/authors-env/bin/pip install torch==2.13.0 transformers==4.48.2 peft==0.10.0 accelerate==1.2.0
    .venv/bin/python scripts/authors_inject.py --authors-code MemoryLLM --authors-python /tmp/authors-env/bin/python

Both sides load one checkpoint of bench speed's `small` shape (written by save_checkpoint) and inject the same
512-token chunks, one thread, in fresh processes, the two alternated; the drop generators are seeded alike, so
the memories must come out bit-identical (checked every round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.zoo.checkpoint import save_checkpoint
from tasks.random_models import random_ids, random_model_with_memory
from tasks.speed import SHAPES

SEED = 1234  # the drop generator's seed on both sides

OURS = """
import json, sys, time, torch
import model as mp
from safetensors.torch import save_file
torch.set_num_threads(1)
checkpoint, chunks, seed, out = sys.argv[1:5]
lm = mp.load(checkpoint, dtype=torch.float32)
state = lm.new_state()
state.generator = torch.Generator().manual_seed(int(seed))
times = []
for chunk in json.load(open(chunks)):
    start = time.perf_counter()
    lm.inject(state, torch.tensor(chunk))
    times.append(time.perf_counter() - start)
save_file({"memory": state.memory.contiguous()}, out)
print(json.dumps(times))
"""

THEIRS = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[5])
from configuration_memoryllm import MemoryLLMConfig
from modeling_memoryllm import MemoryLLM
from safetensors.torch import save_file
torch.set_num_threads(1)
checkpoint, chunks, seed, out = sys.argv[1:5]
config = MemoryLLMConfig.from_pretrained(checkpoint)
config.lora_config = dict(config.lora_config, inference_mode=True)
model = MemoryLLM.from_pretrained(checkpoint, config=config, torch_dtype=torch.float32, attn_implementation="sdpa")
model.eval()
torch.manual_seed(int(seed))
times = []
with torch.no_grad():
    for chunk in json.load(open(chunks)):
        start = time.perf_counter()
        model.inject_memory(torch.tensor(chunk)[None], update_memory=True)
        times.append(time.perf_counter() - start)
save_file({"memory": model.memory.data.contiguous()}, out)
print(json.dumps(times))
"""


def write_checkpoint(rows: int, directory: Path) -> Path:
    """The `small` shape's random MemoryLLM with `rows` memory rows per layer, in the authors' layout."""
    config = dict(SHAPES["small"].memoryllm)
    config["num_blocks"] = rows // config["num_tokens"]
    model = random_model_with_memory(config, torch.device("cpu"), torch.float32)
    return save_checkpoint(model, model.initial_state, directory)


def timed(command: list[str]) -> float:
    """The median seconds per inject of a child, its first inject left out (warm-up)."""
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return statistics.median(json.loads(done.stdout.splitlines()[-1])[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-code", type=Path, required=True, help="checkout of the authors' repository")
    parser.add_argument("--authors-python", required=True, help="a Python with the authors' libraries")
    parser.add_argument("--rows", default="1280,10240", help="memory rows per layer, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per side and size")
    parser.add_argument("--chunks", type=int, default=11, help="512-token chunks per process (the first is not timed)")
    args = parser.parse_args()
    if not (args.authors_code / "modeling_memoryllm.py").is_file():
        sys.exit(f"{args.authors_code} holds no modeling_memoryllm.py: clone the authors' repository there")
    with tempfile.TemporaryDirectory(prefix="mplus-authors-") as tmp:
        root = Path(tmp)
        chunks = root / "chunks.json"
        vocab, tokens = SHAPES["small"].memoryllm["vocab_size"], SHAPES["small"].inject_tokens
        chunks.write_text(json.dumps([random_ids(tokens, vocab, seed).tolist() for seed in range(args.chunks)]))
        print("| memory rows/layer | ours | the authors' code | ratio | rounds | memory |")
        print("|---|---|---|---|---|---|")
        code, ours_at, theirs_at = str(args.authors_code), root / "ours", root / "theirs"
        for rows in (int(r) for r in args.rows.split(",")):
            run = [str(write_checkpoint(rows, root / f"rows-{rows}")), str(chunks), str(SEED)]
            ours, theirs, same = [], [], True
            for _ in range(args.rounds):
                theirs.append(timed([args.authors_python, "-c", THEIRS, *run, str(theirs_at), code]))
                ours.append(timed([sys.executable, "-c", OURS, *run, str(ours_at)]))
                same &= torch.equal(load_file(ours_at)["memory"], load_file(theirs_at)["memory"])
            ratios = [t / o for t, o in zip(theirs, ours, strict=True)]
            a, b = statistics.median(ours), statistics.median(theirs)
            spread = f"{min(ratios):.2f}x-{max(ratios):.2f}x"
            memory = "bit-identical" if same else "DIFFERENT"
            print(f"| {rows:,} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {b / a:.2f}x | {spread} | {memory} |")


if __name__ == "__main__":
    main()
