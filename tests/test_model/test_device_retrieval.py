"""M+ retrieval scored on the model's device: the bank's key mirror (incremental, shared copy-on-write by clones,
never saved) and `Selectors.retrieve`'s device path, exercised on the CPU (`device_scoring = True`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import token_ids

import model as mp
from model.memory.ltm import EntryBank, LongTermMemory, as_slice
from model.memory.rows import FileArray, RowSpace
from model.memory.state import new_generator
from model.policies.authors import device_scores

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture
def tiny(tiny_mplus: mp.MPlus) -> mp.MPlus:
    return tiny_mplus


@pytest.fixture
def state(tiny: mp.MPlus) -> mp.MemoryState:
    """After one merge, with a cache pending: more than T LTM rows per layer, cached rows competing."""
    state = tiny.new_state(seed=0)
    for i in range(5):
        tiny.inject(state, token_ids(10 + i, seed=i))
    assert min(state.ltm.sizes()) > tiny.retrieved_rows and state.ltm.cache_size > 0
    return state


def all_keys(bank: EntryBank) -> torch.Tensor:
    return bank.keys(torch.arange(len(bank)))  # [E, s]


def counting_scans(monkeypatch) -> list[int]:
    """Rows every bank's scan_keys hands out from now on (what a mirror uploads)."""
    scanned, scan = [], EntryBank.scan_keys

    def counted(self, ids, *args):
        for positions, keys in scan(self, ids, *args):
            scanned.append(positions.numel())
            yield positions, keys

    monkeypatch.setattr(EntryBank, "scan_keys", counted)
    return scanned


# -- reading the bank -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([3, 4, 5], slice(3, 6)),
        ([7], slice(7, 8)),
        ([3, 5, 6], None),
        ([5, 4], None),
        ([3, 3, 4], None),
        ([3, 5, 4, 6], None),
        ([], None),
    ],
)
def test_as_slice_only_for_runs_of_consecutive_ids(ids, expected):
    assert as_slice(torch.tensor(ids)) == expected


def test_bank_reads_runs_shuffled_and_split_ids_alike():
    """Two RAM parts and a tail: runs (read as views), shuffled ids and ids across parts give the same keys, ages
    and scans as indexing all of them, and what a read returns is the caller's to change."""
    g, s = torch.Generator().manual_seed(3), 4
    keys, births = torch.randn(50, s, generator=g), torch.randperm(50, generator=g)
    parts = [(torch.arange(a, b), births[a:b], keys[a:b].clone()) for a, b in ((0, 20), (20, 40))]
    bank = EntryBank(RowSpace(4, F32), s, F32, parts)
    bank.add(torch.arange(40, 50), keys[40:], births[40:])
    for ids in (torch.arange(22, 38), torch.arange(41, 50), torch.randperm(20, generator=g), torch.arange(15, 45)):
        assert torch.equal(bank.keys(ids), keys[ids]) and torch.equal(bank.ages(ids), births[ids])
        scanned = torch.empty(ids.numel(), s)
        for positions, batch in bank.scan_keys(ids, batch=7):
            scanned[positions] = batch
        assert torch.equal(scanned, keys[ids])
    bank.keys(torch.arange(22, 38)).zero_()
    assert torch.equal(all_keys(bank), keys)


# -- retrieval on the device path --------------------------------------------------------------------
def test_device_path_picks_the_cpu_paths_rows(tiny, state, monkeypatch):
    question = token_ids(6, seed=7)
    h = torch.randn(6, tiny.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cpu = [tiny.retrieve(layer, state, h) for layer in range(tiny.cfg.num_layers)]
    cpu_logits = tiny(question[None], state).logits
    monkeypatch.setattr(tiny.retrieval, "device_scoring", True)
    device = [tiny.retrieve(layer, state, h) for layer in range(tiny.cfg.num_layers)]
    assert state.ltm.bank.mirror is not None  # the device path read the mirror
    for a, b in zip(cpu, device, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.row_ids, b.row_ids) and a.num_ltm == b.num_ltm
        assert torch.equal(a.rows, b.rows)
        assert b.scores.device == CPU and b.scores.dtype == F32 and b.scores.shape == a.scores.shape
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-6)  # float32 keys for a float32 model
    assert torch.equal(tiny(question[None], state).logits, cpu_logits)


