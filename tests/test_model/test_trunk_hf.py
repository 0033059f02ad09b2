"""Trunk equality with transformers: with an uninitialized memory (no prefix) our decoder is a plain Llama,
so its logits must match `LlamaForCausalLM` with the same config and weights."""

from __future__ import annotations

import csv
import inspect
import json
from typing import Any

import pytest
import torch

import model as mp
from model.core.config import config_from_hf
from model.core.memoryllm import MemoryLLM
from model.memory.state import MemoryState
from model.systems.baselines import no_memory
from model.text.tokenizer import byte_tokenizer
from model.zoo.registry import TINY_CONFIG as TINY

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # float32 end to end: only summation order differs between the two implementations

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def plain_config(rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `tiny` preset's shape without LoRA (a MemoryLLM config: float32 inv_freq whatever the rope type)."""
    plain = {key: value for key, value in TINY.items() if key != "lora_config"}
    return plain | {"rope_scaling": rope_scaling, "add_decoder_lora": False}


def hf_config(cfg: dict[str, Any]) -> Any:
    """A transformers LlamaConfig with the sizes of our HF-style dict `cfg` (v4 or v5 rope arguments)."""
    rope = dict(cfg["rope_scaling"] or {"rope_type": "default"})
    sizes = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:  # transformers 5
        rope_args = {"rope_parameters": rope | {"rope_theta": cfg["rope_theta"]}}
    else:
        rope_args = {"rope_theta": cfg["rope_theta"], "rope_scaling": cfg["rope_scaling"]}
    hc = transformers.LlamaConfig(**sizes, **rope_args)
    hc._attn_implementation = "eager"
    return hc


def seeded_hf_model(cfg: dict[str, Any], seed: int) -> Any:
    """LlamaForCausalLM with seeded O(1)-activation weights (HF's own init is std 0.02: logits near zero)."""
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: a misplaced norm weight must show
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[1] ** -0.5)
    return hf


def twin_models(rope_scaling: dict[str, Any] | None = None, seed: int = 0) -> tuple[MemoryLLM, Any]:
    """Our model and HF's with the same weights, copied by name; every HF parameter must have a twin."""
    cfg = plain_config(rope_scaling)
    ours = mp.build_model(config_from_hf(cfg)).eval()
    hf = seeded_hf_model(cfg, seed)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for p in ours_params.values():
            p.fill_(float("nan"))  # a parameter that HF does not fill would poison the logits
        for name, p in hf.named_parameters():
            assert name in ours_params, f"HF parameter {name} has no twin in our model"
            assert ours_params[name].shape == p.shape, name
            ours_params[name].copy_(p)
    extras = set(ours_params) - {n for n, _ in hf.named_parameters()}
    assert extras == {"bos_embedding", "new_memory_positional_emb"}  # no LoRA, untied head: nothing else
    return ours, hf


def empty_state(model: MemoryLLM) -> MemoryState:
    """A never-written memory: no prefix before the prompt."""
    cfg = model.cfg
    return MemoryState(memory=torch.empty(cfg.num_layers, 0, cfg.hidden_size), initialized=False)


def prompts(batch: int, n: int, seed: int, vocab: int = 258) -> torch.Tensor:
    """[batch, n] random token ids."""
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits.float()  # [B, n, V]


@pytest.fixture(scope="module")
def default_twins() -> tuple[MemoryLLM, Any]:
    torch.set_num_threads(1)
    return twin_models()


def test_empty_state_has_no_prefix(default_twins):
    ours, _ = default_twins
    assert ours.prefix_length(empty_state(ours)) == 0


def test_logits_match_hf(default_twins):
    ours, hf = default_twins
    ids = prompts(2, 20, seed=3)
    expected = hf_logits(hf, ids)
    got = ours(ids, empty_state(ours)).logits  # [2, 20, V]
    assert got.shape == expected.shape == (2, 20, 258)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_weights_matter(default_twins):
    """The comparison can fail: one perturbed HF weight breaks it."""
    ours, _ = default_twins
    ids = prompts(2, 20, seed=3)
    _, other = twin_models(seed=0)
    with torch.no_grad():
        other.model.layers[1].self_attn.k_proj.weight[0, 0] += 0.5
    assert (ours(ids, empty_state(ours)).logits - hf_logits(other, ids)).abs().max() > 1e-3


