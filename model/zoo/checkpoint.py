"""Load and save checkpoints in the authors' layout: config.json + (sharded) safetensors, loud on any key.

Parameter names follow the authors' classes: the Llama trunk under `model.`, PEFT-style LoRA
(`X.base_layer.weight`, `X.lora_A.default.weight`, `X.lora_B.decoder_adapter.weight`), and the memory
tensors (`memory`, `bos_embedding`, `new_memory_positional_emb`, `initialized`). M+ adds per-layer
selectors (`model.layers.{l}.self_attn.{query_proj,key_proj,encoder_query_proj}.*`) and the long-term
memory (`ltm.{l}`, `ltm_keys.{l}`, `ltm_recall_frequencies.{l}`, `ltm_ages.{l}`; sizes differ per layer)
and has no `initialized`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.config import ModelConfig, read_config
from ..core.layers import DECODER, ENCODER
from ..core.memoryllm import MemoryLLM
from ..memory.dtypes import dtype_name
from ..memory.ltm import CACHE_KEYS, LongTermMemory, layer_keys
from ..memory.provenance import Origins
from ..memory.state import MemoryState, stm_rows
from ..policies.training_free import COMPUTED, config_of_export, training_free_config
from .registry import aligned, build_model, build_training_free, repo_id, unknown_model

ADAPTER_NAMES = {"default": ENCODER, "decoder_adapter": DECODER}  # authors' name -> ours
STATE_KEYS = {"memory", "initialized"}  # checkpoint tensors that become the MemoryState (M+: and the LTM)
LTM_KEY = re.compile(r"ltm(_keys|_recall_frequencies|_ages)?\.\d+")
SHARD_SIZE = 2 * 1024**3
SAVED_MARKER = "mplus_checkpoint.json"  # written last by save_checkpoint: the files it wrote
CARRIED_STATE = "mplus_state.safetensors"  # beside the authors' files: what a state needs to continue exactly


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes."""


def to_module_key(key: str) -> str:
    """Authors' parameter name -> our module parameter name."""
    key = key.replace(".base_layer.weight", ".weight")
    match = re.fullmatch(r"(.*)\.lora_([AB])\.([\w]+)\.weight", key)
    if match and match.group(3) in ADAPTER_NAMES:
        return f"{match.group(1)}.lora_{match.group(2)}.{ADAPTER_NAMES[match.group(3)]}"
    return key


def to_checkpoint_key(key: str, lora_wrapped: set[str]) -> str:
    """Our module parameter name -> authors' name (`lora_wrapped` = our Linear modules with adapters)."""
    match = re.fullmatch(r"(.*)\.lora_([AB])\.(\w+)", key)
    if match:
        authors = {v: k for k, v in ADAPTER_NAMES.items()}[match.group(3)]
        return f"{match.group(1)}.lora_{match.group(2)}.{authors}.weight"
    module = key.removesuffix(".weight")
    return f"{module}.base_layer.weight" if module in lora_wrapped else key


def _lora_wrapped(model: MemoryLLM) -> set[str]:
    return {name for name, mod in model.named_modules() if getattr(mod, "lora_A", None)}


def _weight_roots(directory: Path) -> list[Path]:
    """Where index entries may lead: into the directory, and for a hub cache snapshot (whose files link to
    `../../blobs/`) into its repository's blobs."""
    real = directory.resolve()
    return [real, real.parent.parent / "blobs"] if real.parent.name == "snapshots" else [real]


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded via the index, or a single file); an index
    entry that leads outside the directory (`..`, an absolute path, a symlink) is refused."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        roots = _weight_roots(directory)
        for name in sorted(set(weight_map.values())):
            if not any((directory / name).resolve().is_relative_to(root) for root in roots):
                key = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(
                    f"checkpoint {directory}: its index maps {key} to {name}, outside the checkpoint directory;"
                    " refusing to read it (keep every shard inside the directory)"
                )
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to safetensors)"
    raise FileNotFoundError(f"no safetensors weights in {directory}" + (hint if pickles else ""))


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, path


def is_state_key(key: str) -> bool:
    """Checkpoint tensors that become the MemoryState rather than module parameters."""
    return key in STATE_KEYS or LTM_KEY.fullmatch(key) is not None


def expected_keys(model: MemoryLLM) -> dict[str, tuple[int | None, ...]]:
    """Authors' key -> shape for every tensor the checkpoint must hold (None: any size, the LTM rows)."""
    wrapped = _lora_wrapped(model)
    shapes = {to_checkpoint_key(k, wrapped): tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = model.cfg
    shapes["memory"] = (cfg.num_layers, cfg.memory_rows, cfg.hidden_size)
    if cfg.kind == "memoryllm":
        shapes["initialized"] = ()
        return shapes
    for layer in range(cfg.num_layers):
        rows, keys, rf, ages = layer_keys(layer)
        shapes |= {rows: (None, cfg.hidden_size), keys: (None, cfg.selector_hidden_dim), rf: (None,), ages: (None,)}
    return shapes


def _shape_fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected, strict=True))


