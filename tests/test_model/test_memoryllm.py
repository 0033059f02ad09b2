"""Invariants of injection and the memory update on the tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import token_ids

import model as mp
from model.core.layers import DECODER, ENCODER, Linear
from model.memory.state import split_permutation


def test_pool_size_constant_over_many_injections(tiny, state):
    N, d = tiny.cfg.memory_rows, tiny.cfg.hidden_size
    for i, n in enumerate([40, 16, 3, 100, 17]):
        tiny.inject(state, token_ids(n, seed=i))
        assert state.memory.shape == (tiny.cfg.num_layers, N, d)
    assert state.injections == 5 and state.tokens_injected == 176


@pytest.mark.parametrize("n", [3, 16, 50])
def test_newest_block_is_the_delta_and_survivors_keep_order(tiny, state, n):
    K, N = tiny.cfg.num_tokens, tiny.cfg.memory_rows
    before = state.memory.clone()
    result = tiny.inject(state, token_ids(n))
    assert result.delta.shape == (tiny.cfg.num_layers, K, tiny.cfg.hidden_size)
    assert torch.equal(state.memory[:, -K:], result.delta)
    for layer in range(tiny.cfg.num_layers):
        kept = result.perms[layer][: N - K].sort().values
        assert torch.equal(state.memory[layer, : N - K], before[layer, kept])
        assert torch.equal(result.dropped[layer], before[layer, result.perms[layer][N - K :].sort().values])


@pytest.mark.parametrize("initialized", [True, False])
def test_sources_describe_the_update(tiny, state, initialized):
    """result.sources rebuilds the new memory from [old rows, delta] (what the session store replays)."""
    state.initialized = initialized
    before = state.memory.clone()
    result = tiny.inject(state, token_ids(21))
    for layer in range(tiny.cfg.num_layers):
        pool = torch.cat([before[layer], result.delta[layer]])  # [N + k, d]
        assert torch.equal(state.memory[layer], pool[result.sources[layer]])


@pytest.mark.parametrize("n", [3, 16, 37])
def test_delta_matches_the_authors_procedure(tiny, state, n):
    """The write computes only the K delta rows at the last layer and caches nothing; the authors' way
    (every layer computes all max(n, K) query rows into a KV cache, then the logits) gives the same rows.
    n < K re-encodes the last K - n memory rows with the context; n >= K keeps the last K context rows."""
    ids = token_ids(n, seed=n)
    expected = tiny.compute_delta(ids, state, like_authors=True)
    delta = tiny.compute_delta(ids, state)
    assert delta.shape == (tiny.cfg.num_layers, tiny.cfg.num_tokens, tiny.cfg.hidden_size)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    assert all(block.self_attn.kv_cache is None for block in tiny.model.layers)  # the authors' cache is gone


def test_short_context_reencodes_memory_rows(tiny, state):
    K = tiny.cfg.num_tokens
    delta = tiny.compute_delta(token_ids(3), state)
    assert delta.shape[1] == K  # K rows even though only 3 tokens came in
    # the first K - 3 rows are new encodings of old memory rows, not copies of them
    assert not torch.allclose(delta[:, : K - 3], state.memory[:, -K + 3 :])


def test_per_layer_drop_uses_one_permutation_per_layer(tiny, state):
    result = tiny.inject(state, token_ids(20))
    assert result.perms.shape == (tiny.cfg.num_layers, tiny.cfg.memory_rows)
    assert not torch.equal(result.perms[0], result.perms[1])


def test_shared_drop_uses_one_permutation_for_all_layers():
    cfg = dataclasses.replace(mp.load("tiny").cfg, drop_memory_per_layer=False)
    model = mp.build_model(cfg)
    base = mp.load("tiny")
    model.load_state_dict(base.state_dict())
    model.initial_state = base.initial_state
    state = model.new_state(seed=3)
    before = state.memory.clone()
    K, N = cfg.num_tokens, cfg.memory_rows
    result = model.inject(state, token_ids(20))
    assert result.perms.shape == (1, N)
    kept, _ = split_permutation(result.perms[0], K)
    for layer in range(cfg.num_layers):
        assert torch.equal(state.memory[layer, : N - K], before[layer, kept])


def test_given_permutations_are_used_and_seeded_draws_are_reproducible(tiny):
    a, b = tiny.new_state(seed=11), tiny.new_state(seed=11)
    ids = token_ids(30)
    drawn = tiny.inject(a, ids).perms
    tiny.inject(b, ids, perms=drawn.clone())
    assert torch.equal(a.memory, b.memory)
    c = tiny.new_state(seed=12)
    assert not torch.equal(tiny.inject(c, ids).perms, drawn)
    with pytest.raises(ValueError, match="perms must have shape"):
        tiny.inject(tiny.new_state(), ids, perms=drawn[:1])


def test_first_injection_into_uninitialized_memory_tiles_the_delta(tiny):
    state = tiny.new_state(seed=0)
    state.initialized = False
    rng_before = state.generator.get_state()
    result = tiny.inject(state, token_ids(5))
    k, N = result.delta.shape[1], tiny.cfg.memory_rows
    assert k == 5  # no memory prefix: the delta is the last min(n, K) context rows
    reps, rest = divmod(N, k)
    for i in range(reps):
        assert torch.equal(state.memory[:, i * k : (i + 1) * k], result.delta)
    assert torch.equal(state.memory[:, reps * k :], result.delta[:, k - rest :])
    assert state.initialized and result.perms.numel() == 0
    assert torch.equal(state.generator.get_state(), rng_before)  # no random draw was spent


def test_uninitialized_forward_reads_no_prefix(tiny):
    state = tiny.new_state()
    state.initialized = False
    ids = token_ids(6)[None]
    logits_a = tiny(ids, state).logits
    state.memory.normal_()  # memory contents must not matter before initialization
    assert torch.equal(tiny(ids, state).logits, logits_a)
    assert tiny.prefix_length(state) == 0


def test_forward_reads_the_memory(tiny, state):
    ids = token_ids(6)[None]
    before = tiny(ids, state).logits
    tiny.inject(state, token_ids(40, seed=5))
    assert not torch.allclose(tiny(ids, state).logits, before)


def record_adapters(monkeypatch) -> list[str | None]:
    seen: list[str | None] = []
    original = Linear.forward

    def spy(self, x, adapter=None):
        if self.lora_A:
            seen.append(adapter)
        return original(self, x, adapter)

    monkeypatch.setattr(Linear, "forward", spy)
    return seen


def test_encoder_adapter_for_injection_decoder_adapter_for_questions(tiny, state, monkeypatch):
    seen = record_adapters(monkeypatch)
    tiny.inject(state, token_ids(20))
    assert seen and set(seen) == {ENCODER}
    seen.clear()
    mp.generate(tiny, state, token_ids(5), mp.DecodeSettings(max_new_tokens=3))
    assert seen and set(seen) == {DECODER}


def test_each_adapter_changes_only_its_own_pass():
    model, state = mp.load("tiny"), None
    state = model.new_state()
    ids, question = token_ids(20), token_ids(6)[None]
    delta, logits = model.compute_delta(ids, state), model(question, state).logits
    for layer in model.model.layers:
        layer.self_attn.q_proj.lora_B[DECODER].data.mul_(3.0)
    assert torch.equal(model.compute_delta(ids, state), delta)
    assert not torch.allclose(model(question, state).logits, logits)
    logits = model(question, state).logits
    for layer in model.model.layers:
        layer.self_attn.q_proj.lora_B[ENCODER].data.mul_(3.0)
    assert not torch.allclose(model.compute_delta(ids, state), delta)
    assert torch.equal(model(question, state).logits, logits)


def test_injection_rejects_bad_ids(tiny, state):
    with pytest.raises(ValueError):
        tiny.inject(state, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError):
        tiny.inject(state, token_ids(8)[None])