def test_hidden_states_match_hf(default_twins):
    ours, hf = default_twins
    ids = prompts(1, 17, seed=4)
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    got = ours(ids, empty_state(ours), return_hidden=True).hidden_states
    assert len(got) == len(expected) == ours.cfg.num_layers + 1
    for layer in range(ours.cfg.num_layers):  # layer inputs; HF's last entry is after the final norm too
        torch.testing.assert_close(got[layer], expected[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[-1], expected[-1], atol=ATOL, rtol=0)


def test_kv_cache_steps_match_hf_full_forward(default_twins):
    """Prefill then three one-token steps give HF's logits on the whole sequence."""
    ours, hf = default_twins
    ids = prompts(2, 23, seed=5)
    expected = hf_logits(hf, ids)  # [2, 23, V]
    state = empty_state(ours)
    with ours.caches(2, 23):
        prefill = ours(ids[:, :20], state, input_pos=torch.arange(20)).logits
        torch.testing.assert_close(prefill, expected[:, :20], atol=ATOL, rtol=0)
        for t in range(20, 23):
            step = ours(ids[:, t : t + 1], state, input_pos=torch.tensor([t])).logits  # [2, 1, V]
            torch.testing.assert_close(step, expected[:, t : t + 1], atol=ATOL, rtol=0)


def test_last_only_is_the_last_row(default_twins):
    ours, hf = default_twins
    ids = prompts(2, 19, seed=6)
    got = ours(ids, empty_state(ours), last_only=True).logits
    torch.testing.assert_close(got, hf_logits(hf, ids)[:, -1:], atol=ATOL, rtol=0)


def test_llama3_rope_matches_hf():
    """Llama-3.1 rope scaling with prompts longer than original_max_position_embeddings (32)."""
    torch.set_num_threads(1)
    ours, hf = twin_models(LLAMA3_ROPE, seed=7)
    assert ours.cfg.rope.kind == "llama3" and ours.cfg.rope.inv_freq_dtype == "float32"
    torch.testing.assert_close(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=0)
    ids = prompts(2, 48, seed=8)
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(ours(ids, empty_state(ours)).logits, expected, atol=ATOL, rtol=0)
    state = empty_state(ours)
    with ours.caches(2, 48):
        ours(ids[:, :45], state, input_pos=torch.arange(45))
        for t in range(45, 48):
            step = ours(ids[:, t : t + 1], state, input_pos=torch.tensor([t])).logits
            torch.testing.assert_close(step, expected[:, t : t + 1], atol=ATOL, rtol=0)


def test_llama3_rope_differs_from_default():
    """Guard: past position 32 the llama3 scaling changes the logits (so the test above checks something)."""
    torch.set_num_threads(1)
    scaled, _ = twin_models(LLAMA3_ROPE, seed=7)
    plain, _ = twin_models(None, seed=7)
    ids = prompts(1, 48, seed=8)
    diff = scaled(ids, empty_state(scaled)).logits - plain(ids, empty_state(plain)).logits
    assert diff.abs().max() > 1e-3


# -- a plain Hugging Face causal LM by directory: the base model under the baselines -------------------------
def saved_plain_llama(directory, rope_scaling: dict[str, Any] | None = None, seed: int = 11) -> Any:
    """A seeded LlamaForCausalLM saved as transformers saves it (safetensors, config.json) with a byte
    tokenizer; returns the HF model."""
    hf = seeded_hf_model(plain_config(rope_scaling), seed)
    hf.config.bos_token_id, hf.config.eos_token_id = 256, 256
    hf.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return hf


def test_a_plain_llama_directory_loads_as_the_base_model_hf_computes(tmp_path):
    """Its logits without memory (as the baselines read it) are the HF model's; it gets the training-free
    memory and its tokenizer."""
    torch.set_num_threads(1)
    hf = saved_plain_llama(tmp_path, LLAMA3_ROPE)
    ours = mp.load(tmp_path)
    assert ours.cfg.training_free is not None and "training-free" in ours.info.label
    assert ours.cfg.rope.kind == "llama3" and ours.tokenizer is not None
    ids = prompts(1, 40, seed=12)
    torch.testing.assert_close(ours(ids, no_memory(ours)).logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_a_plain_model_of_another_architecture_is_refused_by_name(tmp_path):
    saved_plain_llama(tmp_path)
    config = tmp_path / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps(raw | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(mp.CheckpointError, match="'qwen2' model: a plain causal LM runs here only with the Llama"):
        mp.load(tmp_path)


def test_bench_retention_runs_the_baselines_over_a_plain_llama_directory(tmp_path):
    from typer.testing import CliRunner

    from mplus_cli.app import app

    saved_plain_llama(tmp_path / "llama")
    args = ["bench", "retention", "--model", str(tmp_path / "llama"), "--max-distance", "512", "--limit", "1"]
    result = CliRunner().invoke(app, [*args, "--system", "truncate:tokens=64", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert {(row["model"], row["control"]) for row in rows} == {
        (str(tmp_path / "llama"), control) for control in ("memory", "truncate:tokens=64")
    }
