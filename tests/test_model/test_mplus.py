"""M+: long-term memory bookkeeping, retrieval, CPU placement, serialization and parity with the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, token_ids
from safetensors.torch import load_file, save_file

import model as mp
from model.memory.ltm import LongTermMemory
from model.policies.authors import order_oldest_first
from model.testing.parity import replay

MPLUS_SCENARIOS = ["mplus", "mplus_lora_llama3rope"]


@pytest.fixture
def tiny(tiny_mplus: mp.MPlus) -> mp.MPlus:
    return tiny_mplus


@pytest.fixture
def state(tiny: mp.MPlus) -> mp.MemoryState:
    return tiny.new_state(seed=0)


def inject_n(model: mp.MPlus, state: mp.MemoryState, count: int, seed: int = 0) -> list[mp.InjectResult]:
    return [model.inject(state, token_ids(10 + i, seed=seed + i)) for i in range(count)]


def cache_rows(ltm: LongTermMemory, rows: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
    """Put new rows [L, C, d] into the LTM's row space and its cache, with keys [L, C, s] and ages [L, C]."""
    L, C, d = rows.shape
    first = ltm.rows.end
    ltm.rows.add(first, rows.reshape(L * C, d))
    ltm.cache_dropped(first + torch.arange(L * C).view(L, C), keys, ages)


def hand_ltm(rf: list[float], cached: int, d: int = 4, s: int = 3) -> LongTermMemory:
    """A one-layer LTM with len(rf) rows (row i filled with i) and `cached` cached rows (100 + j)."""
    n = len(rf)
    rows = torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).clone()
    ltm = LongTermMemory.from_rows(
        [(rows, rows[:, :s].clone(), torch.tensor(rf, dtype=torch.float64), torch.arange(n))]
    )
    cache = 100 + torch.arange(cached, dtype=torch.float32)[None, :, None]  # [1, C, 1]
    cache_rows(ltm, cache.expand(1, cached, d), cache.expand(1, cached, s), torch.full((1, cached), 7))
    return ltm


# -- merge, decay, prune -------------------------------------------------------------------------
def test_merge_happens_exactly_on_every_update_ltm_frequency_th_injection(tiny, state):
    K, freq = tiny.cfg.num_tokens, tiny.cfg.update_ltm_frequency
    assert freq == 4
    sizes, caches, steps = [], [], []
    for i in range(8):
        tiny.inject(state, token_ids(10 + i, seed=i))
        sizes.append(state.ltm.sizes()[0])
        caches.append(state.ltm.cache_size)
        steps.append(state.ltm.update_step)
    n0 = tiny.cfg.ltm_initial_size
    assert caches == [K, 2 * K, 3 * K, 0, K, 2 * K, 3 * K, 0]
    assert steps == caches
    # merge 1 keeps the initial rows (rf 2 -> 1); merge 2 prunes them (rf 1 -> 0)
    assert sizes == [n0] * 3 + [n0 + 4 * K] * 4 + [8 * K]


def test_merged_rows_are_the_old_ltm_then_the_cache_then_the_last_drop(tiny, state):
    inject_n(tiny, state, 3)
    before = state.ltm.clone()
    last = tiny.inject(state, token_ids(12, seed=99))  # the 4th injection merges
    for layer, part in enumerate(state.ltm.layers):
        expected_rows = torch.cat([before.layers[layer].rows, before.cached_rows[layer], last.dropped[layer]])
        assert torch.equal(part.rows, expected_rows)
        expected_keys = torch.cat([before.layers[layer].keys, before.cached_keys[layer]])
        assert torch.equal(part.keys[: len(expected_keys)], expected_keys)
        new = 4 * tiny.cfg.num_tokens
        rf = torch.cat([before.layers[layer].recall_frequencies - 1, torch.full((new,), 9.0, dtype=torch.float64)])
        assert torch.equal(part.recall_frequencies, rf)


