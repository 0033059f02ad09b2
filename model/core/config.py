"""Model configuration, read from the authors' `config.json` (a LlamaConfig with extra memory fields)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MemoryKind = Literal["memoryllm", "mplus"]


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from, as the zoo filled it in: the name or path it was loaded by (`source`),
    its checkpoint directory and revision, a label for the user ("untrained: ..."), whether its checkpoint
    carries a drop generator, and the dtype its sessions keep rows in unless told otherwise."""

    source: str = ""
    label: str = ""
    path: str | None = None
    revision: str | None = None
    carried_state: bool = False
    storage_dtype: str = "bfloat16"


@dataclass(frozen=True)
class RopeConfig:
    """Which rotary-embedding variant a checkpoint needs (docs/algorithm.md §4.4).

    kind: "default" (plain), "linear" (positions divided by `factor`), "llama3" (Llama-3.1 frequency
    smoothing) or "interpolated" (MemoryLLM-7B: positions times `max_pos / max(max_pos, (blocks+1)*K)`).
    inv_freq_dtype: "bfloat16" rounds the inverse frequencies to bf16 as the authors' M+ usage does.
    """

    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear and llama3
    # llama3: frequencies of wavelengths over original_max_position_embeddings / low_freq_factor are divided by
    # factor, those under original_max_position_embeddings / high_freq_factor kept, the band between blended
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    position_scale: float = 1.0  # interpolated
    inv_freq_dtype: str = "float32"


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    decoder_adapter: bool

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class TrainingFreeConfig:
    """The training-free memory of a plain pretrained Llama (see model.policies.training_free): `capacity` short-term
    rows per layer, evicted (and, M+, `retrieved` rows read back) in blocks of `block` consecutive tokens."""

    capacity: int
    retrieved: int
    block: int


