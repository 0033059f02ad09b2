"""Where a command's model runs (--device) and the dtype it computes in (--dtype), and loading it there."""

from __future__ import annotations

import torch

import model as mp

from .errors import UsageError


def pick_device(text: str, local_rank: int = 0) -> torch.device:
    """--device as a torch device: `auto` is CUDA when there is a GPU, else the CPU; `auto` and `cuda` take GPU
    `local_rank` (a torchrun process's own, 0 otherwise)."""
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = local_rank if text in ("auto", "cuda") else cuda_index(text)
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text} but no CUDA device is available: use --device cpu")
    count = torch.cuda.device_count()
    if index >= count:
        if text.startswith("cuda:"):
            raise UsageError(
                f"--device {text} but this machine has {count} CUDA device(s): use cuda:0 to cuda:{count - 1}"
            )
        raise UsageError(
            f"LOCAL_RANK is {index} but this node has {count} CUDA device(s): start at most {count} processes per node"
        )
    return torch.device("cuda", index)


def cuda_index(text: str) -> int:
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise UsageError(f"unknown --device {text!r}: use auto, cpu, cuda or cuda:N")


def dtype_option(name: str | None) -> torch.dtype | None:
    """--dtype as a torch dtype (None when not given)."""
    return None if name is None else mp.FLOAT_DTYPES[name]


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, else bfloat16 on CUDA and float32 on the CPU."""
    return dtype_option(name) or mp.default_dtype(device)


def describe(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)', 'cpu (8 threads)': the device a run's config.json records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
