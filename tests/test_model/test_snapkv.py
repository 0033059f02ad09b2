"""SnapKV as a memory system: the selection as published (window attention, pooled, per key head), keys moved
to the cache's positions exactly, the budget kept while text streams in, and its state saved."""

from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

import model as mp
from model.core.rope import apply_rope
from model.systems import SpecError, build_system, label
from model.systems.baselines import no_memory
from model.systems.snapkv import best_slots, cache_length, key_scores, moved, read_after
from model.text.tokenizer import encode
from mplus_cli.app import app

SETTINGS = mp.DecodeSettings(max_new_tokens=6)
TEXT = "The lamp room code is 4127. " * 3 + "Zebras graze by the river quietly. " * 20  # 784 byte tokens
QUESTION = "What is the lamp room code?"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return mp.load("tiny-free-mplus")


def told(lm, spec: str, chunk: int = 128):
    system = build_system(spec, lm)
    system.reset(0)
    for piece in torch.split(torch.tensor(encode(lm.tokenizer, TEXT)), chunk):
        system.inject(piece)
    return system


def test_the_label_names_every_parameter_and_bad_ones_are_spec_errors(lm):
    assert label(build_system("snapkv", lm)) == "snapkv:budget=2048,kernel=5,question=blind,window=32"  # half of 4096
    assert label(build_system("snapkv:budget=512,question=aware", lm)).endswith("question=aware,window=32")
    for spec, says in [
        ("snapkv:window=64,budget=64", "window must be smaller than the budget"),
        ("snapkv:kernel=4", "kernel must be odd"),
        ("snapkv:question=maybe", "question must be blind or aware"),
        ("snapkv:budget=4096", "budget must be below the model's window"),
    ]:
        with pytest.raises(SpecError, match=says):
            build_system(spec, lm)


def test_a_budget_that_holds_everything_answers_as_the_text_in_the_prompt(lm):
    """Nothing dropped, nothing moved: both modes read what truncate puts in the prompt, token for token."""
    question = encode(lm.tokenizer, QUESTION)
    expected = told(lm, "truncate").ask(question, SETTINGS)
    for spec in ("snapkv", "snapkv:question=aware"):
        answer = told(lm, spec).ask(question, SETTINGS)
        assert answer.token_ids == expected.token_ids and answer.context_tokens == expected.context_tokens == 784


def test_key_scores_are_the_windows_causal_attention_summed_and_averaged_over_each_key_heads_queries():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)  # 4 query heads over 2 key heads, window 3 of 10
    scores = key_scores(q, k)
    expected = torch.zeros(2, 10)
    for head in range(4):
        for i in range(3):  # query i sits at position 7 + i and sees keys 0..7+i
            weights = torch.softmax(q[0, head, i] @ k[0, head // 2, : 8 + i].T / 8**0.5, dim=-1)
            expected[head // 2, : 8 + i] += weights / 2
    torch.testing.assert_close(scores, expected)


def test_best_slots_pool_neighbours_and_come_back_in_slot_order():
    scores = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 5.0]])
    assert best_slots(scores, 10, 2, kernel=1).tolist() == [[2, 9]]
    assert best_slots(scores, 8, 2, kernel=1).tolist() == [[2, 5]]  # slots past the candidates never chosen
    assert best_slots(scores, 10, 3, kernel=3).tolist() == [[1, 2, 3]]  # pooled: 9 lifts both neighbours
    assert best_slots(scores, 4, 6, kernel=3).tolist() == [[0, 1, 2, 3]]  # fewer candidates than room: all


def test_moved_keys_are_the_keys_the_model_computes_at_their_new_positions(lm):
    ids = torch.tensor(encode(lm.tokenizer, TEXT[:200]))
    kv, _ = read_after(lm, None, ids, window=4)
    slots = torch.tensor([[3, 50, 199], [0, 120, 180]])  # per key head, in order
    for layer in (0, lm.cfg.num_layers - 1):
        x = lm.layer_inputs(ids)[layer]  # [n, d]
        block = lm.model.layers[layer]
        k_plain, v_plain = block.self_attn.project_kv(block.input_layernorm(x[None]), lm.decoder_adapter())
        cos, sin = lm.cos_sin(torch.arange(3))
        for head in range(2):
            k, v = moved(lm, *kv[layer], slots)
            fresh = apply_rope(k_plain[:, head : head + 1, slots[head]], cos, sin)  # [1, 1, 3, D] at 0, 1, 2
            torch.testing.assert_close(k[:, head : head + 1], fresh, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, head : head + 1], v_plain[:, head : head + 1, slots[head]])


def test_the_blind_cache_keeps_the_budget_as_text_streams_and_is_saved_and_loaded(lm, tmp_path):
    system = told(lm, "snapkv:budget=64,window=8")
    assert cache_length(system.kept) == 64 and all(k.shape == (1, 2, 64, 16) for k, _ in system.kept)
    question = encode(lm.tokenizer, QUESTION)
    answer = system.ask(question, SETTINGS)
    assert answer.context_tokens == 64
    system.save(tmp_path)
    again = build_system("snapkv:budget=64,window=8", lm)
    again.load(tmp_path)
    assert again.ask(question, SETTINGS).token_ids == answer.token_ids
    # the window's entries are the last chunk's last 8 tokens, as read: the last keys of the cache
    last = torch.tensor(encode(lm.tokenizer, TEXT))[-16:]  # 784 = 6 x 128 + 16: the last chunk
    kv, _ = read_after(lm, None, last, window=8)
    torch.testing.assert_close(system.kept[0][1][:, :, -8:], kv[0][1][:, :, -8:], atol=1e-5, rtol=1e-5)


def test_the_aware_cache_depends_on_the_question_and_its_time_counts_the_reading(lm):
    system = told(lm, "snapkv:budget=64,window=8,question=aware")
    assert system.capabilities.question_aware_write and not build_system("snapkv", lm).capabilities.question_aware_write
    kept = {q: system.kept_for(encode(lm.tokenizer, q), SETTINGS) for q in (QUESTION, "Where do zebras graze?")}
    assert all(cache_length(kv) == 64 for kv in kept.values())
    first, second = (kv[0][1] for kv in kept.values())
    assert not torch.equal(first, second)  # another question, other entries kept
    answer = system.ask(encode(lm.tokenizer, QUESTION), SETTINGS)
    plain = mp.generate(lm, no_memory(lm), encode(lm.tokenizer, QUESTION), SETTINGS)
    assert answer.context_tokens == 64 and answer.seconds >= answer.first_token_s > 0
    assert len(answer.token_ids) == len(plain.token_ids) == 6


def test_bench_retention_sweeps_snapkv_beside_memory(tmp_path):
    args = ["bench", "retention", "--model", "tiny-free-mplus", "--max-distance", "512", "--limit", "1"]
    result = CliRunner().invoke(app, [*args, "--system", "snapkv:budget=128,window=8", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    controls = {row["control"] for row in csv.DictReader((tmp_path / "run" / "results.csv").open())}
    assert controls == {"memory", "snapkv:budget=128,kernel=5,question=blind,window=8"}