def test_device_scores_batches_give_the_cpu_scores(tiny, state):
    layer, ltm = 1, state.ltm
    q = tiny.retrieval.queries(tiny, layer, torch.randn(3, tiny.cfg.hidden_size)).float()  # [3, s]
    entries = ltm.candidate_entries(layer)
    expected = torch.sigmoid(q @ ltm.bank.keys(entries).float().T).mean(0)
    keys = ltm.bank.device_keys(CPU, F32)
    for batch in (5, entries.numel(), 1 << 16):  # ragged last batch, one batch, fewer rows than a batch
        torch.testing.assert_close(device_scores(q, keys, entries, batch), expected, rtol=0, atol=1e-6)


def test_bf16_keys_change_scores_within_the_rounding_bound(tiny, state):
    """bfloat16 rounds each key element by at most 2^-9 of it, so a logit q . k moves by at most
    2^-9 sum|q_i k_i| and its sigmoid (slope <= 1/4) by a quarter of that; we allow 2^-8 for float32 noise."""
    layer, ltm = 0, state.ltm
    q = tiny.retrieval.queries(tiny, layer, torch.randn(4, tiny.cfg.hidden_size)).float()  # [4, s]
    entries = ltm.candidate_entries(layer)
    keys = ltm.bank.keys(entries).float()  # [n + C, s]
    exact = torch.sigmoid(q @ keys.T).mean(0)
    rounded = device_scores(q, ltm.bank.device_keys(CPU, torch.bfloat16), entries)
    bound = 0.25 * 2**-8 * (q.abs() @ keys.abs().T).mean(0)  # [n + C]
    diff = (rounded - exact).abs()
    assert (diff <= bound).all() and 0 < diff.max() < 5e-3, (diff.max(), bound.min())


def test_tiled_path_on_the_device_path_gives_the_cpu_rows(tiny, monkeypatch):
    state = tiny.new_state(seed=0)
    layers = state.ltm.layer_tuples()
    state.ltm = LongTermMemory.from_rows([tuple(x[:5] for x in layer) for layer in layers])  # 5 < T rows
    h = torch.randn(2, tiny.cfg.hidden_size)
    cpu = tiny.retrieve(0, state, h)
    monkeypatch.setattr(tiny.retrieval, "device_scoring", True)
    device = tiny.retrieve(0, state, h)
    assert device.scores is None and torch.equal(device.indices, cpu.indices) and torch.equal(device.rows, cpu.rows)


# -- the mirror ------------------------------------------------------------------------------------------
def test_syncing_uploads_only_new_entries(tiny, state, monkeypatch):
    scanned, bank = counting_scans(monkeypatch), state.ltm.bank
    bank.mirror, bank.cloned_from = None, None  # a bank of its own
    assert torch.equal(bank.device_keys(CPU, F32), all_keys(bank))
    assert sum(scanned) == len(bank)
    scanned.clear()
    assert bank.device_keys(CPU, F32).shape[0] == len(bank) and sum(scanned) == 0  # nothing new: no upload
    before = len(bank)
    for i in range(3):
        tiny.inject(state, token_ids(12, seed=40 + i))
    keys = bank.device_keys(CPU, F32)
    assert sum(scanned) == len(bank) - before > 0
    assert torch.equal(keys, all_keys(bank))


def test_mirror_reads_keys_from_files_and_ram(tmp_path):
    E, s = 40, 3
    keys = torch.randn(E, s)
    path = tmp_path / "keys.bin"
    path.write_bytes(keys[:30].numpy().tobytes())
    part = (torch.arange(30), torch.zeros(30, dtype=torch.int64), FileArray(path, 30, s, F32))
    bank = EntryBank(RowSpace(4, F32), s, F32, [part])
    bank.add(torch.arange(30, 40), keys[30:], torch.zeros(10, dtype=torch.int64))
    assert torch.equal(bank.device_keys(CPU, F32), keys)
    assert torch.equal(bank.device_keys(CPU), keys.to(torch.bfloat16))  # another dtype: a new mirror


