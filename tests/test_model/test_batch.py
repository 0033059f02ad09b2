"""Batched samples: independent memories read and written in one batch give what each gives alone."""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids

import model as mp
from model.core.generate import BatchLayout, generate_batch

MODELS = ["tiny", "tiny-mplus", "tiny-free", "tiny-free-mplus"]


def grown_states(lm: mp.MemoryLLM, count: int) -> list[mp.MemoryState]:
    """`count` states that differ in what they hold (and, for the training-free models, in size)."""
    states = []
    for i in range(count):
        state = lm.new_state(seed=i)
        for j in range(2 + 3 * i):
            lm.inject(state, token_ids(30 + 7 * j, seed=100 * i + j))
        states.append(state)
    return states


@pytest.mark.parametrize("name", MODELS)
def test_a_batch_of_questions_answers_as_each_alone(name):
    lm = mp.load(name)
    states = grown_states(lm, 3)
    prompts = [token_ids(4 + 5 * i, seed=i).tolist() for i in range(3)]
    settings = mp.DecodeSettings(max_new_tokens=6)
    alone = [mp.generate(lm, s, p, settings, keep_logits=True) for s, p in zip(states, prompts, strict=True)]
    together = generate_batch(lm, states, prompts, settings)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    if "free" in name:  # states of different sizes: the prefixes differ in length (M+: until window and T are full)
        assert len({lm.prefix_length(s) for s in states}) >= 2


def test_first_step_logits_match_and_elements_stop_on_their_own():
    lm = mp.load("tiny-mplus")
    states = grown_states(lm, 2)
    prompts = [token_ids(6, seed=1).tolist(), token_ids(11, seed=2).tolist()]
    first = [
        mp.generate(lm, s, p, mp.DecodeSettings(max_new_tokens=3), keep_logits=True)
        for s, p in zip(states, prompts, strict=True)
    ]
    stop = first[0].token_ids[1]  # element 0 stops at its second token; element 1 runs on unless it meets it
    settings = mp.DecodeSettings(max_new_tokens=3, stop_token_ids=(stop,))
    together = generate_batch(lm, states, prompts, settings)
    alone = [mp.generate(lm, s, p, settings) for s, p in zip(states, prompts, strict=True)]
    assert together[0].finish_reason == "stop" and together[0].token_ids == first[0].token_ids[:1]
    assert [(g.token_ids, g.finish_reason) for g in together] == [(g.token_ids, g.finish_reason) for g in alone]


def test_the_layout_masks_pads_and_the_other_prefix_slots():
    layout = BatchLayout(prefix=torch.tensor([3, 1]), prompt=torch.tensor([1, 2]))
    slots = layout.slots()  # the prompts end at slot 3 + 2
    assert slots.tolist() == [3, 4] and layout.pads == [1, 0]
    mask = layout.mask(slots)[:, 0]  # [B, 2, 5]
    # element 0: prefix slots 0-2, its pad at slot 3 (never a visible key), its token at 4
    assert mask[0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    # element 1: prefix slot 2 only, tokens at 3 and 4
    assert mask[1].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    positions = layout.positions()  # each real token right after its own prefix; pads anywhere (masked)
    assert positions[0, 1] == 3 and positions[1].tolist() == [1, 2] and layout.positions(0).tolist() == [[4], [3]]


@pytest.mark.parametrize("name", MODELS)
def test_a_batch_of_injections_writes_what_each_writes_alone(name):
    lm = mp.load(name)
    alone, together = grown_states(lm, 3), grown_states(lm, 3)
    chunks = torch.stack([token_ids(40, seed=50 + i) for i in range(3)])  # [3, 40]
    expected = [lm.inject(state, chunk) for state, chunk in zip(alone, chunks, strict=True)]
    results = lm.inject_batch(together, chunks)
    for want, got, a, b in zip(expected, results, alone, together, strict=True):
        torch.testing.assert_close(got.delta, want.delta, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.row_ids, want.row_ids) and a.injections == b.injections
        torch.testing.assert_close(b.memory, a.memory, atol=1e-5, rtol=1e-5)
        assert a.tokens_injected == b.tokens_injected


def test_a_batch_needs_one_state_per_row_and_memories_alike():
    lm = mp.load("tiny")
    fresh, used = lm.new_state(seed=0), grown_states(lm, 1)[0]
    fresh.initialized = False
    with pytest.raises(ValueError, match="all initialized, or none"):
        lm.inject_batch([fresh, used], torch.stack([token_ids(20, seed=1), token_ids(20, seed=2)]))
    with pytest.raises(ValueError, match="one state per row"):
        lm.inject_batch([used], torch.stack([token_ids(20, seed=1), token_ids(20, seed=2)]))
    with pytest.raises(ValueError, match="one state per prompt"):
        generate_batch(lm, [used], [[1], [2]])
