"""A model spread over several devices with accelerate's device_map answers and writes as on one device."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import token_ids

import model as mp

ALL_ON_CPU = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "cpu", "norm": "cpu"}


def run(lm: mp.MemoryLLM) -> tuple[list[int], torch.Tensor, list[list[int]], torch.Tensor]:
    """Six injections, one question (its tokens and step logits), a batch of two, the memory after."""
    state = lm.new_state(seed=1)
    for j in range(6):
        lm.inject(state, token_ids(40, seed=j))
    settings = mp.DecodeSettings(max_new_tokens=5)
    alone = mp.generate(lm, state, token_ids(7, seed=99).tolist(), settings, keep_logits=True)
    prompts = [token_ids(7, seed=99).tolist(), token_ids(4, seed=98).tolist()]
    batch = mp.generate_batch(lm, [state, state.clone()], prompts, settings)
    return alone.token_ids, torch.stack(alone.step_logits), [g.token_ids for g in batch], state.memory


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus", "tiny-free-mplus"])
def test_layers_behind_accelerate_hooks_give_the_single_device_results(name):
    pytest.importorskip("accelerate")
    spread = mp.load(name, device_map=ALL_ON_CPU)
    assert all(hasattr(block, "_hf_hook") for block in spread.model.layers)  # every layer dispatched
    ours, reference = run(spread), run(mp.load(name))
    assert ours[0] == reference[0] and ours[2] == reference[2]
    assert torch.equal(ours[1], reference[1]) and torch.equal(ours[3], reference[3])


def test_without_accelerate_the_error_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate":
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    with pytest.raises(ImportError, match="pip install accelerate"):
        mp.load("tiny", device_map="auto")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_over_two_gpus_gives_the_one_gpu_results():
    split = {"embed_tokens": 0, "layers.0": 0, "layers.1": 1, "norm": 1}
    spread = mp.load("tiny-mplus", device="cuda:0", dtype=torch.float32, device_map=split)
    assert [spread.layer_device(i).index for i in (0, 1)] == [0, 1]
    ours, reference = run(spread), run(mp.load("tiny-mplus", device="cuda:0", dtype=torch.float32))
    assert ours[0] == reference[0] and ours[2] == reference[2]
    torch.testing.assert_close(ours[1], reference[1], atol=1e-4, rtol=0)