def test_decay_prunes_rows_at_or_below_the_threshold_when_more_than_t_survive():
    ltm = hand_ltm([0.5, 1.0, 3.0], cached=2)
    ltm.update_step = 16
    ltm.merge(initial_rf=10.0, decay=1.0, min_survivors=2)  # rf -> [-0.5, 0, 2, 9, 9]: 3 survive > 2
    part = ltm.layers[0]
    assert part.recall_frequencies.tolist() == [2.0, 9.0, 9.0]
    assert part.rows[:, 0].tolist() == [2.0, 100.0, 101.0]
    assert part.keys[:, 0].tolist() == [2.0, 100.0, 101.0]
    assert part.ages.tolist() == [2, 7, 7]
    assert ltm.cache_size == 0 and ltm.update_step == 0


def test_no_pruning_and_no_decay_when_t_or_fewer_would_survive():
    ltm = hand_ltm([0.5, 1.0, 3.0], cached=2)
    ltm.merge(initial_rf=10.0, decay=1.0, min_survivors=3)  # 3 survive, not more than 3
    part = ltm.layers[0]
    assert part.recall_frequencies.tolist() == [0.5, 1.0, 3.0, 10.0, 10.0]
    assert part.rows[:, 0].tolist() == [0.0, 1.0, 2.0, 100.0, 101.0]
    assert ltm.cache_size == 0


# -- ages ------------------------------------------------------------------------------------------
def test_ages_bookkeeping(tiny, state):
    K, N = tiny.cfg.num_tokens, tiny.cfg.memory_rows
    stm_before, ltm_ages_before = state.memory.clone(), [p.ages.clone() for p in state.ltm.layers]
    first = tiny.inject(state, token_ids(20))
    newest = torch.tensor(list(range(K - 1, -1, -1)))
    for layer in range(tiny.cfg.num_layers):
        perm = first.perms[layer]
        dropped = perm[N - K :].sort().values
        assert state.memory_ages[layer].tolist() == [0] * (N - K) + newest.tolist()  # loaded rows have age 0
        assert torch.equal(state.ltm.layers[layer].ages, ltm_ages_before[layer] + K)
        assert torch.equal(state.ltm.cached_rows[layer], stm_before[layer, dropped])
        assert state.ltm.cached_ages[layer].tolist() == [0] * K  # not increased in their own injection
    ages_after_first = state.memory_ages.clone()
    second = tiny.inject(state, token_ids(20, seed=1))
    for layer in range(tiny.cfg.num_layers):
        dropped = second.perms[layer][N - K :].sort().values
        assert state.ltm.cached_ages[layer, :K].tolist() == [K] * K  # aged once more
        assert torch.equal(state.ltm.cached_ages[layer, K:], ages_after_first[layer, dropped])
        assert torch.equal(state.ltm.layers[layer].ages, ltm_ages_before[layer] + 2 * K)


def test_a_state_without_its_m_plus_parts_is_refused_before_anything_changes(tiny, state):
    state.ltm = None  # a MemoryLLM state
    memory, ids, next_id = state.memory.clone(), state.memory_ids.clone(), state.next_row_id
    delta = torch.ones(tiny.cfg.num_layers, tiny.cfg.num_tokens, tiny.cfg.hidden_size)
    with pytest.raises(ValueError, match="needs an M\\+ memory state"):
        tiny.update_memory(state, delta)
    assert torch.equal(state.memory, memory) and torch.equal(state.memory_ids, ids)
    assert state.next_row_id == next_id


def test_cached_keys_are_key_proj_of_input_layernorm(tiny, state):
    result = tiny.inject(state, token_ids(15))
    for layer, block in enumerate(tiny.model.layers):
        expected = block.self_attn.key_proj[2](
            torch.nn.functional.silu(block.self_attn.key_proj[0](block.input_layernorm(result.dropped[layer])))
        )
        torch.testing.assert_close(state.ltm.cached_keys[layer], expected, rtol=0, atol=1e-6)


