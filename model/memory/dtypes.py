"""Dtypes by name: the one place a torch dtype becomes the string that files and reports hold, and back."""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["bfloat16", "float16", "float32"]  # the names a user gives
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """ "bfloat16" -> torch.bfloat16 (any torch dtype's name, as files record them)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype
