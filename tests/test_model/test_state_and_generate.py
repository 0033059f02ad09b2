"""Memory-state serialization and decoding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import token_ids

import model as mp
from model.core.generate import pick_token
from model.memory.state import close_gaps
from model.text.tokenizer import chat_ids


def test_state_round_trips_bit_exactly(tiny, state, tmp_path):
    tiny.inject(state, token_ids(30))
    state.save(tmp_path / "s")
    loaded = mp.MemoryState.load(tmp_path / "s")
    assert torch.equal(loaded.memory, state.memory) and loaded.memory.dtype == state.memory.dtype
    assert torch.equal(loaded.generator.get_state(), state.generator.get_state())
    assert (loaded.initialized, loaded.injections, loaded.tokens_injected) == (True, 1, 30)
    # the reloaded state continues exactly like the original: same draws, same rows
    ids = token_ids(25, seed=9)
    a, b = tiny.inject(state, ids), tiny.inject(loaded, ids)
    assert torch.equal(a.perms, b.perms) and torch.equal(state.memory, loaded.memory)


@pytest.mark.parametrize("drop", [[0, 1, 7], [3, 11], [5], [10, 11], list(range(12))])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_closing_the_gaps_keeps_the_survivors_in_order_at_the_front(drop, layout):
    rows = torch.arange(12 * 3, dtype=torch.bfloat16).view(12, 3)
    if layout == "strided":  # every other column of a wider block: the gather path
        rows = torch.zeros(12, 6, dtype=torch.bfloat16)[:, ::2].copy_(rows)
    survivors = [i for i in range(12) if i not in drop]
    expected, tail = rows[survivors].clone(), rows[12 - len(drop) :].clone()
    close_gaps(rows, torch.tensor(drop))
    assert torch.equal(rows[: len(survivors)], expected)
    if layout == "contiguous":  # the memmove path leaves the last k rows as they were
        assert torch.equal(rows[len(survivors) :], tail)


def test_state_refuses_unknown_format(state, tmp_path):
    state.save(tmp_path)
    meta = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps(meta | {"format": 99}))
    with pytest.raises(ValueError, match="format"):
        mp.MemoryState.load(tmp_path)


def test_clone_is_independent(tiny, state):
    copy = state.clone()
    tiny.inject(state, token_ids(20))
    assert not torch.equal(copy.memory, state.memory)
    assert copy.injections == 0


def full_forward_greedy(model, state, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by re-running the whole forward (no KV cache) after each token."""
    ids = prompt.clone()
    out = []
    for _ in range(steps):
        token = int(model(ids[None], state).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([token])])
    return out


def test_cached_greedy_equals_full_forward_reruns(tiny, state):
    tiny.inject(state, token_ids(40))
    prompt = token_ids(7, seed=3)
    gen = mp.generate(tiny, state, prompt, mp.DecodeSettings(max_new_tokens=8), keep_logits=True)
    assert gen.token_ids == full_forward_greedy(tiny, state, prompt, 8)
    assert gen.finish_reason == "length" and len(gen.step_logits) == 8
    torch.testing.assert_close(gen.step_logits[0], tiny(prompt[None], state).logits[0, -1])


def test_generation_leaves_the_state_untouched(tiny, state):
    before = state.clone()
    mp.generate(tiny, state, token_ids(5), mp.DecodeSettings(max_new_tokens=4, sample=True, seed=1))
    assert torch.equal(state.memory, before.memory)
    assert torch.equal(state.generator.get_state(), before.generator.get_state())


def test_stop_tokens_end_generation_and_callback_streams(tiny, state):
    prompt = token_ids(5)
    greedy = mp.generate(tiny, state, prompt, mp.DecodeSettings(max_new_tokens=6)).token_ids
    streamed: list[int] = []
    stopped = mp.generate(
        tiny, state, prompt, mp.DecodeSettings(max_new_tokens=6, stop_token_ids=(greedy[2],)), on_token=streamed.append
    )
    first_stop = greedy.index(greedy[2])
    assert stopped.token_ids == greedy[:first_stop] == streamed
    assert stopped.finish_reason == "stop"


def test_sampling_is_seeded():
    logits = torch.linspace(0, 1, 50)
    draw = lambda seed: [  # noqa: E731
        pick_token(logits, mp.DecodeSettings(sample=True, temperature=5.0, seed=seed), g)
        for g in [torch.Generator().manual_seed(seed)]
        for _ in range(20)
    ]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_p_and_top_k_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    top_k = {pick_token(logits, mp.DecodeSettings(sample=True, top_k=2), g) for _ in range(200)}
    assert top_k == {0, 1}
    # p(0) ~ 0.73, p(0)+p(1) ~ 0.99: a nucleus of 0.5 holds token 0 alone
    top_p = {pick_token(logits, mp.DecodeSettings(sample=True, top_p=0.5), g) for _ in range(200)}
    assert top_p == {0}


