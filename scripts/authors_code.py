"""The README's "Against the authors' own code" tables: MemoryLLM injection and the M+ first question, timed
against the authors' own code on the same random checkpoints.

The authors' code runs in its own environment, with the library versions it was written for:

    git clone https://github.com/wangyu-ustc/MemoryLLM && git -C MemoryLLM checkout 5acaf52
    python3 -m venv /tmp/authors-env
    /tmp/authors-env/bin/pip install torch==2.13.0 transformers==4.48.2 peft==0.10.0 accelerate==1.2.0
    theirs="--authors-code MemoryLLM --authors-python /tmp/authors-env/bin/python"
    .venv/bin/python scripts/authors_code.py inject $theirs
    .venv/bin/python scripts/authors_code.py ask $theirs

Both sides load one checkpoint of bench speed's `small` shape (written by save_checkpoint), one thread, in fresh
processes, the two alternated.
- inject: the same 512-token chunks into a MemoryLLM; the drop generators are seeded alike, so the memories must
  come out bit-identical (checked every round).
- ask: the M+ flavour with a random long-term memory of N rows per layer in the checkpoint; each question is a
  first one (no memory keys/values kept from another), answered greedily, its first token timed; the answers'
  ids must be equal. The authors' M+ decoder layer runs only with its flash-attention class, which calls
  flash-attn 2 (CUDA only): here that class runs with the one call to flash-attn replaced by PyTorch's
  scaled_dot_product_attention under the same (bottom-right aligned) causal mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.memory.ltm import LongTermMemory
from model.zoo.checkpoint import save_checkpoint
from tasks.random_models import random_ids, random_model_with_memory
from tasks.speed import SHAPES

SEED = 1234  # the drop generator's seed on both sides
ANSWER_TOKENS = 8  # tokens of the untimed answer whose ids are compared
# what the authors' M+ constructor reads beyond the registry's config (their mplus-8b's settings for asking)
THEIR_MPLUS_FIELDS = {"add_selector": True, "add_encoder_retriever": True, "detach_hidden_state": False}

OURS_INJECT = """
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

THEIRS_INJECT = """
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

OURS_ASK = """
import json, sys, time, torch
import model as mp
torch.set_num_threads(1)
checkpoint, prompts, answer_tokens = sys.argv[1:4]
lm = mp.load(checkpoint, dtype=torch.float32)
state = lm.new_state()
times, answers = [], []
for prompt in json.load(open(prompts)):
    state.memory_changed()  # a first question: no memory keys/values kept from the previous one
    start = time.perf_counter()
    mp.generate(lm, state, prompt, mp.DecodeSettings(max_new_tokens=1))
    times.append(time.perf_counter() - start)
    answer = mp.generate(lm, state, prompt, mp.DecodeSettings(max_new_tokens=int(answer_tokens)))
    answers.append(list(answer.token_ids))
print(json.dumps([times, answers]))
"""

THEIRS_ASK = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[4])
import modeling_mplus
from transformers import LlamaConfig
from modeling_mplus import LlamaFlashAttention2, MPlus
torch.set_num_threads(1)
checkpoint, prompts, answer_tokens = sys.argv[1:4]

def sdpa_for_flash_attn(q, k, v, attention_mask, query_length, is_causal, dropout=0.0, **_):
    # q [B, q, H, D], k and v [B, n, H_kv, D] -> [B, q, H, D]; flash-attn >= 2.1's bottom-right causal mask
    assert attention_mask is None, "padded batches are not timed"
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    n = k.shape[2]
    mask = torch.ones(query_length, n, dtype=torch.bool).tril(n - query_length) if is_causal else None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True).transpose(1, 2)

modeling_mplus._flash_attention_forward = sdpa_for_flash_attn
config = LlamaConfig.from_pretrained(checkpoint)
config.lora_config = dict(config.lora_config, inference_mode=True)
model = MPlus.from_pretrained(checkpoint, config=config, torch_dtype=torch.float32, attn_implementation="sdpa")
model.config._attn_implementation = "flash_attention_2"
for layer in model.model.layers:
    layer.self_attn.__class__ = LlamaFlashAttention2
    layer.self_attn._flash_attn_uses_top_left_mask = False
model.put_ltm_to_numpy()
model.eval()
times, answers = [], []
with torch.no_grad():
    for prompt in json.load(open(prompts)):
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
        answer = model.generate(input_ids=ids, max_new_tokens=int(answer_tokens), do_sample=False)
        answers.append(answer[0, len(prompt):].tolist())
print(json.dumps([times, answers]))
"""


def inject_checkpoint(rows: int, directory: Path) -> Path:
    """The `small` shape's random MemoryLLM with `rows` memory rows per layer, in the authors' layout."""
    config = dict(SHAPES["small"].memoryllm)
    config["num_blocks"] = rows // config["num_tokens"]
    model = random_model_with_memory(config, torch.device("cpu"), torch.float32)
    return save_checkpoint(model, model.initial_state, directory)


def ask_checkpoint(ltm_rows: int, stm_rows: int | None, directory: Path) -> Path:
    """The `small` shape's random M+ (with `stm_rows` short-term rows per layer if given) and a random long-term
    memory of `ltm_rows` rows per layer (distinct ages, so that both sides order the retrieved rows alike), in the
    authors' layout."""
    config = dict(SHAPES["small"].mplus, ltm_initial_size=ltm_rows, update_ltm_mode="immediate", **THEIR_MPLUS_FIELDS)
    if stm_rows is not None:
        config["num_blocks"] = stm_rows // config["num_tokens"] + config["num_ltm_blocks"]
    model = random_model_with_memory(config, torch.device("cpu"), torch.float32)
    cfg, g, n = model.cfg, torch.Generator().manual_seed(1), ltm_rows
    layers = [
        (torch.randn(n, cfg.hidden_size, generator=g), torch.randn(n, cfg.selector_hidden_dim, generator=g))
        + (torch.zeros(n), torch.randperm(n, generator=g))
        for _ in range(cfg.num_layers)
    ]  # (rows [n, d], keys [n, s], recall frequencies [n], ages [n]) per layer
    state = model.initial_state
    state.ltm = LongTermMemory.from_rows(layers)
    return save_checkpoint(model, state, directory)