# -- retrieval -------------------------------------------------------------------------------------
def test_retrieval_picks_the_highest_scoring_candidates_oldest_first(tiny, state):
    T, d = tiny.retrieved_rows, tiny.cfg.hidden_size
    layer, n, C = 1, 40, 8
    h = torch.randn(1, d, generator=torch.Generator().manual_seed(3))  # one question token
    q = tiny.retrieval.queries(tiny, layer, h)[0]
    u = q / q.norm()  # score of a key alpha * u is sigmoid(alpha * |q|): increasing in alpha
    g = torch.Generator().manual_seed(4)
    alpha = torch.randperm(n + C, generator=g).float() / 10  # distinct, shuffled over LTM and cache
    keys = alpha[:, None] * u  # [n + C, s]
    ages = torch.randperm(n + C, generator=g)  # distinct ages
    rows = torch.randn(n + C, d, generator=g)
    ltm = LongTermMemory.from_rows([(rows[:n], keys[:n], torch.ones(n, dtype=torch.float64), ages[:n])] * 2)
    cache_rows(ltm, rows[None, n:].expand(2, C, d), keys[None, n:].expand(2, C, -1), ages[None, n:].expand(2, C))
    state.ltm = ltm

    r = tiny.retrieve(layer, state, h)
    best = alpha.argsort(descending=True)[:T]
    assert set(r.indices.tolist()) == set(best.tolist())
    assert any(i >= n for i in r.indices.tolist())  # cached rows compete too
    assert r.scores.shape == (n + C,)
    assert torch.equal(ages[r.indices], ages[r.indices].sort(descending=True).values)  # oldest first
    assert torch.equal(r.rows, rows[r.indices])


def test_scores_are_the_mean_sigmoid_over_the_question_tokens_in_every_layer(tiny, state):
    """Layers of different sizes, read in turn, share the scoring scratch: each gets its own keys' scores."""
    d, s, g = tiny.cfg.hidden_size, tiny.cfg.selector_hidden_dim, torch.Generator().manual_seed(5)
    sizes = [3 * tiny.retrieved_rows, tiny.retrieved_rows + 1]
    layers = [(torch.randn(n, d, generator=g), torch.randn(n, s, generator=g)) for n in sizes]
    state.ltm = LongTermMemory.from_rows(
        [(r, k, torch.ones(len(r), dtype=torch.float64), torch.arange(len(r))) for r, k in layers]
    )
    h = torch.randn(3, d, generator=g)  # three question tokens
    for layer in (1, 0, 1):
        q = tiny.retrieval.queries(tiny, layer, h)  # [3, s]
        expected = (q @ layers[layer][1].T).sigmoid().mean(0)  # [n]
        assert torch.equal(tiny.retrieve(layer, state, h).scores, expected)


def test_equal_ages_put_the_later_candidate_first():
    assert order_oldest_first(torch.tensor([5, 7, 5, 7])).tolist() == [3, 1, 2, 0]
    assert order_oldest_first(torch.tensor([0, 0, 0])).tolist() == [2, 1, 0]


def test_tiled_path_repeats_a_small_ltm_and_ignores_the_cache(tiny, state):
    T = tiny.retrieved_rows
    assert T == 32
    inject_n(tiny, state, 1)  # a non-empty cache
    assert state.ltm.cache_size > 0
    ltm = state.ltm
    layers = ltm.layer_tuples()
    rows, keys, rf, _ = (x[:5] for x in layers[0])
    layers[0] = (rows, keys, rf, torch.tensor([40, 30, 20, 10, 0]))
    state.ltm = LongTermMemory.from_rows(layers, (ltm.cached_rows, ltm.cached_keys, ltm.cached_ages), ltm.update_step)
    small = state.ltm.layers[0]
    r = tiny.retrieve(0, state, torch.randn(3, tiny.cfg.hidden_size))
    assert r.scores is None
    # [0..4] repeated 7 times, last 32 kept: rows 0-2 six times, rows 3-4 seven times; oldest (row 0) first
    assert r.indices.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 7 + [4] * 7
    assert torch.equal(r.rows, small.rows[r.indices])
    logits = tiny(token_ids(4)[None], state).logits
    assert logits.shape == (1, 4, tiny.cfg.vocab_size) and torch.isfinite(logits).all()


