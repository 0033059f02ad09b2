"""One registry of named models (as litgpt's `Config.from_name`) and the one way to build a model of a config.

Every name a user or a bench can give is here: the seeded random presets, the training-free tiny models,
the SmolLM2 demo in both memory flavours, the bench shapes and the authors' checkpoints on the hub.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

from ..core.config import MemoryKind, ModelConfig, config_from_hf
from ..core.memoryllm import MemoryLLM
from ..core.mplus import MPlus
from ..policies.authors import authors_policies
from ..policies.training_free import COMPUTED, default_memory, policies, training_free_config

Family = Literal["preset", "training-free", "demo", "bench", "hub"]

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

# -- bench shapes: random models of the checkpoints' sizes (bench speed) ---------------------------------
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}

SMALL_CONFIG: dict[str, Any] = {
    "architectures": ["MemoryLLM"],
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "num_tokens": 64,
    "num_blocks": 160,  # 10240 memory rows per layer
    "add_bos_embedding": True,
    "drop_memory_per_layer": True,
    "add_decoder_lora": True,
    "lora_config": LORA,
    "eos_token_id": 2,
}
# M+ flavour, mplus-8b's proportions scaled down: 128 short-term + 32 retrieved blocks, selector 256 * 512/4096
SMALL_MPLUS_CONFIG = SMALL_CONFIG | {
    "architectures": ["MPlus"],
    "num_ltm_blocks": 32,
    "selector_hidden_dim": 32,
    "num_selector_layers": 2,
    "update_ltm_frequency": 60,
    "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10,
}
# memoryllm-8b (docs/algorithm.md §2.4) and mplus-8b (Llama-3.1 rope, 40 short-term + 10 retrieved blocks,
# docs/algorithm.md §2.5)
MEMORYLLM_8B_CONFIG: dict[str, Any] = SMALL_CONFIG | {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 1.8125},
    "num_tokens": 256,
    "num_blocks": 50,  # 12800 memory rows per layer
    "eos_token_id": 128001,
}
MPLUS_8B_CONFIG = MEMORYLLM_8B_CONFIG | {
    "architectures": ["MPlus"],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "num_ltm_blocks": 10,
    "selector_hidden_dim": 256,
    "num_selector_layers": 2,
    "update_ltm_frequency": 60,
    "decay_frequency": 1,
    "initial_rf_when_moving_stm_to_ltm": 10,
}


LLAMA_KEYS = (  # the plain-Llama part of a preset config
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "eos_token_id",
)
TINY_LLAMA = {key: TINY_CONFIG[key] for key in LLAMA_KEYS} | {"bos_token_id": 256}  # <|eos|> doubles as bos
TINY_MEMORY = {"capacity": 64, "retrieved": 32, "block": 16}  # the training-free tiny models' memory


@dataclass(frozen=True)
class Named:
    """A model the toolkit knows by name."""

    name: str
    family: Family
    kind: MemoryKind
    twin: str | None = None  # the same model in the other memory flavour
    hf: dict[str, Any] | None = None  # an HF-style config (presets, bench shapes) or a plain Llama's (tiny-free)
    memory: dict[str, int] | None = None  # training-free: capacity, retrieved, block
    repo: str | None = None  # hub: the repository id


MODELS: dict[str, Named] = {
    m.name: m
    for m in (
        Named("tiny", "preset", "memoryllm", "tiny-mplus", hf=TINY_CONFIG),
        Named("tiny-mplus", "preset", "mplus", "tiny", hf=TINY_MPLUS_CONFIG),
        Named("tiny-free", "training-free", "memoryllm", "tiny-free-mplus", hf=TINY_LLAMA, memory=TINY_MEMORY),
        Named("tiny-free-mplus", "training-free", "mplus", "tiny-free", hf=TINY_LLAMA, memory=TINY_MEMORY),
        Named("smollm2-135m", "demo", "mplus", "smollm2-135m-memoryllm", memory=default_memory("mplus")),
        Named("smollm2-135m-memoryllm", "demo", "memoryllm", "smollm2-135m", memory=default_memory("memoryllm")),
        Named("small", "bench", "memoryllm", "small-mplus", hf=SMALL_CONFIG),
        Named("small-mplus", "bench", "mplus", "small", hf=SMALL_MPLUS_CONFIG),
        Named("8b", "bench", "memoryllm", "8b-mplus", hf=MEMORYLLM_8B_CONFIG),
        Named("8b-mplus", "bench", "mplus", "8b", hf=MPLUS_8B_CONFIG),
        Named("memoryllm-7b", "hub", "memoryllm", repo="YuWangX/memoryllm-7b"),
        Named("memoryllm-8b", "hub", "memoryllm", repo="YuWangX/memoryllm-8b"),
        Named("memoryllm-8b-chat", "hub", "memoryllm", repo="YuWangX/memoryllm-8b-chat"),
        Named("mplus-8b", "hub", "mplus", repo="YuWangX/mplus-8b"),
    )
}


def names(*families: Family) -> tuple[str, ...]:
    """The registered names of these families (all without arguments), in registry order."""
    return tuple(name for name, m in MODELS.items() if not families or m.family in families)


def repo_id(name: str) -> str:
    """The hub repository of a hub alias (memoryllm-8b -> YuWangX/memoryllm-8b); any other name as given."""
    named = MODELS.get(name)
    return named.repo if named is not None and named.repo is not None else name


def named_of(family: Family, kind: MemoryKind) -> str:
    """The name of the `family` model in memory flavour `kind` (the demo: smollm2-135m or -memoryllm)."""
    return next(name for name in names(family) if MODELS[name].kind == kind)


def from_name(name: str, llama: dict[str, Any] | None = None) -> ModelConfig:
    """The config of a registered model. The demo's plain Llama config comes from its converted files
    (`llama`); a hub checkpoint's config is read from its directory (see checkpoint.read_config)."""
    named = MODELS.get(name)
    if named is None:
        raise KeyError(f"unknown model {name!r}: known names are {', '.join(MODELS)}")
    if named.memory is not None:
        llama = named.hf if llama is None else llama
        if llama is None:
            raise ValueError(f"{name} needs its Llama config (the converted demo files)")
        return training_free_config(llama, named.kind, **named.memory)
    if named.hf is None:
        raise ValueError(f"{name} is a hub checkpoint: its config comes with it (model.load)")
    return config_from_hf(named.hf)


