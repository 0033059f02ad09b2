"""config_from_hf / read_config / rope_from_hf: translating the authors' config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.core.config import ModelConfig, RopeConfig, config_from_hf, read_config, rope_from_hf
from model.zoo.registry import TINY_CONFIG as TINY
from model.zoo.registry import TINY_MPLUS_CONFIG as TINY_MPLUS

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"


def base(**overrides: Any) -> dict[str, Any]:
    """A minimal MemoryLLM config.json dict (no LoRA, default rope)."""
    cfg = {
        "architectures": ["MemoryLLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_blocks": 4,
        "num_tokens": 8,
        "max_position_embeddings": 4096,
    }
    return cfg | overrides


# -- kind detection -------------------------------------------------------------------------------------


def test_memoryllm_kind_and_defaults():
    cfg = config_from_hf(base())
    assert cfg.kind == "memoryllm"
    assert (cfg.num_kv_heads, cfg.head_dim) == (4, 16)  # no kv heads / head_dim: heads and hidden / heads
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope == RopeConfig(kind="default", theta=10000.0)
    assert cfg.lora is None and cfg.add_bos_embedding and not cfg.tie_word_embeddings
    assert not cfg.drop_memory_per_layer  # MemoryLLM-7B style: one shared permutation unless flagged
    assert cfg.num_ltm_blocks == 0


def test_mplus_detected_by_architecture():
    cfg = config_from_hf(base(architectures=["MPlus"], num_ltm_blocks=1))
    assert cfg.kind == "mplus" and cfg.num_ltm_blocks == 1
    assert cfg.drop_memory_per_layer  # M+ always drops per layer


def test_mplus_detected_by_ltm_field():
    cfg = config_from_hf(base(num_ltm_blocks=2))  # architectures still say MemoryLLM
    assert cfg.kind == "mplus" and cfg.num_ltm_blocks == 2


def test_memoryllm_ignores_mplus_only_counts():
    """A MemoryLLM config never gets LTM blocks (memory_rows would shrink otherwise)."""
    cfg = config_from_hf(base(drop_memory_per_layer=True))
    assert cfg.kind == "memoryllm" and cfg.drop_memory_per_layer and cfg.num_ltm_blocks == 0


def test_tiny_shapes_kinds():
    assert config_from_hf(TINY).kind == "memoryllm"
    assert config_from_hf(TINY_MPLUS).kind == "mplus"


def test_explicit_sizes_are_read():
    cfg = config_from_hf(
        base(num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=True, add_bos_embedding=False)
    )
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps) == (2, 32, 1e-5)
    assert cfg.tie_word_embeddings and not cfg.add_bos_embedding


def test_mplus_fields():
    cfg = config_from_hf(TINY_MPLUS)
    assert (cfg.selector_hidden_dim, cfg.num_selector_layers, cfg.update_ltm_frequency) == (16, 2, 4)
    assert (cfg.ltm_initial_size, cfg.decay_frequency, cfg.initial_rf_when_moving_stm_to_ltm) == (48, 1.0, 10.0)
    assert cfg.eos_token_id == 256 and cfg.bos_token_id is None


# -- memory sizes --------------------------------------------------------------------------------------------


def test_memory_rows_memoryllm():
    cfg = config_from_hf(base(num_blocks=5, num_tokens=8))
    assert cfg.memory_rows == 40 and cfg.ltm_rows_retrieved == 0


def test_memory_rows_mplus_excludes_ltm_blocks():
    cfg = config_from_hf(base(architectures=["MPlus"], num_blocks=10, num_tokens=16, num_ltm_blocks=2))
    assert cfg.memory_rows == 8 * 16
    assert cfg.ltm_rows_retrieved == 2 * 16


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", [["hidden_size"], ["num_blocks", "num_tokens"], ["num_hidden_layers"]])
def test_missing_fields_are_named(dropped):
    cfg = {k: v for k, v in base().items() if k not in dropped}
    with pytest.raises(ValueError, match="not a MemoryLLM / M\\+ checkpoint config") as err:
        config_from_hf(cfg)
    for name in dropped:
        assert name in str(err.value)


def test_plain_llama_config_is_rejected():
    llama = {k: v for k, v in base().items() if k not in ("num_blocks", "num_tokens")}
    with pytest.raises(ValueError, match="num_blocks, num_tokens"):
        config_from_hf(llama)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_unsupported_activation(act):
    with pytest.raises(ValueError, match=f"unsupported hidden_act '{act}'"):
        config_from_hf(base(hidden_act=act))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_type(rope_type):
    with pytest.raises(ValueError, match=f"unsupported rope scaling type '{rope_type}'"):
        config_from_hf(base(rope_scaling={"rope_type": rope_type, "factor": 2.0}))


# -- rope -------------------------------------------------------------------------------------------------


def test_rope_theta_and_none_scaling():
    assert rope_from_hf(base(rope_theta=500000.0, rope_scaling=None), "memoryllm") == RopeConfig(theta=500000.0)


@pytest.mark.parametrize("key", ["rope_type", "type"])  # new and legacy spelling
def test_linear_rope(key):
    rope = rope_from_hf(base(rope_theta=500000.0, rope_scaling={key: "linear", "factor": 1.8125}), "memoryllm")
    assert (rope.kind, rope.theta, rope.factor) == ("linear", 500000.0, 1.8125)


def test_rope_parameters_carry_theta():
    """transformers-5 style: rope_parameters with rope_theta inside wins over the top-level field."""
    cfg = base(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    assert rope_from_hf(cfg, "memoryllm") == RopeConfig(kind="default", theta=123456.0)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(("kind", "dtype"), [("memoryllm", "float32"), ("mplus", "bfloat16")])
def test_llama3_rope(kind, dtype):
    rope = rope_from_hf(base(rope_theta=500000.0, rope_scaling=LLAMA3), kind)
    assert rope == RopeConfig(
        kind="llama3",
        theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        inv_freq_dtype=dtype,
    )


def test_llama3_dtype_follows_detected_kind():
    cfg = config_from_hf(base(architectures=["MPlus"], num_ltm_blocks=1, rope_scaling=LLAMA3))
    assert cfg.rope.inv_freq_dtype == "bfloat16"


def test_llama3_missing_parameter():
    with pytest.raises(KeyError, match="low_freq_factor"):
        rope_from_hf(base(rope_scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}), "memoryllm")


@pytest.mark.parametrize(
    ("blocks", "tokens", "max_pos", "scale"),
    [
        (30, 256, 4096, 4096 / 7936),  # MemoryLLM-7B sizes: (30 + 1) * 256 positions squeezed into 4096
        (4, 8, 21, 21 / 40),  # the memoryllm7b fixture
        (4, 8, 4096, 1.0),  # enough positions: no squeeze
    ],
)
def test_interpolated_positions(blocks, tokens, max_pos, scale):
    cfg = base(
        interpolate_position_ids=True,
        num_blocks=blocks,
        num_tokens=tokens,
        max_position_embeddings=max_pos,
        rope_theta=500000.0,  # ignored: the authors' 7B code hard-codes 10000
        rope_scaling={"rope_type": "linear", "factor": 2.0},  # ignored too
    )
    rope = config_from_hf(cfg).rope
    assert rope.kind == "interpolated" and rope.theta == 10000.0
    assert rope.position_scale == pytest.approx(scale, rel=1e-12)


# -- LoRA ----------------------------------------------------------------------------------------------------


def test_lora_parsing_and_scaling():
    lora_config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    lora = config_from_hf(base(lora_config=lora_config, add_decoder_lora=True)).lora
    assert lora is not None
    assert (lora.r, lora.alpha, lora.target_modules, lora.decoder_adapter) == (4, 8.0, ("q_proj", "v_proj"), True)
    assert lora.scaling == 2.0


def test_lora_without_decoder_adapter():
    lora_config = {"r": 16, "lora_alpha": 4, "target_modules": ["k_proj"]}
    lora = config_from_hf(base(lora_config=lora_config)).lora
    assert lora is not None and not lora.decoder_adapter and lora.scaling == 0.25


@pytest.mark.parametrize("value", [None, {}])
def test_no_lora(value):
    assert config_from_hf(base(lora_config=value, add_decoder_lora=True)).lora is None


# -- fingerprint ---------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_equal_configs():
    a, b = config_from_hf(TINY), config_from_hf(dict(TINY))
    assert a == b and a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0


def test_fingerprint_ignores_raw_extras():
    """`raw` (the whole config.json) is excluded: unused keys do not rebind sessions."""
    plain = config_from_hf(TINY)
    extra = config_from_hf(TINY | {"transformers_version": "9.9", "mplus_preset": "other", "x": [1]})
    assert extra.raw != plain.raw
    assert extra.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_size": 128, "head_dim": 32},
        {"num_hidden_layers": 3},
        {"num_key_value_heads": 4},
        {"num_blocks": 9},
        {"num_tokens": 8},
        {"rope_theta": 500000.0},
        {"rms_norm_eps": 1e-6},
        {"add_decoder_lora": False},
        {"lora_config": None},
        {"architectures": ["MPlus"]},
    ],
)
def test_fingerprint_changes_with_architecture(change):
    assert config_from_hf(TINY | change).fingerprint() != config_from_hf(TINY).fingerprint()


def test_fingerprint_is_a_pure_function_of_fields():
    """Rebuilt from its fields (raw dropped), a config keeps its fingerprint."""
    cfg = config_from_hf(TINY_MPLUS)
    fields = {k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__ if k != "raw"}
    assert ModelConfig(**fields).fingerprint() == cfg.fingerprint()


# -- read_config ----------------------------------------------------------------------------------------------


def test_read_config_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path / "nowhere")


def test_read_config_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        read_config(tmp_path)


def test_read_config_roundtrip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_MPLUS))
    cfg = read_config(tmp_path)
    assert cfg == config_from_hf(TINY_MPLUS) and cfg.raw == TINY_MPLUS
    assert read_config(str(tmp_path)) == cfg


@pytest.mark.parametrize(
    ("name", "kind", "rope_kind"),
    [
        ("memoryllm", "memoryllm", "default"),
        ("memoryllm7b", "memoryllm", "interpolated"),
        ("memoryllm_lora", "memoryllm", "linear"),
        ("mplus", "mplus", "default"),
        ("mplus_lora_llama3rope", "mplus", "llama3"),
    ],
)
def test_read_fixture_configs(name, kind, rope_kind):
    directory = FIXTURES / name / "model"
    if not (directory / "config.json").is_file():
        pytest.skip(f"fixture {name} not present")
    cfg = read_config(directory)
    assert cfg.kind == kind and cfg.rope.kind == rope_kind
    assert (cfg.lora is not None) == name.endswith(("_lora", "_lora_llama3rope"))
    if rope_kind == "llama3":
        assert cfg.rope.inv_freq_dtype == "bfloat16"  # M+ casts inv_freq with the model
