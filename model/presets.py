"""Built-in offline presets: tiny seeded random models for tests and demos of the mechanics.

They are untrained: their answers are noise, and everything that shows them says so.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import config_from_hf
from .ltm import LongTermMemory
from .memory import MemoryState, stm_rows
from .memoryllm import MemoryLLM
from .mplus import MPlus
from .tokenizer import byte_tokenizer

UNTRAINED_LABEL = "untrained: seeded random weights, answers are noise"

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["MemoryLLM"],
    "model_type": "llama",
    "vocab_size": 258,  # 256 byte symbols + <|eos|> + <|pad|>
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
    "bos_token_id": None,
    "eos_token_id": 256,
    "mplus_preset": "tiny",
}

# M+ flavour: 8 short-term blocks + 2 retrieved LTM blocks of K = 16, a merge every 4 injections
TINY_MPLUS_CONFIG: dict[str, Any] = TINY_CONFIG | {
    "architectures": ["MPlus"],
    "num_blocks": 10,
    "num_ltm_blocks": 2,
    "selector_hidden_dim": 16,
    "num_selector_layers": 2,
    "update_ltm_frequency": 4,
    "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10,
    "ltm_initial_size": 48,
    "mplus_preset": "tiny-mplus",
}
TINY_MPLUS_INITIAL_RF = 2.0  # the initial LTM rows survive one merge and are pruned at the second

PRESETS = {"tiny": TINY_CONFIG, "tiny-mplus": TINY_MPLUS_CONFIG}


def _randomize(model: MemoryLLM, generator: torch.Generator) -> None:
    """Fill every parameter with seeded noise scaled so activations stay O(1)."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.data.fill_(1.0)
        elif ".lora_" in name:
            p.data.normal_(0.0, 0.125, generator=generator)
        elif name == "new_memory_positional_emb":
            p.data.normal_(0.0, 0.5, generator=generator)
        elif p.dim() == 2 and "embed_tokens" not in name:
            p.data.normal_(0.0, p.shape[1] ** -0.5, generator=generator)
        else:
            p.data.normal_(0.0, 1.0, generator=generator)


def random_model(
    config: dict[str, Any], seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MemoryLLM:
    """A model of an HF-style `config` with seeded random weights and no memory, built on the meta device
    and then allocated and filled directly on `device` in `dtype` (no full-size CPU copy)."""
    cfg = config_from_hf(config)
    with torch.device("meta"):
        model = MPlus(cfg) if cfg.kind == "mplus" else MemoryLLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    _randomize(model, torch.Generator(device).manual_seed(seed))
    return model.eval().requires_grad_(False)


def _initial_ltm(model: MPlus, generator: torch.Generator, memory: torch.Tensor) -> LongTermMemory:
    """`ltm_initial_size` random rows per layer with their keys key_proj(input_layernorm(row)), age 0, in a
    row space that also holds the short-term rows `memory`."""
    n, d = model.cfg.ltm_initial_size, model.cfg.hidden_size
    layers = []
    for layer in range(model.cfg.num_layers):
        rows = torch.randn(n, d, generator=generator)  # [n, d]
        rf = torch.full((n,), TINY_MPLUS_INITIAL_RF, dtype=torch.float64)
        layers.append((rows, model.row_keys(layer, rows), rf, torch.zeros(n, dtype=torch.int64)))
    return LongTermMemory.from_rows(layers, space=stm_rows(memory))


def build_preset(name: str, seed: int = 0) -> MemoryLLM:
    """A preset model with seeded random weights, random initial memory and a byte tokenizer."""
    cfg = config_from_hf(PRESETS[name])
    model = MPlus(cfg) if cfg.kind == "mplus" else MemoryLLM(cfg)
    generator = torch.Generator().manual_seed(seed)
    _randomize(model, generator)
    memory = torch.randn(cfg.num_layers, cfg.memory_rows, cfg.hidden_size, generator=generator)
    if isinstance(model, MPlus):
        ages = torch.zeros(cfg.num_layers, cfg.memory_rows, dtype=torch.int64)
        model.initial_state = MemoryState(memory=memory, memory_ages=ages, ltm=_initial_ltm(model, generator, memory))
    else:
        model.initial_state = MemoryState(memory=memory)
    model.tokenizer = byte_tokenizer()
    model.eval().requires_grad_(False)
    return model