def test_decode_settings_are_validated():
    with pytest.raises(ValueError):
        mp.DecodeSettings(max_new_tokens=0)
    with pytest.raises(ValueError):
        mp.DecodeSettings(sample=True, temperature=0)
    with pytest.raises(ValueError):
        mp.DecodeSettings(top_p=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus"])
def test_memory_kv_cache_matches_recomputation_and_follows_injections(name):
    lm = mp.load(name)
    state, question = lm.new_state(seed=0), token_ids(7, seed=3)[None]
    fresh = lm(question, state, reuse_memory_kv=False).logits
    assert state.kv_cache is None  # the baseline path keeps nothing
    first = lm(question, state).logits
    cached = state.kv_cache
    assert cached is not None and len(cached.layers) == lm.cfg.num_layers
    assert torch.allclose(first, fresh, atol=1e-5)  # the cached path merges the adapter: equal up to rounding
    assert torch.equal(lm(question, state).logits, first) and state.kv_cache is cached  # reused, not rebuilt
    copy = state.clone()
    assert copy.kv_cache is None  # a copy never shares derived data
    version = state.version
    lm.inject(state, token_ids(40, seed=4))
    assert state.kv_cache is None and state.version == version + 1  # the memory changed: the cache is dropped
    after = lm(question, state).logits
    assert state.kv_cache.version == state.version
    assert not torch.allclose(after, first)
    assert torch.allclose(after, lm(question, state, reuse_memory_kv=False).logits, atol=1e-5)


def test_layer_caches_live_only_inside_caches_and_take_explicit_positions(tiny, state):
    """gpt-fast's cache: each attention layer owns one inside `caches()`; prefill at the prefix length P,
    then one token at a time at explicit positions gives the logits of one pass over the whole prompt."""
    prompt, P = token_ids(9, seed=5)[None], tiny.prefix_length(state)
    whole = tiny(prompt, state).logits  # [1, 9, V]
    with tiny.caches(1, P + 9):
        assert all(block.self_attn.kv_cache.max_len == P + 9 for block in tiny.model.layers)
        steps = [tiny(prompt[:, :5], state, torch.arange(P, P + 5)).logits]
        steps += [tiny(prompt[:, i : i + 1], state, torch.tensor([P + i])).logits for i in range(5, 9)]
        with pytest.raises(RuntimeError, match="KV cache full"):
            tiny(prompt[:, :1], state, torch.tensor([P + 9]))
    assert all(block.self_attn.kv_cache is None for block in tiny.model.layers)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus"])
def test_a_longer_question_grows_the_cached_memory_buffers_without_changing_answers(name):
    lm = mp.load(name)
    state, prompt = lm.new_state(seed=0), token_ids(6, seed=2).tolist()
    short = mp.generate(lm, state, prompt, mp.DecodeSettings(max_new_tokens=4))
    room = state.kv_cache.layers[0][0].shape[2]
    long_settings = mp.DecodeSettings(max_new_tokens=room)  # more than the buffers hold
    long = mp.generate(lm, state, prompt, long_settings)
    assert state.kv_cache.layers[0][0].shape[2] > room
    assert long.token_ids[:4] == short.token_ids
    assert long.token_ids == mp.generate(lm, state, prompt, long_settings, reuse_memory_kv=False).token_ids


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus"])
def test_a_batch_reads_the_memory_like_single_questions(name):
    lm = mp.load(name)
    state, batch = lm.new_state(seed=0), torch.stack([token_ids(5, seed=7), token_ids(5, seed=8)])
    if name == "tiny":
        together = lm(batch, state).logits  # [2, 5, V]
        torch.testing.assert_close(together[1:], lm(batch[1:], state).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(together[:1], lm(batch[:1], state).logits, atol=1e-5, rtol=0)
    else:  # the authors' M+ retrieves for batch element 0 only: refused instead of silently wrong
        with pytest.raises(ValueError, match="one question at a time"):
            lm(batch, state)
    last = lm(batch[:1], state, last_only=True).logits
    assert last.shape == (1, 1, lm.cfg.vocab_size)
    torch.testing.assert_close(last, lm(batch[:1], state).logits[:, -1:], atol=1e-5, rtol=0)


def test_memory_kv_cache_is_not_used_by_another_model(state):
    """Keys cached by one model are recomputed when a different model reads the same state."""
    other = mp.load("tiny")
    other.model.layers[0].self_attn.k_proj.weight.data.mul_(2.0)
    tiny = mp.load("tiny")
    question = token_ids(5)[None]
    tiny(question, state)
    expected = other(question, state, reuse_memory_kv=False).logits
    assert torch.allclose(other(question, state).logits, expected, atol=1e-5)


def test_chat_ids_leave_out_a_bos_the_template_inserts_and_keep_a_bos_used_as_turn_marker():
    tokenizer = mp.load("tiny").tokenizer
    tokenizer.bos_token = "<|eos|>"
    with pytest.raises(ValueError, match="no chat template"):
        chat_ids(tokenizer, "Hi?")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"  # Llama-3 style
    assert tokenizer.decode(chat_ids(tokenizer, "Hi?")) == "[Hi?]>"
    tokenizer.chat_template = "<|eos|>{% for m in messages %}[{{ m['content'] }}]<|eos|>{% endfor %}"  # SmolLM2 style
    assert tokenizer.decode(chat_ids(tokenizer, "Hi?")) == "<|eos|>[Hi?]<|eos|>"