def test_retrieval_happens_once_per_layer_at_the_prefill(tiny, state):
    inject_n(tiny, state, 2)
    question = token_ids(5, seed=7)
    with tiny.recording_retrievals() as forward_log:
        logits = tiny(question[None], state).logits
    with tiny.recording_retrievals() as generate_log:
        gen = mp.generate(tiny, state, question, mp.DecodeSettings(max_new_tokens=4), keep_logits=True)
    assert [layer for layer, _ in generate_log] == list(range(tiny.cfg.num_layers))
    for (_, a), (_, b) in zip(forward_log, generate_log, strict=True):
        assert torch.equal(a.rows, b.rows)
    torch.testing.assert_close(gen.step_logits[0], logits[0, -1])
    assert tiny.prefix_length(state) == 1 + tiny.retrieved_rows + tiny.cfg.memory_rows


def test_retrieval_changes_the_answer(tiny, state):
    question = token_ids(6, seed=5)
    before = tiny(question[None], state).logits
    state.ltm = LongTermMemory.from_rows([(-rows, keys, rf, ages) for rows, keys, rf, ages in state.ltm.layer_tuples()])
    assert not torch.allclose(before, tiny(question[None], state).logits)


# -- placement and serialization -------------------------------------------------------------------
def ltm_tensors(state: mp.MemoryState) -> list[torch.Tensor]:
    ltm = state.ltm
    per_layer = [t for p in ltm.layers for t in (p.rows, p.keys, p.recall_frequencies, p.ages)]
    return per_layer + [ltm.cached_rows, ltm.cached_keys, ltm.cached_ages, state.memory_ages]


def test_ltm_stays_on_the_cpu_apart_from_the_parameters(tiny, state):
    inject_n(tiny, state, 5)  # one merge and a pending cache
    params = {p.untyped_storage().data_ptr() for p in tiny.parameters()}
    for t in ltm_tensors(state):
        assert t.device.type == "cpu"
        assert t.untyped_storage().data_ptr() not in params


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ltm_stays_on_the_cpu_with_the_model_on_cuda():
    model = mp.load("tiny-mplus", device="cuda", dtype=torch.float32)
    state = model.new_state()
    inject_n(model, state, 5)
    assert state.memory.is_cuda
    assert all(t.device.type == "cpu" for t in ltm_tensors(state))
    with model.recording_retrievals() as log:
        logits = model(token_ids(4)[None], state).logits
    assert logits.is_cuda and all(r.rows.is_cuda for _, r in log)  # scored on the device, chosen rows moved there


def test_state_round_trips_bit_exactly(tiny, state, tmp_path):
    inject_n(tiny, state, 6)  # after a merge, with a pending cache
    assert state.ltm.cache_size > 0 and state.ltm.update_step > 0
    state.save(tmp_path / "s")
    loaded = mp.MemoryState.load(tmp_path / "s")
    ours, theirs = state.to_tensors(), loaded.to_tensors()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert loaded.to_meta() == state.to_meta() and loaded.ltm.update_step == state.ltm.update_step
    # both continue identically, through the next merge
    for i in range(3):
        a, b = tiny.inject(state, token_ids(9, seed=50 + i)), tiny.inject(loaded, token_ids(9, seed=50 + i))
        assert torch.equal(a.perms, b.perms)
    assert all(torch.equal(x, y) for x, y in zip(ltm_tensors(state), ltm_tensors(loaded), strict=True))


def test_clone_is_independent(tiny, state):
    copy = state.clone()
    inject_n(tiny, state, 4)
    assert copy.ltm.sizes() != state.ltm.sizes() and copy.ltm.cache_size == 0
    assert not torch.equal(copy.memory_ages, state.memory_ages)


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.fixture
def saved_tiny_mplus(tiny, tmp_path):
    state = tiny.new_state()
    inject_n(tiny, state, 4)  # merged: non-zero ages, rf 1 and 9, empty cache
    state.ltm.layers[1] = state.ltm.layers[1].select(torch.arange(len(state.ltm.layers[1])) % 3 != 0)
    return state, mp.save_checkpoint(tiny, state, tmp_path / "ckpt")