@dataclass(frozen=True)
class ModelConfig:
    """Everything the core needs to build a MemoryLLM / M+ model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    num_tokens: int  # K: rows written per injection by the authors' models (0: training-free memory)
    num_blocks: int  # the authors' memory rows per layer = num_blocks * K (M+: includes the LTM blocks)
    kind: MemoryKind = "memoryllm"
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = False
    tie_word_embeddings: bool = False
    lora: LoraConfig | None = None
    # M+ only (docs/algorithm.md §2.5)
    num_ltm_blocks: int = 0  # blocks of K rows read back from the LTM per layer (T = num_ltm_blocks * K)
    ltm_initial_size: int = 0  # LTM rows per layer in the checkpoint
    selector_hidden_dim: int = 0  # width of the retrievers' query and key projections
    num_selector_layers: int = 2  # 1: one Linear; 2: Linear, activation, Linear
    update_ltm_frequency: int = 0  # injections between merges of the dropped rows into the LTM
    decay_frequency: float = 1.0  # subtracted from every LTM row's recall frequency at each merge
    initial_rf_when_moving_stm_to_ltm: float = 10.0  # recall frequency of a row entering the LTM
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    training_free: TrainingFreeConfig | None = None  # a plain Llama's layer inputs as memory (the demo)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def memory_rows(self) -> int:
        """Short-term rows per layer (M+: excluding the retrieved LTM rows); training-free: the capacity."""
        if self.training_free is not None:
            return self.training_free.capacity
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def ltm_rows_retrieved(self) -> int:
        """T: long-term rows an M+ question reads per layer (training-free: at most T)."""
        if self.training_free is not None:
            return self.training_free.retrieved
        return self.num_ltm_blocks * self.num_tokens

    @property
    def context_window(self) -> int | None:
        """The positions the model attends over: config.json's max_position_embeddings, stretched by a linear
        RoPE factor or MemoryLLM-7B's position interpolation; None if the config does not say."""
        window = self.raw.get("max_position_embeddings")
        if window is None:
            return None
        rope = self.rope
        return round(int(window) * (rope.factor if rope.kind == "linear" else 1.0) / rope.position_scale)

    def fingerprint(self) -> str:
        """A short stable hash of the architecture (sessions are bound to it). A training-free config hashes
        as the fields that described it before it had its own, so sessions made then still open; the M+
        flavour's memory was redesigned (a window and lexical block retrieval), so its hash says so and the
        sessions of the old design are refused rather than misread."""
        fields = dataclasses.asdict(self) | {"raw": None}
        free = fields.pop("training_free")
        if free is not None:
            block = free["block"]
            fields |= {
                "num_tokens": block,
                "num_blocks": (free["capacity"] + free["retrieved"]) // block,
                "num_ltm_blocks": free["retrieved"] // block,
            }
            if self.kind == "mplus":
                fields["retrieval"] = "oldest-out window, lexical blocks"
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rope_from_hf(cfg: dict[str, Any], kind: MemoryKind) -> RopeConfig:
    """Pick the RoPE variant the authors' code would use for this config."""
    theta = float(cfg.get("rope_theta", 10000.0))
    if cfg.get("interpolate_position_ids"):  # MemoryLLM-7B code path; theta is hard-coded there
        max_pos = int(cfg["max_position_embeddings"])
        covered = (int(cfg["num_blocks"]) + 1) * int(cfg["num_tokens"])
        return RopeConfig(kind="interpolated", theta=10000.0, position_scale=max_pos / max(max_pos, covered))
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    theta = float(scaling.get("rope_theta", theta))
    if rope_type in (None, "default"):
        return RopeConfig(kind="default", theta=theta)
    if rope_type == "linear":
        return RopeConfig(kind="linear", theta=theta, factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeConfig(
            kind="llama3",
            theta=theta,
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            # The authors' M+ README casts the whole model (inv_freq included) to bf16.
            inv_freq_dtype="bfloat16" if kind == "mplus" else "float32",
        )
    raise ValueError(f"unsupported rope scaling type {rope_type!r}: expected default, linear or llama3")


def _lora_from_hf(cfg: dict[str, Any]) -> LoraConfig | None:
    lc = cfg.get("lora_config")
    if not lc:
        return None
    return LoraConfig(
        r=int(lc["r"]),
        alpha=float(lc["lora_alpha"]),
        target_modules=tuple(lc["target_modules"]),
        decoder_adapter=bool(cfg.get("add_decoder_lora", False)),
    )


def llama_trunk(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of the Llama trunk in a config dict (HF names): the one reader of them, for the
    authors' configs and the plain Llama configs of the training-free models."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only silu (SwiGLU) Llama models are supported")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    return {
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_layers": int(cfg["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate the authors' `config.json` dict into a ModelConfig."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_blocks", "num_tokens") if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: not a MemoryLLM / M+ checkpoint config")
    archs = cfg.get("architectures") or []
    kind: MemoryKind = "mplus" if ("MPlus" in archs or "num_ltm_blocks" in cfg) else "memoryllm"
    return ModelConfig(
        **llama_trunk(cfg),
        rope=rope_from_hf(cfg, kind),
        num_tokens=int(cfg["num_tokens"]),
        num_blocks=int(cfg["num_blocks"]),
        kind=kind,
        add_bos_embedding=bool(cfg.get("add_bos_embedding", True)),
        # M+ always drops per layer; MemoryLLM only when the flag says so (7B shares one permutation).
        drop_memory_per_layer=kind == "mplus" or bool(cfg.get("drop_memory_per_layer", False)),
        lora=_lora_from_hf(cfg),
        num_ltm_blocks=int(cfg.get("num_ltm_blocks", 0)) if kind == "mplus" else 0,
        ltm_initial_size=int(cfg.get("ltm_initial_size", 0)),
        selector_hidden_dim=int(cfg.get("selector_hidden_dim", 0)),
        num_selector_layers=int(cfg.get("num_selector_layers", 2)),
        update_ltm_frequency=int(cfg.get("update_ltm_frequency", 0)),
        decay_frequency=float(cfg.get("decay_frequency", 1)),
        initial_rf_when_moving_stm_to_ltm=float(cfg.get("initial_rf_when_moving_stm_to_ltm", 10)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        raw=dict(cfg),
    )


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint directory needs config.json")
    return config_from_hf(json.loads(path.read_text()))
