"""model/core/rope.py against independently written formulas (float64 references)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import model as mp
from model.core.config import RopeConfig
from model.core.memoryllm import ROPE_TABLE_STEP
from model.core.rope import apply_rope, cos_sin, inverse_frequencies, rope_angles, rope_into

LLAMA31 = RopeConfig(  # the published Llama-3.1 values
    kind="llama3",
    theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
SMALL_LLAMA3 = RopeConfig(  # head_dim 16: one high, one medium and six low frequencies
    kind="llama3", theta=10000.0, factor=8.0, original_max_position_embeddings=32
)


def reference_inv_freq(theta: float, head_dim: int) -> list[float]:
    """theta^(-2i/d) for i < d/2, in Python floats."""
    return [theta ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]


def meta_llama3_scaling(freqs: list[float], rope: RopeConfig) -> list[float]:
    """Meta's `apply_scaling` (llama-models, Llama 3.1), transcribed."""
    old = rope.original_max_position_embeddings
    low_freq_wavelen = old / rope.low_freq_factor
    high_freq_wavelen = old / rope.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / rope.factor)
        else:
            smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
            out.append((1 - smooth) * freq / rope.factor + smooth * freq)
    return out


def as_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- inverse frequencies -----------------------------------------------------------------------------


@pytest.mark.parametrize(("theta", "head_dim"), [(10000.0, 16), (10000.0, 128), (500000.0, 64)])
def test_default_inverse_frequencies(theta, head_dim):
    inv = inverse_frequencies(RopeConfig(theta=theta), head_dim)
    assert inv.dtype == torch.float32 and inv.shape == (head_dim // 2,)
    torch.testing.assert_close(inv.double(), as_tensor(reference_inv_freq(theta, head_dim)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "interpolated"])
def test_position_variants_keep_the_plain_frequencies(kind):
    """linear and interpolated scale positions, not frequencies."""
    rope = RopeConfig(kind=kind, factor=4.0, position_scale=0.5)
    assert torch.equal(inverse_frequencies(rope, 32), inverse_frequencies(RopeConfig(), 32))


@pytest.mark.parametrize(("rope", "head_dim"), [(LLAMA31, 128), (SMALL_LLAMA3, 16)])
def test_llama3_matches_meta_formula(rope, head_dim):
    expected = meta_llama3_scaling(reference_inv_freq(rope.theta, head_dim), rope)
    inv = inverse_frequencies(rope, head_dim)
    torch.testing.assert_close(inv.double(), as_tensor(expected), rtol=1e-6, atol=0)


def test_small_llama3_config_exercises_every_branch():
    """Guard for the test above: high (kept), medium (smoothed) and low (divided) frequencies all occur."""
    plain = inverse_frequencies(RopeConfig(theta=10000.0), 16)
    scaled = inverse_frequencies(SMALL_LLAMA3, 16)
    ratio = (plain / scaled).tolist()
    assert ratio[0] == pytest.approx(1.0)
    assert 1.0 < ratio[1] < 8.0
    assert ratio[2:] == pytest.approx([8.0] * 6)


@pytest.mark.parametrize(("rope", "head_dim"), [(LLAMA31, 128), (SMALL_LLAMA3, 16)])
def test_llama3_matches_transformers(rope, head_dim):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    params = {
        "rope_type": "llama3",
        "factor": rope.factor,
        "low_freq_factor": rope.low_freq_factor,
        "high_freq_factor": rope.high_freq_factor,
        "original_max_position_embeddings": rope.original_max_position_embeddings,
    }
    sizes = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072)
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:  # transformers 5
        config = transformers.LlamaConfig(**sizes, rope_parameters=params | {"rope_theta": rope.theta})
    else:
        config = transformers.LlamaConfig(**sizes, rope_theta=rope.theta, rope_scaling=params)
    hf_inv, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(rope, head_dim), hf_inv.float(), rtol=1e-6, atol=0)


def test_bfloat16_rounding():
    exact = inverse_frequencies(LLAMA31, 128)
    rounded = inverse_frequencies(RopeConfig(**{**LLAMA31.__dict__, "inv_freq_dtype": "bfloat16"}), 128)
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded.to(torch.bfloat16).float(), rounded)  # representable in bf16
    assert not torch.equal(rounded, exact)  # rounding happened
    ulp = torch.exp2(torch.floor(torch.log2(exact.double())) - 7)  # bf16: 8 significant bits
    assert ((rounded.double() - exact.double()).abs() <= ulp / 2).all()  # round to nearest


# -- angles, cos/sin -----------------------------------------------------------------------------------


def reference_angles(rope: RopeConfig, head_dim: int, positions: list[int], scale: float = 1.0) -> torch.Tensor:
    """[S, D/2] float64 angles position * scale * inv_freq."""
    freqs = reference_inv_freq(rope.theta, head_dim)
    return as_tensor([[p * scale * f for f in freqs] for p in positions])


