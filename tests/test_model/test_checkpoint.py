"""Checkpoint loading in the authors' layout: key mapping, loud failures, shards, hub ids, presets."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, token_ids
from safetensors.torch import load_file, save_file

import model as mp
import model.zoo.checkpoint as ckpt
from model.core.layers import DECODER, ENCODER
from model.zoo import hub


@pytest.fixture
def saved_tiny(tmp_path):
    model = mp.load("tiny")
    state = model.new_state()
    model.inject(state, token_ids(20))
    return model, state, mp.save_checkpoint(model, state, tmp_path / "ckpt")


def test_saved_checkpoint_uses_the_authors_key_names(saved_tiny):
    _, _, directory = saved_tiny
    keys = set(load_file(directory / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.layers.1.mlp.down_proj.lora_B.decoder_adapter.weight" in keys
    assert "model.layers.0.self_attn.o_proj.weight" in keys  # o_proj is not LoRA-wrapped
    assert {"memory", "bos_embedding", "new_memory_positional_emb", "initialized"} <= keys


def test_save_then_load_gives_the_same_model_and_memory(saved_tiny):
    model, state, directory = saved_tiny
    loaded = mp.load(directory)
    assert torch.equal(loaded.initial_state.memory, state.memory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    question = token_ids(6)[None]
    assert torch.equal(loaded(question, loaded.new_state()).logits, model(question, state).logits)
    assert loaded.tokenizer is not None and loaded.tokenizer.decode(loaded.tokenizer.encode("abc")) == "abc"


def test_fixture_checkpoint_adapters_land_in_the_right_modules():
    directory = FIXTURES / "memoryllm_lora" / "model"
    model = mp.load(directory, tokenizer=False)
    raw = load_file(directory / "model.safetensors")
    q = model.model.layers[1].self_attn.q_proj
    assert torch.equal(q.weight, raw["model.layers.1.self_attn.q_proj.base_layer.weight"])
    assert torch.equal(q.lora_A[ENCODER], raw["model.layers.1.self_attn.q_proj.lora_A.default.weight"])
    assert torch.equal(q.lora_B[DECODER], raw["model.layers.1.self_attn.q_proj.lora_B.decoder_adapter.weight"])
    assert q.scaling == 2.0


def rewrite(directory, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_key_is_named(saved_tiny):
    _, _, directory = saved_tiny
    key = "model.layers.1.mlp.up_proj.lora_A.decoder_adapter.weight"
    rewrite(directory, lambda t: t.pop(key))
    with pytest.raises(mp.CheckpointError, match=f"missing keys: {key}"):
        mp.load(directory)


def test_every_unused_key_is_named(saved_tiny):
    _, _, directory = saved_tiny

    def add(t):
        t["model.layers.0.self_attn.q_proj.lora_A.other.weight"] = torch.zeros(4, 64)
        t["extra_thing"] = torch.zeros(2)

    rewrite(directory, add)
    with pytest.raises(mp.CheckpointError) as err:
        mp.load(directory)
    assert "extra_thing" in str(err.value) and "lora_A.other.weight" in str(err.value)


def test_wrong_shape_is_named(saved_tiny):
    _, _, directory = saved_tiny
    rewrite(directory, lambda t: t.update(bos_embedding=torch.zeros(2, 1, 32)))
    with pytest.raises(mp.CheckpointError, match="bos_embedding"):
        mp.load(directory)


def test_initialized_flag_is_read(saved_tiny):
    _, _, directory = saved_tiny
    rewrite(directory, lambda t: t.update(initialized=torch.tensor(0, dtype=torch.uint8)))
    assert mp.load(directory).initial_state.initialized is False


def test_sharded_checkpoint_loads(tmp_path, monkeypatch):
    model = mp.load("tiny")
    monkeypatch.setattr(ckpt, "SHARD_SIZE", 64 * 1024)
    directory = mp.save_checkpoint(model, model.new_state(), tmp_path / "sharded")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (directory / "model.safetensors").exists()
    loaded = mp.load(directory)
    assert torch.equal(loaded.initial_state.memory, model.initial_state.memory)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(mp.MODELS["tiny"].hf))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        mp.load(tmp_path)


def test_hub_alias_downloads_through_huggingface_hub(saved_tiny, monkeypatch):
    _, _, directory = saved_tiny
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(directory)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    model = mp.load("memoryllm-8b", revision="abc123")
    assert calls[0][:2] == ("YuWangX/memoryllm-8b", "abc123")
    assert "*.safetensors" in calls[0][2] and not any(p.endswith(".bin") for p in calls[0][2])
    assert model.info.revision == "abc123"


def test_unknown_model_name_says_what_to_pass():
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        mp.load("no-such-model")


def test_rope_variant_is_taken_from_the_config():
    assert mp.read_config(FIXTURES / "memoryllm_lora" / "model").rope.kind == "linear"
    assert mp.read_config(FIXTURES / "memoryllm7b" / "model").rope.kind == "interpolated"
    cfg = mp.read_config(FIXTURES / "memoryllm7b" / "model")
    assert cfg.drop_memory_per_layer is False and cfg.lora is None


def test_tiny_preset_is_labelled_untrained(tiny):
    assert "untrained" in tiny.info.label
