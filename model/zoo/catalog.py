"""The models `--model` takes by name, and their copies on this machine: the built-in presets, the SmolLM2 demo
(its converted cache) and the authors' checkpoints by alias (the Hugging Face hub cache). Nothing here reaches
the network or loads weights."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.config import ModelConfig, read_config
from ..policies.training_free import TRAINING_FREE_LABEL, config_of_export
from . import smollm2
from .checkpoint import checkpoint_files, is_state_key
from .presets import UNTRAINED_LABEL
from .registry import MODELS, build_model, from_name, repo_id
from .registry import names as registered


@dataclass(frozen=True)
class Entry:
    """One model by name: its memory (kind: memoryllm | mplus; flavour: trained | training-free), its size
    (parameters and bytes on disk, where known), the label its outputs carry, and where it lives."""

    name: str
    kind: str
    flavour: str
    parameters: int | None
    bytes: int | None
    label: str
    where: str
    local: bool  # usable without the network


def names() -> list[str]:
    """Every name `--model` takes: the presets, the demo models, the authors' checkpoint aliases."""
    return list(registered("preset", "training-free", "demo", "hub"))


def flavour(label: str) -> str:
    """trained | training-free, from the label a model or a session's binding carries."""
    return "training-free" if TRAINING_FREE_LABEL in label else "trained"


def entries() -> list[Entry]:
    """Every model by name, the built-in ones first, with what this machine holds of each."""
    found = []
    for name in registered("preset"):
        cfg = from_name(name)
        found.append(Entry(name, cfg.kind, "trained", parameter_count(cfg), None, UNTRAINED_LABEL, "built in", True))
    for name in registered("training-free"):
        label = f"{UNTRAINED_LABEL}; {TRAINING_FREE_LABEL}"
        count = parameter_count(from_name(name))
        found.append(Entry(name, MODELS[name].kind, "training-free", count, None, label, "built in", True))
    found += [demo_entry(name, MODELS[name].kind) for name in registered("demo")]
    cached = hub_cache()
    for name in registered("hub"):
        snapshot, size = cached.get(repo_id(name), (None, None))
        where = str(snapshot) if snapshot else f"hub {repo_id(name)} (not downloaded)"
        count = weights_parameters(snapshot) if snapshot else None
        found.append(Entry(name, MODELS[name].kind, "trained", count, size, "", where, snapshot is not None))
    return found


def demo_entry(name: str, kind: str) -> Entry:
    """The SmolLM2 demo: its converted cache, else the GGUF file it is converted from on first use."""
    directory = smollm2.cache_root() / smollm2.CACHE_NAME
    if (directory / "config.json").is_file():
        size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        return Entry(
            name, kind, "training-free", weights_parameters(directory), size, TRAINING_FREE_LABEL, str(directory), True
        )
    try:
        gguf = smollm2.gguf_path()
    except FileNotFoundError:
        where = f"not installed: {smollm2.INSTALL_HINT}"
        return Entry(name, kind, "training-free", None, None, TRAINING_FREE_LABEL, where, False)
    where = f"{gguf} (converted on first use)"
    return Entry(name, kind, "training-free", None, gguf.stat().st_size, TRAINING_FREE_LABEL, where, True)


def hub_cache() -> dict[str, tuple[Path, int]]:
    """repo id -> (snapshot directory, bytes on disk) of the aliases' repos in the local hub cache (the
    revision `main` points to, else the newest)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache the downloads use (scan_cache_dir's default is the one set at import)
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError, ValueError):  # no cache, or not a directory
        return {}
    wanted = {repo_id(name) for name in registered("hub")}
    found = {}
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id not in wanted or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        found[repo.repo_id] = (Path(revision.snapshot_path), repo.size_on_disk)
    return found


def parameter_count(cfg: ModelConfig) -> int:
    """The parameters of a model of `cfg` (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


def weights_parameters(directory: Path) -> int | None:
    """The elements of a checkpoint's weight tensors (its memory excluded), read from the safetensors headers;
    None without weights."""
    try:
        total = 0
        for path in checkpoint_files(directory):
            with safe_open(str(path), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not is_state_key(k))
        return total
    except (OSError, ValueError):
        return None


def model_config(name: str) -> ModelConfig | None:
    """The config of a model (a name, a checkpoint directory or a hub id) from what this machine holds, without
    weights or the network; None where it holds nothing."""
    if name in registered("preset", "training-free"):
        return from_name(name)
    if name in registered("demo"):
        path = smollm2.cache_root() / smollm2.CACHE_NAME / "config.json"
        return from_name(name, json.loads(path.read_text())) if path.is_file() else None
    directory = Path(name).expanduser()
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(repo_id(name), "config.json")
        except ValueError:  # not a hub id
            return None
        if not isinstance(cached, str):
            return None
        directory = Path(cached).parent
    try:
        raw = json.loads((directory / "config.json").read_text())
        return config_of_export(raw) if "mplus_training_free" in raw else read_config(directory)
    except (OSError, ValueError, KeyError):
        return None