@pytest.mark.parametrize(
    ("rope", "scale"),
    [
        (RopeConfig(), 1.0),
        (RopeConfig(kind="linear", factor=1.8125), 1 / 1.8125),
        (RopeConfig(kind="interpolated", position_scale=21 / 40), 21 / 40),
    ],
)
def test_cos_sin_tables(rope, scale):
    positions = [0, 1, 5, 17, 100, 511]
    cos, sin = cos_sin(rope, inverse_frequencies(rope, 16), torch.tensor(positions), torch.float32)
    assert cos.shape == sin.shape == (6, 16) and cos.dtype == torch.float32
    angles = reference_angles(rope, 16, positions, scale)  # [S, 8]
    emb = torch.cat([angles, angles], dim=-1)  # [S, 16]: the halves share one frequency
    torch.testing.assert_close(cos.double(), emb.cos(), atol=1e-4, rtol=0)
    torch.testing.assert_close(sin.double(), emb.sin(), atol=1e-4, rtol=0)
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))


def test_linear_rope_divides_positions():
    """Linear scaling at position p equals plain RoPE at p / factor (checked where p / factor is an integer)."""
    linear = RopeConfig(kind="linear", factor=4.0)
    inv = inverse_frequencies(linear, 16)
    scaled = rope_angles(linear, inv, torch.tensor([0, 4, 8, 400]))
    plain = rope_angles(RopeConfig(), inv, torch.tensor([0, 1, 2, 100]))
    assert torch.equal(scaled, plain)


def test_cos_sin_cast_to_activation_dtype():
    rope = RopeConfig()
    inv = inverse_frequencies(rope, 16)
    cos32, sin32 = cos_sin(rope, inv, torch.arange(10), torch.float32)
    cos16, sin16 = cos_sin(rope, inv, torch.arange(10), torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))


# -- apply_rope / rope_into ----------------------------------------------------------------------------


def tables(positions: torch.Tensor, head_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    rope = RopeConfig()
    return cos_sin(rope, inverse_frequencies(rope, head_dim), positions, torch.float32)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_apply_rope_is_a_complex_rotation():
    """Pair (x_i, x_{i+D/2}) is the complex number x_i + i x_{i+D/2}, multiplied by exp(i * angle_i)."""
    x = randn(2, 3, 7, 16)  # [B, H, S, D]
    positions = torch.arange(3, 10)
    cos, sin = tables(positions)
    out = apply_rope(x, cos, sin)
    z = torch.complex(x[..., :8].double(), x[..., 8:].double())  # [B, H, S, 8]
    angles = reference_angles(RopeConfig(), 16, list(range(3, 10)))  # [S, 8]
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(out.double(), torch.cat([rotated.real, rotated.imag], dim=-1), atol=1e-5, rtol=0)


def test_apply_rope_preserves_norms():
    x = randn(2, 4, 9, 16)
    cos, sin = tables(torch.arange(1000, 1009))
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    pairs_in = x[..., :8] ** 2 + x[..., 8:] ** 2  # each rotated plane keeps its own norm
    torch.testing.assert_close(out[..., :8] ** 2 + out[..., 8:] ** 2, pairs_in, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("m", "n", "shift"), [(5, 2, 11), (0, 9, 40), (30, 30, 7)])
def test_dot_product_depends_only_on_relative_position(m, n, shift):
    q, k = randn(1, 1, 1, 16, seed=1), randn(1, 1, 1, 16, seed=2)

    def score(pq: int, pk: int) -> float:
        cq, sq = tables(torch.tensor([pq]))
        ck, sk = tables(torch.tensor([pk]))
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert score(m + 3, n) != pytest.approx(score(m, n), abs=1e-2)  # while the distance does matter


def test_rope_into_matches_apply_rope_into_strided_output():
    x = randn(1, 2, 6, 16, seed=3)  # [B, H, S, D]
    cos, sin = tables(torch.arange(20, 26))
    buffer = torch.full((1, 2, 10, 16), float("nan"))  # a wider cache: write positions 2..7
    rope_into(x, cos, sin, buffer[:, :, 2:8])
    torch.testing.assert_close(buffer[:, :, 2:8], apply_rope(x, cos, sin))
    assert buffer[:, :, :2].isnan().all() and buffer[:, :, 8:].isnan().all()  # nothing written outside


def test_rope_into_transposed_out():
    """`out` with other strides (a [B, S, H, D] buffer seen as [B, H, S, D])."""
    x = randn(2, 3, 5, 16, seed=4)
    cos, sin = tables(torch.arange(5))
    storage = torch.zeros(2, 5, 3, 16)
    rope_into(x, cos, sin, storage.transpose(1, 2))
    torch.testing.assert_close(storage.transpose(1, 2), apply_rope(x, cos, sin))


@pytest.mark.parametrize("name", ["tiny", "tiny-mplus", "tiny-free-mplus"])
def test_the_models_rope_table_gives_the_bits_of_cos_sin_for_any_range(name):
    lm, cpu = mp.load(name), torch.device("cpu")
    for start, end in [(0, 5), (3, ROPE_TABLE_STEP + 4), (ROPE_TABLE_STEP - 1, 2 * ROPE_TABLE_STEP + 1), (1, 2)]:
        cos, sin = lm.rope_range(start, end, cpu)
        expected = lm.cos_sin(torch.arange(start, end))
        assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    assert lm.rope_tables[cpu, lm.dtype][0].shape[0] == 3 * ROPE_TABLE_STEP  # grown, never shrunk
