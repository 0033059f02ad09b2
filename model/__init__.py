"""The MemoryLLM / M+ core on plain PyTorch: `load` a checkpoint, `inject` text, `generate` answers."""

from __future__ import annotations

from .core.config import ModelConfig, ModelInfo, config_from_hf, read_config
from .core.generate import DecodeSettings, Generation, generate, generate_batch
from .core.layers import KVCache
from .core.memoryllm import InjectResult, MemoryLLM
from .core.mplus import MPlus, Retrieval
from .memory.dtypes import FLOAT_DTYPES
from .memory.state import MemoryState
from .policies.training_free import TRAINING_FREE_LABEL
from .zoo.checkpoint import CheckpointError, save_checkpoint
from .zoo.load import default_dtype, dispatch, load, storage_dtype
from .zoo.registry import MODELS, build_model, from_name, names

# built-in models that need no checkpoint directory: seeded random presets and the SmolLM2 demo model
BUILTIN_MODELS = names("preset", "training-free", "demo")

__all__ = [
    "BUILTIN_MODELS",
    "CheckpointError",
    "DecodeSettings",
    "FLOAT_DTYPES",
    "Generation",
    "InjectResult",
    "KVCache",
    "MODELS",
    "MPlus",
    "MemoryLLM",
    "MemoryState",
    "ModelConfig",
    "ModelInfo",
    "Retrieval",
    "TRAINING_FREE_LABEL",
    "build_model",
    "config_from_hf",
    "default_dtype",
    "dispatch",
    "from_name",
    "generate",
    "generate_batch",
    "load",
    "read_config",
    "save_checkpoint",
    "storage_dtype",
]