def build_model(cfg: ModelConfig) -> MemoryLLM:
    """The model of `cfg` with uninitialised weights (on the default device): M+ or MemoryLLM, built with
    the config's policies (the authors' by default, the training-free demo's for `cfg.training_free`)."""
    chosen = policies(cfg) if cfg.training_free is not None else authors_policies(cfg)
    return MPlus(cfg, **chosen) if cfg.kind == "mplus" else MemoryLLM(cfg, **chosen)


ALIGN = 64  # bytes: the CPU allocator's alignment, which matmul kernels' results depend on
ALIGN_KEY = "mplus_align"  # the metadata entry that pads a safetensors header (see save_aligned)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage aligned as the allocator aligns it: safetensors hands out views into the file at any
    offset, and CPU matmul kernels give results that differ in the last bit on unaligned weights (so a
    model loaded from its checkpoint would not answer bit for bit like the one that saved it). A file written
    by `save_aligned` is used in place."""
    return t if t.device.type != "cpu" or t.data_ptr() % ALIGN == 0 else t.clone()


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file with the data starting at a multiple of ALIGN bytes, so that every tensor whose size is a
    multiple of ALIGN (all of a Llama's, in float32) is mapped aligned and loads without a copy: the header
    (which safetensors pads to 8 bytes only) is padded through a metadata entry, its length read from the file
    written without the padding (written again with it: the tensors are not serialized in memory)."""
    metadata = metadata | {ALIGN_KEY: ""}
    safetensors.torch.save_file(tensors, path, metadata)
    with open(path, "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little")).rstrip(b" ")  # safetensors pads with spaces
    pad = (ALIGN - 8 - len(header)) % ALIGN  # 8 + header + pad: a multiple of ALIGN (and so of 8: no more padding)
    if pad:
        safetensors.torch.save_file(tensors, path, metadata | {ALIGN_KEY: "-" * pad})


def build_training_free(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> MemoryLLM:
    """The training-free model of `cfg` with plain Llama `weights` under our parameter names (every key must
    match), its bos rows computed and an empty initial memory."""
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in COMPUTED}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unused {k}" for k in sorted(set(weights) - set(expected))]
    problems += [
        f"{k} {tuple(v.shape)} (expected {expected[k]})"
        for k, v in weights.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if problems:
        raise ValueError(f"the weights do not match the Llama config: {', '.join(problems)}")
    computed = {name: torch.zeros(model.get_parameter(name).shape) for name in COMPUTED}
    state_dict = {k: aligned(v.to(device=device, dtype=dtype)) for k, v in (weights | computed).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.write.prepare(model)
    model.initial_state = model.empty_state()
    return model


def unknown_model(name: str) -> str:
    """The error for a name that is no model: a close name, and all of them."""
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.6)
    guess = f"did you mean {close[0]}? " if close else ""
    return (
        f"no model {name!r}: {guess}the models are {', '.join(names())} (see `mplus models`); "
        "or give a checkpoint directory or a hub id (owner/name)"
    )
