"""Built-in offline presets: tiny seeded random models for tests and demos of the mechanics.

They are untrained: their answers are noise, and everything that shows them says so.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.config import MemoryKind, ModelConfig, config_from_hf
from ..core.memoryllm import MemoryLLM
from ..core.mplus import MPlus
from ..memory.ltm import LongTermMemory
from ..memory.state import MemoryState, stm_rows
from ..policies.training_free import COMPUTED, training_free_config
from ..text.tokenizer import byte_tokenizer
from .registry import (
    TINY_LLAMA,
    TINY_MEMORY,
    build_model,
    build_training_free,
    from_name,
)

UNTRAINED_LABEL = "untrained: seeded random weights, answers are noise"

TINY_MPLUS_INITIAL_RF = 2.0  # the initial LTM rows survive one merge and are pruned at the second


def randomize(model: MemoryLLM, generator: torch.Generator) -> None:
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
        model = build_model(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    randomize(model, torch.Generator(device).manual_seed(seed))
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
    cfg = from_name(name)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    randomize(model, generator)
    memory = torch.randn(cfg.num_layers, cfg.memory_rows, cfg.hidden_size, generator=generator)
    if isinstance(model, MPlus):
        ages = torch.zeros(cfg.num_layers, cfg.memory_rows, dtype=torch.int64)
        model.initial_state = MemoryState(memory=memory, memory_ages=ages, ltm=_initial_ltm(model, generator, memory))
    else:
        model.initial_state = MemoryState(memory=memory)
    model.tokenizer = byte_tokenizer()
    model.eval().requires_grad_(False)
    return model


# -- tiny seeded random Llamas in training-free mode (tests, offline CLI checks): the `tiny` preset's shapes --
def random_llama_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for every plain-Llama parameter of `cfg` (see `randomize`)."""
    model = build_model(cfg)
    randomize(model, torch.Generator().manual_seed(seed))
    return {k: v for k, v in model.state_dict().items() if k not in COMPUTED}


def build_tiny(
    memory: MemoryKind = "memoryllm",
    capacity: int = TINY_MEMORY["capacity"],
    retrieved: int = TINY_MEMORY["retrieved"],
    block: int = TINY_MEMORY["block"],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> MemoryLLM:
    """A tiny seeded random Llama (TINY_LLAMA: the `tiny` preset's shapes) with training-free memory and the
    byte tokenizer (`tiny-free`, `tiny-free-mplus` with the defaults)."""
    cfg = training_free_config(TINY_LLAMA, memory, capacity, retrieved, block)
    model = build_training_free(cfg, random_llama_weights(cfg, seed), dtype, device)
    model.tokenizer = byte_tokenizer()
    return model
