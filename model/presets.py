"""Built-in offline presets: tiny seeded random models for tests and demos of the mechanics.

They are untrained: their answers are noise, and everything that shows them says so.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import config_from_hf
from .memory import MemoryState
from .memoryllm import MemoryLLM
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

PRESETS = {"tiny": TINY_CONFIG}


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


def build_preset(name: str, seed: int = 0) -> MemoryLLM:
    """A preset model with seeded random weights, random initial memory and a byte tokenizer."""
    cfg = config_from_hf(PRESETS[name])
    model = MemoryLLM(cfg)
    generator = torch.Generator().manual_seed(seed)
    _randomize(model, generator)
    memory = torch.randn(cfg.num_layers, cfg.memory_rows, cfg.hidden_size, generator=generator)
    model.initial_state = MemoryState(memory=memory)
    model.tokenizer = byte_tokenizer()
    model.eval().requires_grad_(False)
    return model