def child(command: list[str]) -> list:
    """A child's last line of stdout, read as JSON."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def compare(
    sizes: list[int], rounds: int, ours: Callable[[int], tuple[float, bool]], theirs: Callable[[int], float]
) -> None:
    """Alternate fresh processes of both sides at each size; print a row per size: the medians, their ratio, the
    spread of the rounds' ratios and whether every round's outputs were equal (`ours` checks them)."""
    for size in sizes:
        a, b, same = [], [], True
        for _ in range(rounds):
            b.append(theirs(size))
            seconds, equal = ours(size)
            a.append(seconds)
            same &= equal
        ratios = [t / o for t, o in zip(b, a, strict=True)]
        mine, authors = statistics.median(a), statistics.median(b)
        spread = f"{min(ratios):.2f}x-{max(ratios):.2f}x"
        print(
            f"| {size:,} | {mine * 1e3:.0f} ms | {authors * 1e3:.0f} ms | {authors / mine:.2f}x | {spread} | "
            f"{'equal' if same else 'DIFFERENT'} |",
            flush=True,
        )


def run_inject(args: argparse.Namespace, root: Path) -> None:
    chunks = root / "chunks.json"
    vocab, tokens = SHAPES["small"].memoryllm["vocab_size"], SHAPES["small"].inject_tokens
    chunks.write_text(json.dumps([random_ids(tokens, vocab, seed).tolist() for seed in range(args.chunks)]))
    ours_at, theirs_at = root / "ours", root / "theirs"
    checkpoints = {rows: str(inject_checkpoint(rows, root / f"rows-{rows}")) for rows in args.sizes}

    def theirs(rows: int) -> float:
        command = [args.authors_python, "-c", THEIRS_INJECT, checkpoints[rows], str(chunks), str(SEED)]
        return statistics.median(child([*command, str(theirs_at), str(args.authors_code)])[1:])

    def ours(rows: int) -> tuple[float, bool]:
        times = child([sys.executable, "-c", OURS_INJECT, checkpoints[rows], str(chunks), str(SEED), str(ours_at)])
        return statistics.median(times[1:]), torch.equal(load_file(ours_at)["memory"], load_file(theirs_at)["memory"])

    print("| memory rows/layer | ours | the authors' code | ratio | rounds | memory (bit for bit) |")
    print("|---|---|---|---|---|---|")
    compare(args.sizes, args.rounds, ours, theirs)


def run_ask(args: argparse.Namespace, root: Path) -> None:
    prompts = root / "prompts.json"
    vocab, tokens = SHAPES["small"].mplus["vocab_size"], SHAPES["small"].prompt_tokens
    prompts.write_text(json.dumps([random_ids(tokens, vocab, seed).tolist() for seed in range(args.questions)]))
    checkpoints = {rows: str(ask_checkpoint(rows, args.stm_rows, root / f"ltm-{rows}")) for rows in args.sizes}
    answers: dict[int, list] = {}

    def theirs(rows: int) -> float:
        command = [args.authors_python, "-c", THEIRS_ASK, checkpoints[rows], str(prompts), str(ANSWER_TOKENS)]
        times, answers[rows] = child([*command, str(args.authors_code)])
        return statistics.median(times[1:])

    def ours(rows: int) -> tuple[float, bool]:
        times, ids = child([sys.executable, "-c", OURS_ASK, checkpoints[rows], str(prompts), str(ANSWER_TOKENS)])
        return statistics.median(times[1:]), ids == answers[rows]

    print("| LTM rows/layer | ours | the authors' code | ratio | rounds | answers' ids |")
    print("|---|---|---|---|---|---|")
    compare(args.sizes, args.rounds, ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("inject", "ask"), help="MemoryLLM injection or the M+ first question")
    parser.add_argument("--authors-code", type=Path, required=True, help="checkout of the authors' repository")
    parser.add_argument("--authors-python", required=True, help="a Python with the authors' libraries")
    parser.add_argument(
        "--sizes", help="memory rows per layer (inject; default 1280,10240) or LTM rows per layer (ask; 10000,40000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per side and size")
    parser.add_argument("--chunks", type=int, default=11, help="inject: 512-token chunks per process (first untimed)")
    parser.add_argument("--stm-rows", type=int, help="ask: short-term rows per layer (default: the shape's 8,192)")
    parser.add_argument("--questions", type=int, default=6, help="ask: questions per process (the first untimed)")
    args = parser.parse_args()
    args.sizes = [int(n) for n in (args.sizes or ("1280,10240" if args.what == "inject" else "10000,40000")).split(",")]
    code = "modeling_memoryllm.py" if args.what == "inject" else "modeling_mplus.py"
    if not (args.authors_code / code).is_file():
        sys.exit(f"{args.authors_code} holds no {code}: clone the authors' repository there")
    with tempfile.TemporaryDirectory(prefix="mplus-authors-") as tmp:
        (run_inject if args.what == "inject" else run_ask)(args, Path(tmp))


if __name__ == "__main__":
    main()
