"""Which model a command uses, and the record that binds a session to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import model as mp
from model import store as st
from model.memory.dtypes import dtype_of
from model.zoo.registry import repo_id

from .errors import ConflictError, MplusError, NotFoundError

DEFAULT_MODEL = "smollm2-135m"  # the offline demo model: SmolLM2-135M with training-free M+ memory


def requested_model(option: str | None) -> str:
    """--model, else $MPLUS_MODEL, else the offline default."""
    return option or os.environ.get("MPLUS_MODEL") or DEFAULT_MODEL


def with_memory(name: str, memory: str | None) -> str:
    """The built-in model `name` in the memory flavour `memory` (mplus | memoryllm); other models as they
    are (their kind is checked once loaded)."""
    if memory is None:
        return name
    named = mp.MODELS.get(name)
    if named is not None and named.kind != memory and named.twin is not None:
        return named.twin
    return name


def model_id(name: str) -> str:
    """A stable id: the built-in model's name, the absolute path of a local checkpoint, or the hub repo id."""
    if name in mp.BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return repo_id(name)


def load_model(
    name: str,
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | None = None,
    revision: str | None = None,
    device: torch.device | str = "cpu",
) -> mp.MemoryLLM:
    """mp.load on `device` in `dtype`, with its failures turned into one-line errors."""
    dtype = dtype_of(dtype) if isinstance(dtype, str) else dtype
    try:
        model = mp.load(name, dtype=dtype, device=device, revision=revision, tokenizer=tokenizer or True)
    except FileNotFoundError as e:
        raise NotFoundError(f"{e}") from e
    except (mp.CheckpointError, OSError, ValueError) as e:
        raise MplusError(f"cannot load model {name!r}: {e}") from e
    if model.tokenizer is None:
        raise MplusError(f"model {name!r} has no tokenizer: pass --tokenizer with a tokenizer directory or hub id")
    return model


def binding(name: str, model: mp.MemoryLLM, tokenizer: str | None, revision: str | None) -> dict[str, Any]:
    """What a session records about its model."""
    return st.binding(model, model_id(name), tokenizer, revision)


def check_requested(session_name: str, bound: dict[str, Any], option: str | None) -> None:
    """Refuse a --model other than the one the session was created with."""
    if option is not None and model_id(option) != bound["id"]:
        raise ConflictError(
            f"session {session_name!r} belongs to model {bound['id']!r}, not {option!r}: "
            "drop --model or use another session"
        )


def check_memory(session_name: str, bound: dict[str, Any], memory: str | None) -> None:
    """Refuse a --memory other than the kind of memory the session was created with."""
    if memory is not None and memory != bound["kind"]:
        raise ConflictError(
            f"session {session_name!r} has {bound['kind']} memory, not {memory}: drop --memory or use another session"
        )


def load_bound_model(
    session_name: str,
    bound: dict[str, Any],
    tokenizer: str | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> mp.MemoryLLM:
    """The session's model on `device` in `dtype` (default: the session's), checked against the recorded
    config fingerprint."""
    tokenizer, revision = tokenizer or bound.get("tokenizer"), bound.get("revision")
    model = load_model(bound["id"], dtype or bound["dtype"], tokenizer, revision, device)
    if model.cfg.fingerprint() != bound["fingerprint"]:
        raise ConflictError(
            f"the model {bound['id']!r} changed since session {session_name!r} was created "
            f"(config {model.cfg.fingerprint()} != {bound['fingerprint']}): fork from a matching model"
        )
    return model