def test_clones_share_the_mirror_and_never_see_each_others_entries(tiny, state):
    base = state.ltm.bank
    base_keys = base.device_keys(CPU, F32).clone()
    a, b = state.clone(), state.clone()
    b.generator = new_generator(1)  # b drops other rows than a: other keys
    assert a.ltm.bank.mirror.storage is base.mirror.storage is b.ltm.bank.mirror.storage  # shared, no copy
    tiny.inject(a, token_ids(14, seed=60))
    tiny.inject(b, token_ids(15, seed=61))
    ka = a.ltm.bank.device_keys(CPU, F32)  # the first to append writes past the shared rows in place
    kb = b.ltm.bank.device_keys(CPU, F32)  # the second copies them first
    assert a.ltm.bank.mirror.storage is base.mirror.storage and b.ltm.bank.mirror.storage is not base.mirror.storage
    assert torch.equal(ka, all_keys(a.ltm.bank)) and torch.equal(kb, all_keys(b.ltm.bank))
    assert not torch.equal(ka[len(base) :], kb[len(base) :])
    assert torch.equal(base.device_keys(CPU, F32), base_keys)  # the original sees neither
    tiny.inject(state, token_ids(16, seed=62))  # the original appends after its clones: it copies too
    assert torch.equal(base.device_keys(CPU, F32), all_keys(base))
    assert torch.equal(a.ltm.bank.device_keys(CPU, F32), all_keys(a.ltm.bank))  # a's rows are untouched


def test_states_cloned_per_sample_share_the_initial_mirror_until_they_append(monkeypatch):
    model = mp.load("tiny-mplus")  # its own initial state: no mirror yet
    scanned = counting_scans(monkeypatch)
    samples = [model.new_state(seed=i) for i in range(3)]
    initial = model.initial_state.ltm.bank
    keys = [s.ltm.bank.device_keys(CPU, F32) for s in samples]  # the first builds the initial state's mirror
    assert sum(scanned) == len(initial)  # uploaded once, for all the samples
    assert all(s.ltm.bank.mirror.storage is initial.mirror.storage for s in samples)
    assert all(k.data_ptr() == keys[0].data_ptr() for k in keys)
    scanned.clear()
    for i, sample in enumerate(samples):
        model.inject(sample, token_ids(12, seed=70 + i))
        assert torch.equal(sample.ltm.bank.device_keys(CPU, F32), all_keys(sample.ltm.bank))
    assert sum(scanned) == sum(len(s.ltm.bank) - len(initial) for s in samples)  # only their own entries
    assert len({id(s.ltm.bank.mirror.storage) for s in samples}) == 3  # the first wrote in place, the others copied


def test_the_mirror_is_derived_data(tiny, state, tmp_path):
    state.ltm.bank.device_keys(CPU, F32)
    tensors = state.ltm.to_tensors()
    assert state.ltm.to(torch.float32).bank.mirror is None  # a new bank, new entry ids: no mirror
    state.save(tmp_path / "s")
    loaded = mp.MemoryState.load(tmp_path / "s")
    assert loaded.ltm.bank.mirror is None
    theirs = loaded.ltm.to_tensors()
    assert all(torch.equal(tensors[k], theirs[k]) for k in tensors)


def test_the_gpu_checks_retrieval_part_runs_small(tmp_path):
    """scripts/gpu_check.py retrieval on the CPU: the device path (on the CPU here) against the CPU path."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[2] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "retrieval.json"
    args = ["retrieval", "--device", "cpu", "--shape", "tiny", "--ltm-sizes", "64,128", "--repeats", "1"]
    assert gpu_check.main([*args, "--out", str(out)]) == 0
    part = json.loads(out.read_text())
    assert part["mirror"]["dtype"] == "bfloat16" and part["mirror"]["entries"] > 2 * 128
    assert [size["ltm_rows"] for size in part["sizes"]] == [64, 128]
    for size in part["sizes"]:
        assert size["layers_with_the_same_rows"] == "2/2" and size["max_score_diff"] == 0  # bf16 keys both ways
        assert size["device_s_per_layer"] > 0 and size["cpu_s_per_layer"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retrieval_on_cuda_matches_the_cpu(dtype):
    model = mp.load("tiny-mplus", device="cuda", dtype=dtype)
    state = model.new_state(seed=0)
    for i in range(5):
        model.inject(state, token_ids(10 + i, seed=i))
    h = torch.randn(6, model.cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    device = [model.retrieve(layer, state, h) for layer in range(model.cfg.num_layers)]
    model.retrieval.device_scoring = False
    try:
        cpu = [model.retrieve(layer, state, h) for layer in range(model.cfg.num_layers)]
    finally:
        model.retrieval.device_scoring = None
    assert state.ltm.bank.mirror.value.is_cuda
    for a, b in zip(cpu, device, strict=True):
        assert b.rows.is_cuda and b.scores.device == CPU
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-3)
        if dtype == torch.float32:
            assert torch.equal(a.indices, b.indices) and torch.equal(b.rows.cpu(), a.rows)