def test_checkpoint_round_trip(tiny, saved_tiny_mplus):
    state, directory = saved_tiny_mplus
    raw = load_file(directory / "model.safetensors")
    assert "initialized" not in raw and raw["ltm_ages.0"].dtype == torch.float32
    assert "model.layers.1.self_attn.encoder_query_proj.2.weight" in raw
    loaded = mp.load(directory)
    assert isinstance(loaded, mp.MPlus)
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    fresh = loaded.new_state()
    assert torch.equal(fresh.memory, state.memory)
    assert fresh.ltm.sizes() == state.ltm.sizes() and len(set(state.ltm.sizes())) == 2
    for a, b in zip(fresh.ltm.layers, state.ltm.layers, strict=True):
        for name in ("rows", "keys", "recall_frequencies", "ages"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert fresh.ltm.cache_size == state.ltm.cache_size and torch.equal(fresh.memory_ages, state.memory_ages)  # carried
    question = token_ids(6)[None]
    assert torch.equal(loaded(question, fresh).logits, tiny(question, state).logits)


def rewrite(directory, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_ltm_keys_are_named(saved_tiny_mplus):
    _, directory = saved_tiny_mplus
    rewrite(directory, lambda t: t.pop("ltm_keys.0"))
    with pytest.raises(mp.CheckpointError, match="missing keys: ltm_keys.0"):
        mp.load(directory)


def test_ltm_tensors_of_a_layer_must_agree_on_rows(saved_tiny_mplus):
    _, directory = saved_tiny_mplus
    rewrite(directory, lambda t: t.update({"ltm_ages.1": t["ltm_ages.1"][:-1].clone()}))
    with pytest.raises(mp.CheckpointError, match="ltm_ages.1"):
        mp.load(directory)


def test_an_initialized_key_is_ignored(saved_tiny_mplus):
    _, directory = saved_tiny_mplus
    rewrite(directory, lambda t: t.update(initialized=torch.tensor(1, dtype=torch.uint8)))
    assert isinstance(mp.load(directory), mp.MPlus)


def test_fixture_checkpoint_truncates_ages_and_keeps_frequencies():
    directory = FIXTURES / "mplus_lora_llama3rope" / "model"
    raw = load_file(directory / "model.safetensors")
    ltm = mp.load(directory, tokenizer=False).initial_state.ltm
    assert ltm.layers[2].ages.dtype == torch.int64
    assert torch.equal(ltm.layers[2].ages, raw["ltm_ages.2"].trunc().long())
    assert torch.equal(ltm.layers[2].recall_frequencies, raw["ltm_recall_frequencies.2"].double())


# -- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", MPLUS_SCENARIOS)
def test_mplus_scenarios_match_the_reference(scenario):
    report = replay(FIXTURES / scenario)
    assert report.ok, [row for row in report.rows if not row[3]]
    compared = {row[0] for row in report.rows}
    assert {"inj4.ltm_ages.2", "fwd_after_inj1.retrieval_scores.0", "generate.retrieved_ltm.2"} <= compared


def test_merge_decays_and_prunes_without_touching_the_callers_tensors():
    rf = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    rows = torch.arange(3, dtype=torch.float32)[:, None].expand(3, 4).clone()
    ltm = LongTermMemory.from_rows([(rows, rows[:, :2].clone(), rf, torch.zeros(3, dtype=torch.int64))])
    cache_rows(ltm, torch.full((1, 2, 4), 9.0), torch.full((1, 2, 2), 9.0), torch.tensor([[4, 5]]))
    ltm.age(3)
    ltm.merge(initial_rf=10.0, decay=1.0, min_survivors=1)  # the two oldest rows (rf 0.5, 1.0) are pruned
    part = ltm.layers[0]
    assert part.rows[:, 0].tolist() == [2.0, 9.0, 9.0]
    assert part.recall_frequencies.tolist() == [2.0, 9.0, 9.0]
    assert part.ages.tolist() == [3, 7, 8]
    assert rf.tolist() == [0.5, 1.0, 3.0]  # the tensors given to LayerLTM are not modified
    ltm.age(2)
    assert part.ages.tolist() == [5, 9, 10]
