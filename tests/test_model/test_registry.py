"""The registry of named models: one place for every name, the one way to build a model of a config."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import model as mp
from model.policies.authors import RandomRows, Selectors
from model.policies.training_free import LayerInputs, LexicalBlocks, OldestOut, RandomBlocks
from model.zoo import catalog
from model.zoo.registry import MODELS, aligned, build_model, from_name, names, save_aligned

# Recorded with the code before the registry and the policies existed: sessions are bound to these, so a
# refactor that changes one would orphan every session made with that model. The training-free M+ flavour's
# changed on purpose when its memory was redesigned (a window and lexical block retrieval): its old sessions
# hold other keys, and are refused as another model's rather than misread (it was 4e48ad2604ef906f).
FINGERPRINTS = {
    "tiny": "92fa5ad1353a6b5d",
    "tiny-mplus": "c0790a7dd6d0f608",
    "tiny-free": "e2dbdedff1fee707",
    "tiny-free-mplus": "2372e0c25baf7a8e",
}


@pytest.mark.parametrize("name", list(FINGERPRINTS))
def test_built_in_models_keep_their_fingerprints(name):
    assert from_name(name).fingerprint() == FINGERPRINTS[name] == mp.load(name).cfg.fingerprint()


def test_every_name_the_cli_takes_is_registered_once_and_twins_pair_up():
    assert catalog.names() == list(names("preset", "training-free", "demo", "hub"))
    for name, named in MODELS.items():
        if named.twin is not None:
            twin = MODELS[named.twin]
            assert twin.twin == name and twin.kind != named.kind and twin.family == named.family


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus", "tiny-free", "tiny-free-mplus"])
def test_a_model_is_memoryllm_or_mplus_with_its_policies(name):
    cfg = from_name(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, mp.MPlus) == (cfg.kind == "mplus") and isinstance(model, mp.MemoryLLM)
    free = cfg.training_free is not None
    assert isinstance(model.write, LayerInputs) == free
    eviction = (OldestOut if cfg.kind == "mplus" else RandomBlocks) if free else RandomRows
    assert isinstance(model.eviction, eviction)  # the demo's M+ keeps a window: every older row is in its LTM
    assert model.writes_read_memory != free
    if cfg.kind == "mplus":
        assert isinstance(model.retrieval, LexicalBlocks if free else Selectors)
        has_selectors = hasattr(model.model.layers[0].self_attn, "key_proj")
        assert has_selectors != free  # only the authors' retrieval has co-trained parameters


def test_training_free_fields_keep_the_authors_meaning():
    """num_tokens is the authors' K (rows per injection): 0 for training-free memory, whose size lives in
    its own config."""
    cfg = from_name("tiny-free-mplus")
    assert (cfg.num_tokens, cfg.num_blocks, cfg.num_ltm_blocks) == (0, 0, 0)
    assert (cfg.memory_rows, cfg.ltm_rows_retrieved) == (cfg.training_free.capacity, cfg.training_free.retrieved)
    authors = from_name("tiny-mplus")
    assert authors.training_free is None and authors.memory_rows == (10 - 2) * 16 and authors.ltm_rows_retrieved == 32


def test_unknown_names_and_hub_entries_are_refused_with_what_to_do():
    with pytest.raises(KeyError, match="known names are"):
        from_name("tiny-plus")
    with pytest.raises(ValueError, match="hub checkpoint"):
        from_name("mplus-8b")
    with pytest.raises(ValueError, match="Llama config"):
        from_name("smollm2-135m")


@pytest.mark.parametrize("names", [["w"], ["layer.0.weight", "b"], ["a" * 37, "bb", "model.norm.weight"]])
def test_a_file_saved_aligned_is_used_in_place_with_every_tensor_aligned(tmp_path, names):
    """Headers of any length (the names set it) are padded so that the data starts at a multiple of 64 bytes:
    mapped, each tensor (a multiple of 64 bytes long) is aligned, and `aligned` keeps it instead of a copy."""
    tensors = {name: torch.randn(16 * (i + 1), 3) for i, name in enumerate(names)}
    save_aligned(tensors, tmp_path / "w.safetensors", {"format": "pt"})
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    loaded = load_file(tmp_path / "w.safetensors")
    for name, t in loaded.items():
        assert t.data_ptr() % 64 == 0 and aligned(t) is t and torch.equal(t, tensors[name])


def test_an_unaligned_tensor_is_copied_into_aligned_storage():
    view = torch.arange(33.0)[1:]  # 4 bytes into its storage
    copy = aligned(view)
    assert copy.data_ptr() % 64 == 0 and copy is not view and torch.equal(copy, view)
