"""Which part of a sweep this process runs, read from the launcher that started it.

- torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): rank r runs shard r+1
  of WORLD_SIZE into OUT/shard-<r+1>-of-<n> on its own device; after a torch.distributed barrier (gloo on
  the CPU, nccl on CUDA) rank 0 merges the shards into OUT.
- a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, _MIN, _STEP): task k of n runs shard k
  into OUT/shard-<k>-of-<n>; `mplus bench merge` combines the shard directories afterwards.
- neither (or a single process): the whole sweep, or the slice that --shard i/n names, into OUT.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

TORCHRUN, SLURM = "torchrun", "slurm"
BARRIER_TIMEOUT = timedelta(days=7)  # the fastest rank waits at the barrier for the slowest one's whole shard


class LaunchError(ValueError):
    """The launcher's environment does not describe one way to shard the run."""


@dataclass(frozen=True)
class Launch:
    launcher: str = ""  # TORCHRUN, SLURM, or "" for one process
    index: int = 1  # this process's shard, 1-based
    count: int = 1
    local_rank: int = 0  # torchrun: this process's GPU on its node

    @property
    def group(self) -> bool:
        """Whether the shards are processes that meet at a barrier (torchrun)."""
        return self.launcher == TORCHRUN

    @property
    def merges(self) -> bool:
        """Whether this process merges the shards once all are done (torchrun's rank 0)."""
        return self.group and self.index == 1

    def directory(self, out: Path) -> Path:
        """Where this process writes: OUT itself, or its shard's directory under a launcher."""
        return out / shard_name(self.index, self.count) if self.launcher else out

    def directories(self, out: Path) -> list[Path]:
        """Every shard's directory under OUT, in shard order."""
        return [out / shard_name(i, self.count) for i in range(1, self.count + 1)]


def shard_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def detect(env: Mapping[str, str] = os.environ) -> Launch:
    """The launch that `env` describes; torchrun with one process, or an array of one task, is one process."""
    world, tasks = number(env, "WORLD_SIZE", 1), number(env, "SLURM_ARRAY_TASK_COUNT", 1)
    if world > 1 and tasks > 1:
        raise LaunchError(
            f"both torchrun (WORLD_SIZE={world}) and a Slurm array ({tasks} tasks) shard this run: "
            "run one process per array task, or torchrun in a job without --array"
        )
    if world > 1:
        return Launch(TORCHRUN, number(env, "RANK") + 1, world, number(env, "LOCAL_RANK", 0))
    if tasks > 1:
        return Launch(SLURM, slurm_task(env, tasks), tasks)
    return Launch()


def number(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={text}: the launcher's environment is incomplete, start the job again") from None


def slurm_task(env: Mapping[str, str], tasks: int) -> int:
    """The 1-based position of this task in its array (an array with gaps cannot be cut into n shards)."""
    offset = number(env, "SLURM_ARRAY_TASK_ID") - number(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = number(env, "SLURM_ARRAY_TASK_STEP", 1)
    if step < 1 or offset % step or not 0 <= offset // step < tasks:
        raise LaunchError(
            f"Slurm array task {env['SLURM_ARRAY_TASK_ID']} is not one of {tasks} evenly spaced tasks: "
            "submit a contiguous array such as --array=0-7"
        )
    return offset // step + 1


@contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[None]:
    """torch.distributed's default group for a torchrun launch (nccl on CUDA, gloo on the CPU); nothing else."""
    if not launch.group:
        yield
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(launch: Launch, device: torch.device) -> None:
    """Wait until every rank of a torchrun launch gets here."""
    if launch.group:
        import torch.distributed as dist

        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