def _uneven_ltm(tensors: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """Layers whose four LTM tensors disagree on the number of rows."""
    problems = []
    for layer in range(num_layers):
        names = layer_keys(layer)
        if len({tensors[name].shape[0] for name in names}) > 1:
            shapes = ", ".join(f"{name} {tuple(tensors[name].shape)}" for name in names)
            problems.append(f"{shapes} (row counts differ)")
    return problems


def _ignorable(key: str, cfg: ModelConfig) -> bool:
    """Keys that carry nothing we need: a tied lm_head copy, rotary caches of old transformers, and
    M+'s `initialized` (a Python attribute there, not state)."""
    return (
        (key == "lm_head.weight" and cfg.tie_word_embeddings)
        or key.endswith("rotary_emb.inv_freq")
        or (key == "initialized" and cfg.kind == "mplus")
    )


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id (aliases: memoryllm-7b, memoryllm-8b, ...) from the HF cache, downloaded
    there first when the hub is reachable (see model.zoo.hub: offline, or unreachable, it is one line that says how
    to proceed). An unknown name's error lists the models, with the closest one."""
    from .hub import HUB_ID, snapshot

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file: pass the checkpoint directory that holds config.json")
    repo = repo_id(name_or_path)
    if not HUB_ID.fullmatch(repo):
        if name_or_path.startswith(("/", "~", ".")) or "/" in name_or_path:
            raise FileNotFoundError(f"no checkpoint directory {name_or_path}")
        raise FileNotFoundError(unknown_model(name_or_path))
    return snapshot(repo, revision)


def load_checkpoint(
    directory: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    rope_inv_freq_dtype: str | None = None,
) -> MemoryLLM:
    """Build the model from config.json and fill every parameter; raise CheckpointError naming each
    missing, unused or mis-shaped key."""
    raw = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    if "mplus_training_free" in raw:
        return load_training_free(directory, config_of_export(raw), dtype, device)
    if is_plain_causal_lm(raw):  # the base model without memory (the papers' baselines); training-free memory
        return load_training_free(directory, training_free_config(plain_llama(directory, raw)), dtype, device)
    cfg = read_config(directory)
    if rope_inv_freq_dtype is not None:
        cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, inv_freq_dtype=rope_inv_freq_dtype))
    with torch.device("meta"):
        model = build_model(cfg)
    expected = expected_keys(model)
    located = dict(iter_tensors(checkpoint_files(directory)))
    missing = sorted(set(expected) - set(located) - {"initialized"})
    unused = sorted(k for k in set(located) - set(expected) if not _ignorable(k, cfg))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unused:
        problems.append(f"unused keys: {', '.join(unused)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config.json; " + "; ".join(problems))

    tensors, wrong_shapes = {}, []
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        if key in located:
            by_file.setdefault(located[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                if not _shape_fits(tuple(t.shape), expected[key]):
                    wrong_shapes.append(f"{key} {tuple(t.shape)} (expected {expected[key]})")
                if t.is_floating_point() and not is_state_key(key):
                    t = aligned(t.to(device=device, dtype=dtype))
                tensors[key] = t
    if cfg.kind == "mplus" and not wrong_shapes:
        wrong_shapes = _uneven_ltm(tensors, cfg.num_layers)
    if wrong_shapes:
        raise CheckpointError(f"checkpoint {directory} has wrongly shaped tensors: {', '.join(wrong_shapes)}")

    state_dict = {to_module_key(k): v for k, v in tensors.items() if not is_state_key(k)}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.initial_state = checkpoint_state(directory, cfg, tensors, dtype, device)
    return model


def is_plain_causal_lm(raw: dict) -> bool:
    """A Hugging Face causal LM's config.json (no memory settings of the authors' or ours)."""
    return "num_blocks" not in raw and any(arch.endswith("ForCausalLM") for arch in raw.get("architectures") or [])


def plain_llama(directory: Path, raw: dict) -> dict:
    """The Llama config of a plain causal LM checkpoint; a CheckpointError for another architecture."""
    if raw.get("model_type") != "llama":
        raise CheckpointError(
            f"checkpoint {directory} is a {raw.get('model_type')!r} model: a plain causal LM runs here only with"
            " the Llama architecture (model_type llama: Llama 2 / 3, SmolLM2, ...)"
        )
    if raw.get("bos_token_id") is None:
        raise CheckpointError(f"checkpoint {directory}: config.json has no bos_token_id (the memory's first row)")
    return raw


def load_training_free(directory: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> MemoryLLM:
    """A model with training-free memory over Llama weights: one that save_checkpoint exported (its memory
    included) or a plain causal LM checkpoint (an empty memory)."""
    tensors = {}
    for path in checkpoint_files(directory):
        with safe_open(str(path), framework="pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    weights = {to_module_key(k): v for k, v in tensors.items() if not is_state_key(k) and not _ignorable(k, cfg)}
    model = build_training_free(cfg, {k: v for k, v in weights.items() if k not in COMPUTED}, dtype, device)
    if "memory" in tensors:
        model.initial_state = checkpoint_state(directory, cfg, tensors, dtype, device, key_dtype=torch.float32)
    return model


def checkpoint_state(
    directory: Path,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    key_dtype: torch.dtype | None = None,
) -> MemoryState:
    """The memory a checkpoint holds, with what it carries beside the authors' layout (CARRIED_STATE: the
    drop generator, counters, M+ short-term ages and cache) when it has it; else as the authors load it."""
    memory = tensors["memory"].to(device=device, dtype=dtype)
    carried, meta = read_carried(directory)
    state = MemoryState(memory=memory, initialized=bool(meta.get("initialized", True)))
    if "initialized" in tensors:
        state.initialized = bool(tensors["initialized"].item())
    if cfg.kind == "mplus":
        L, N = memory.shape[:2]
        state.memory_ages = carried.get("memory_ages", torch.zeros(L, N, dtype=torch.int64))
        update_step = int(meta.get("update_step", 0))
        space = stm_rows(memory)
        state.ltm = LongTermMemory.from_checkpoint(tensors, L, dtype, space, carried, update_step, key_dtype)
        state.next_row_id = state.ltm.rows.end
    if "generator_state" in carried:
        state.generator.set_state(carried["generator_state"])
    if "row_origins" in carried:  # rows numbered as `saved_row_ids` lays them out
        state.origins = Origins.of_rows(torch.arange(carried["row_origins"].shape[0]), carried["row_origins"])
    state.injections, state.tokens_injected = int(meta.get("injections", 0)), int(meta.get("tokens_injected", 0))
    return state


def carried_tensors(state: MemoryState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a checkpoint carries beside the authors' layout so that its memory continues exactly like the
    state: the drop generator and counters; M+: the short-term ages, the exact recall frequencies (the
    layout has float32), the dropped-row cache and its step."""
    tensors = {"generator_state": state.generator.get_state()}
    if len(state.origins):
        tensors["row_origins"] = state.origins.lookup(state.saved_row_ids()).to(torch.int32)  # [m, 3]
    meta = {"injections": state.injections, "tokens_injected": state.tokens_injected, "initialized": state.initialized}
    if state.ltm is not None:
        ltm = state.ltm
        tensors |= {"memory_ages": state.memory_ages} | dict(zip(CACHE_KEYS, ltm.cache_tuple(), strict=True))
        tensors |= {f"ltm_recall_frequencies_exact.{i}": x.recall_frequencies for i, x in enumerate(ltm.layers)}
        meta["update_step"] = ltm.update_step
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}, meta


def read_carried(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = directory / CARRIED_STATE
    if not path.is_file():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["mplus.carried"])  # noqa: SIM118


def save_checkpoint(model: MemoryLLM, state: MemoryState, directory: str | Path) -> Path:
    """Write model + `state` memory in the authors' layout (config.json, sharded safetensors + index).

    M+: the LTM is written as the authors store it (recall frequencies and ages as float32). The pending
    dropped-row cache, the STM ages and `update_step` are not part of that layout (the authors' code starts
    them empty / zero at load): they, the drop generator and the counters go into CARRIED_STATE beside it,
    so that the loaded memory continues exactly like `state`. Last comes a marker,
    mplus_checkpoint.json, listing the files written (see is_saved_checkpoint).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped = _lora_wrapped(model)
    tensors = {to_checkpoint_key(k, wrapped): v for k, v in model.state_dict().items()}
    tensors["memory"] = state.memory
    if state.ltm is not None:
        tensors |= state.ltm.checkpoint_tensors()
    else:
        tensors["initialized"] = torch.tensor(int(state.initialized), dtype=torch.uint8)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_SIZE:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().cpu().contiguous()
        size += nbytes
    written = ["config.json"]
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        written.append("model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, name)
            written.append(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        written.append("model.safetensors.index.json")
    carried, meta = carried_tensors(state)
    save_file(carried, directory / CARRIED_STATE, metadata={"mplus.carried": json.dumps(meta)})
    written.append(CARRIED_STATE)
    config = dict(model.cfg.raw)
    config["torch_dtype"] = dtype_name(model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
        written += [Path(path).name for path in model.tokenizer.save_pretrained(directory)]
    (directory / SAVED_MARKER).write_text(json.dumps({"files": sorted(written)}, indent=1))
    return directory


def is_saved_checkpoint(directory: Path) -> bool:
    """A real directory that save_checkpoint wrote and nothing else added to: every entry is a regular file
    that its marker lists."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        listed = {*json.loads((directory / SAVED_MARKER).read_text())["files"], SAVED_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.name in listed and p.is_file() and not p.is_symlink() for p in directory.iterdir())
