"""Loading a model by name or path: the presets, the demo, a checkpoint directory or a hub id, on one device
or spread over several; the dtypes a model runs and stores in by default."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import ModelInfo
from ..core.memoryllm import MemoryLLM
from ..memory.dtypes import FLOAT_DTYPES
from ..policies.training_free import TRAINING_FREE_LABEL
from ..text.tokenizer import has_tokenizer, load_tokenizer
from .checkpoint import (
    CARRIED_STATE,
    load_checkpoint,
    resolve_checkpoint,
)
from .presets import UNTRAINED_LABEL, build_preset, build_tiny
from .registry import MODELS
from .smollm2 import load_smollm2


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def storage_dtype(model: MemoryLLM) -> torch.dtype:
    """The dtype a session of `model` keeps its rows in unless told otherwise: float32 for the tiny
    presets (exactness is their point), else the checkpoint's own (config.json torch_dtype), else bfloat16
    (the demo model; the authors keep their LTM in bfloat16)."""
    return FLOAT_DTYPES.get(model.info.storage_dtype, torch.bfloat16)


def load(
    name_or_path: str | Path = "tiny",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    tokenizer: bool | str | Path = True,
    rope_inv_freq_dtype: str | None = None,
    device_map: str | dict[str, int | str] | None = None,
) -> MemoryLLM:
    """Load a built-in model (presets `tiny`, `tiny-mplus`; the SmolLM2 demo `smollm2-135m` (M+ flavour),
    `smollm2-135m-memoryllm`; training-free random `tiny-free`, `tiny-free-mplus`), a local checkpoint
    directory or a hub id (`memoryllm-8b`, `YuWangX/...`).

    dtype defaults to float32 on CPU and bfloat16 on CUDA. `tokenizer`: True loads the checkpoint's own
    tokenizer when it has one, a path or hub id loads that one, False skips it. The checkpoint's memory
    becomes `model.initial_state`; `model.new_state(seed)` gives a working copy. `device_map` ("auto" or
    {module of the decoder: device}) spreads a model too large for one GPU over several (see `dispatch`).
    """
    if device_map is not None:  # loaded on the CPU, then spread; bfloat16 by default when there are GPUs
        dtype = dtype or default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return dispatch(load(name_or_path, dtype=dtype, revision=revision, tokenizer=tokenizer), device_map)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    name = str(name_or_path)
    family = MODELS[name].family if name in MODELS else "checkpoint"
    if family == "demo":
        return load_smollm2(MODELS[name].kind, dtype=dtype, device=device)
    if family == "training-free":
        model = build_tiny(MODELS[name].kind, dtype=dtype, device=device)
        model.info = ModelInfo(name, f"{UNTRAINED_LABEL}; {TRAINING_FREE_LABEL}", storage_dtype="float32")
        return model
    if family == "preset":
        model = build_preset(name).to(device=device, dtype=dtype)
        model.initial_state = model.initial_state.to(device, dtype)
        model.info = ModelInfo(name, UNTRAINED_LABEL, storage_dtype="float32")
        return model
    directory = resolve_checkpoint(name, revision)
    model = load_checkpoint(directory, dtype, device, rope_inv_freq_dtype)
    if tokenizer is True and has_tokenizer(directory):
        model.tokenizer = load_tokenizer(directory)
    elif tokenizer not in (True, False):
        model.tokenizer = load_tokenizer(tokenizer)
    label = UNTRAINED_LABEL if model.cfg.raw.get("mplus_preset") else ""
    label = TRAINING_FREE_LABEL if model.cfg.training_free is not None else label
    model.info = ModelInfo(
        name,
        label,
        str(directory),
        revision,
        carried_state=(directory / CARRIED_STATE).is_file(),  # its drop generator continues
        storage_dtype=model.cfg.raw.get("torch_dtype", "bfloat16"),
    )
    return model


def dispatch(model: MemoryLLM, device_map: str | dict[str, int | str]) -> MemoryLLM:
    """Spread the decoder's layers over several devices with accelerate's `device_map` ("auto": as many
    layers per GPU as fit; or {"embed_tokens": 0, "layers.0": 0, ..., "norm": 1}); hooks move each layer's
    input to its device. The bos rows, the memory and the embeddings stay on the first device, the output
    head goes with the final norm; each layer computes its memory keys/values and KV cache on its own."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as e:
        raise ImportError("device_map needs accelerate: pip install accelerate (or the [multi-gpu] extra)") from e
    decoder = model.model
    if device_map == "auto":
        device_map = infer_auto_device_map(decoder, no_split_module_classes=["Block"], dtype=model.dtype)
    dispatch_model(decoder, device_map=device_map, force_hooks=True)
    first, last = decoder.embed_tokens.weight.device, decoder.norm.weight.device
    for name in ("bos_embedding", "new_memory_positional_emb"):
        parameter = getattr(model, name)
        if parameter is not None:
            parameter.data = parameter.data.to(first)
    if model.lm_head is not None:
        model.lm_head.to(last)
    model.initial_state = model.initial_state.to(first, model.initial_state.memory.dtype)
    return model
