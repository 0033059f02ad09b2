"""model/core/layers.py: RMSNorm, LoRA Linear, attend, KVCache, Attention/Block against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.core.config import config_from_hf
from model.core.layers import (
    DECODER,
    ENCODER,
    Attention,
    Block,
    KVCache,
    Linear,
    Pass,
    RMSNorm,
    attend,
    causal_mask,
    make_linear,
)
from model.core.rope import apply_rope, cos_sin, inverse_frequencies
from model.zoo.registry import TINY_CONFIG as TINY

CPU = torch.device("cpu")


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fill(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise in every parameter (norm weights around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else noise * (p.shape[-1] ** -0.5))
    return module.eval()


# -- RMSNorm --------------------------------------------------------------------------------------------------


def test_rmsnorm_formula():
    norm = fill(RMSNorm(32, eps=1e-5), seed=1)
    norm.weight.data = 1.0 + randn(32, seed=2)
    x = randn(3, 5, 32, seed=3) * 4.0  # [B, S, d]
    x64 = x.double()
    expected = norm.weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_eps_matters_for_small_inputs():
    x = torch.full((1, 4), 1e-3)  # mean square 1e-6, as large as eps
    norm = RMSNorm(4, eps=1e-6).requires_grad_(False)
    torch.testing.assert_close(norm(x), torch.full((1, 4), 1 / math.sqrt(2)), atol=0, rtol=1e-4)
    assert torch.equal(norm(torch.zeros(2, 4)), torch.zeros(2, 4))  # no NaN at zero


def test_rmsnorm_bf16_order_of_operations():
    """bf16 input: normalized in float32, cast to bf16, then scaled by the weight (in bf16)."""
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (1.0 + randn(64, seed=4)).to(torch.bfloat16)
    x = (randn(2, 64, seed=5) * 3).to(torch.bfloat16)
    xf = x.float()
    normed = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm.weight * normed, atol=0, rtol=0)


# -- Linear with LoRA -----------------------------------------------------------------------------------------


def lora_linear(scaling: float = 2.0) -> Linear:
    return fill(Linear(12, 10, (ENCODER, DECODER), r=3, scaling=scaling), seed=6)


@pytest.mark.parametrize("adapter", [ENCODER, DECODER])
def test_lora_forward_is_w_plus_scaled_ba(adapter):
    layer = lora_linear()
    x = randn(2, 7, 12, seed=7)  # [B, S, in]
    W, A, B = layer.weight.double(), layer.lora_A[adapter].double(), layer.lora_B[adapter].double()
    expected = x.double() @ W.T + 2.0 * (x.double() @ A.T) @ B.T  # [B, S, out]
    torch.testing.assert_close(layer(x, adapter).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [2.0, 0.5, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward_has_the_bits_of_pefts_two_steps(scaling, dtype):
    """PEFT adds round(B(A x)) * s to W x; the fused float32 path (power-of-two s) must give the same bits."""
    layer = lora_linear(scaling).to(dtype)
    x = randn(2, 300, 12, seed=11).to(dtype)  # [B, S, in]
    A, B = layer.lora_A[ENCODER], layer.lora_B[ENCODER]
    expected = F.linear(x, layer.weight) + F.linear(F.linear(x, A), B) * scaling
    assert torch.equal(layer(x, ENCODER), expected)


def test_adapters_are_distinct_and_matter():
    layer = lora_linear()
    x = randn(4, 12, seed=8)
    base, enc, dec = layer(x), layer(x, ENCODER), layer(x, DECODER)
    assert (enc - base).abs().max() > 1e-2 and (dec - base).abs().max() > 1e-2 and (enc - dec).abs().max() > 1e-2


@pytest.mark.parametrize("adapter", [None, "unknown"])
def test_missing_adapter_is_base(adapter):
    layer = lora_linear()
    x = randn(4, 12, seed=9)
    assert torch.equal(layer(x, adapter), x @ layer.weight.T)
    assert layer.merged_weight(adapter) is layer.weight


@pytest.mark.parametrize("adapter", [ENCODER, DECODER])
def test_merged_weight_gives_the_same_map(adapter):
    layer = lora_linear(scaling=0.5)
    merged = layer.merged_weight(adapter)  # [out, in]
    expected = layer.weight.double() + 0.5 * layer.lora_B[adapter].double() @ layer.lora_A[adapter].double()
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-6)
    x = randn(5, 12, seed=10)
    torch.testing.assert_close(x @ merged.T, layer(x, adapter), atol=1e-5, rtol=1e-5)


def lora_cfg(decoder: bool):
    return config_from_hf(TINY | {"add_decoder_lora": decoder})


@pytest.mark.parametrize(("decoder", "adapters"), [(True, {ENCODER, DECODER}), (False, {ENCODER})])
def test_make_linear_adapters(decoder, adapters):
    cfg = lora_cfg(decoder)
    target = make_linear(cfg, "q_proj", 64, 64)
    assert set(target.lora_A) == set(target.lora_B) == adapters
    assert target.lora_A[ENCODER].shape == (4, 64) and target.scaling == 2.0  # r 4, alpha 8
    assert len(make_linear(cfg, "o_proj", 64, 64).lora_A) == 0  # not a target module
    no_lora = config_from_hf({k: v for k, v in TINY.items() if k != "lora_config"})
    assert len(make_linear(no_lora, "q_proj", 64, 64).lora_A) == 0


# -- attend ------------------------------------------------------------------------------------------------


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Masked softmax in float64: query i sits at position k_len - q_len + i; head h reads kv head
    h // (H / H_kv)."""
    H, q_len, D = q.shape[1], q.shape[2], q.shape[3]
    k_len, group = k.shape[2], H // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [B, H, k_len, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, q_len, k_len]
    query_pos = torch.arange(q_len)[:, None] + (k_len - q_len)
    scores = scores.masked_fill(torch.arange(k_len)[None, :] > query_pos, float("-inf"))
    return scores.softmax(-1) @ v  # [B, H, q_len, D]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "q_len", "k_len"),
    [
        (4, 4, 9, 9),  # square causal
        (4, 2, 9, 9),  # GQA
        (4, 2, 1, 13),  # one decoding step: sees every key
        (4, 1, 5, 17),  # bottom-right aligned rectangle, MQA
        (2, 2, 6, 7),
    ],
)
def test_attend_matches_masked_softmax(heads, kv_heads, q_len, k_len):
    q = randn(2, heads, q_len, 16, seed=11)
    k = randn(2, kv_heads, k_len, 16, seed=12)
    v = randn(2, kv_heads, k_len, 16, seed=13)
    out = attend(q, k, v)
    assert out.shape == (2, heads, q_len, 16)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attend_masks_future_keys():
    """Queries at positions 6 and 7 over 8 keys: key 7 reaches only the query at position 7."""
    q, k, v = randn(1, 2, 2, 8, seed=14), randn(1, 2, 8, 8, seed=15), randn(1, 2, 8, 8, seed=16)
    base = attend(q, k, v)
    v_changed = v.clone()
    v_changed[:, :, 7] += 100.0
    changed = attend(q, k, v_changed)
    torch.testing.assert_close(changed[:, :, 0], base[:, :, 0], atol=0, rtol=0)
    assert (changed[:, :, 1] - base[:, :, 1]).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_has_the_bits_of_sdpa_with_a_boolean_mask(dtype):
    """The additive mask built once per shape gives SDPA's own boolean-mask results bit for bit (the authors' path)."""
    q, k, v = (randn(1, heads, n, 16, seed=seed).to(dtype) for heads, n, seed in ((4, 5, 17), (2, 12, 18), (2, 12, 19)))
    visible = torch.ones(5, 12, dtype=torch.bool).tril(12 - 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v), expected, atol=0, rtol=0)
    assert causal_mask(5, 12, CPU, dtype) is causal_mask(5, 12, CPU, dtype)  # one mask for every layer


# -- KVCache ----------------------------------------------------------------------------------------------

SHAPE = (2, 2, 10, 16)  # [B, H_kv, max_len, D]


def new_cache(shape: tuple[int, int, int, int] = SHAPE) -> KVCache:
    return KVCache(shape, torch.float32, CPU)


def kv_pair(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values [B, 2, length, 16]."""
    return randn(batch, 2, length, 16, seed=seed), randn(batch, 2, length, 16, seed=seed + 100)


def test_kv_cache_update_returns_the_filled_prefix():
    cache = new_cache()
    assert (cache.batch, cache.max_len) == (2, 10) and cache.k is None  # allocated at the first update
    k1, v1 = kv_pair(2, 6, seed=1)
    k2, v2 = kv_pair(2, 1, seed=2)
    k, v = cache.update(torch.arange(6), k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k, v = cache.update(torch.tensor([6]), k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert cache.k.shape == SHAPE and cache.v.shape == SHAPE


def test_kv_cache_rewrites_a_position():
    """Writing at an earlier position replaces it and returns only the keys up to there (a rewind)."""
    cache = new_cache()
    k1, v1 = kv_pair(2, 5, seed=3)
    k2, v2 = kv_pair(2, 1, seed=4)
    cache.update(torch.arange(5), k1, v1)
    k, v = cache.update(torch.tensor([2]), k2, v2)
    assert k.shape[2] == 3
    assert torch.equal(k, torch.cat([k1[:, :, :2], k2], dim=2)) and torch.equal(v, torch.cat([v1[:, :, :2], v2], dim=2))


def test_kv_cache_overflow():
    cache = new_cache((1, 2, 5, 16))
    cache.update(torch.arange(4), *kv_pair(1, 4, seed=5))
    with pytest.raises(RuntimeError, match="KV cache full: 6 positions needed, 5 allocated"):
        cache.update(torch.arange(4, 6), *kv_pair(1, 2, seed=6))
    k, _ = cache.update(torch.tensor([4]), *kv_pair(1, 1, seed=7))  # exactly full is fine
    assert k.shape[2] == 5


def test_kv_cache_adopt():
    cache = new_cache((1, 2, 8, 16))
    k_buf, v_buf = kv_pair(1, 12, seed=8)  # room for more than max_len
    prefix_k, prefix_v = k_buf[:, :, :3].clone(), v_buf[:, :, :3].clone()
    cache.adopt(k_buf, v_buf)
    assert cache.k is k_buf and cache.v is v_buf  # adopted, not copied
    new_k, new_v = kv_pair(1, 2, seed=9)
    k, v = cache.update(torch.arange(3, 5), new_k, new_v)
    assert torch.equal(k, torch.cat([prefix_k, new_k], dim=2)) and torch.equal(v, torch.cat([prefix_v, new_v], dim=2))
    assert torch.equal(k_buf[:, :, 3:5], new_k)  # written into the adopted buffer


def test_kv_cache_adopt_too_short():
    cache = new_cache((1, 2, 8, 16))
    with pytest.raises(ValueError, match="adopted buffers hold 7 positions, 8 needed"):
        cache.adopt(torch.zeros(1, 2, 7, 16), torch.zeros(1, 2, 7, 16))


# -- Attention / Block -----------------------------------------------------------------------------------


@pytest.fixture
def cfg():
    return config_from_hf(TINY)


def rope_tables(cfg, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_sin(cfg.rope, inverse_frequencies(cfg.rope, cfg.head_dim), positions, torch.float32)


@pytest.mark.parametrize("adapter", [None, ENCODER, DECODER])
def test_attention_shapes_and_prefix_rows(cfg, adapter):
    """n_query < S: prefix rows only give keys; the outputs equal the last rows of a full-query run."""
    attn = fill(Attention(cfg), seed=20)
    h = randn(2, 11, cfg.hidden_size, seed=21)  # [B, S, d]
    cos, sin = rope_tables(cfg, torch.arange(11))
    full = attn(h, 11, Pass(cos, sin, adapter))
    part = attn(h, 4, Pass(cos, sin, adapter))
    assert full.shape == (2, 11, cfg.hidden_size) and part.shape == (2, 4, cfg.hidden_size)
    torch.testing.assert_close(part, full[:, -4:], atol=1e-5, rtol=1e-5)


def reference_attention_layer(attn: Attention, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Llama attention written out: projections, rotate-half RoPE, GQA causal softmax, output projection."""
    B, S, _ = h.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (h @ attn.q_proj.weight.T).view(B, S, H, D).transpose(1, 2)  # [B, H, S, D]
    k = (h @ attn.k_proj.weight.T).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = (h @ attn.v_proj.weight.T).view(B, S, Hkv, D).transpose(1, 2)
    angles = positions.double()[:, None] * 10000.0 ** (-torch.arange(0, D, 2).double() / D)  # [S, D/2]
    c, s = angles.cos(), angles.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : D // 2].double(), x[..., D // 2 :].double()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    y = reference_attention(rotate(q), rotate(k), v)  # [B, H, S, D]
    return y.transpose(1, 2).reshape(B, S, H * D) @ attn.o_proj.weight.double().T


def test_attention_matches_written_out_llama(cfg):
    cfg = config_from_hf({k: v for k, v in TINY.items() if k != "lora_config"})
    attn = fill(Attention(cfg), seed=22)
    h = randn(2, 9, cfg.hidden_size, seed=23)
    positions = torch.arange(5, 14)  # not starting at 0
    cos, sin = rope_tables(cfg, positions)
    out = attn(h, 9, Pass(cos, sin, None))
    torch.testing.assert_close(out.double(), reference_attention_layer(attn, h, positions), atol=1e-5, rtol=1e-5)


def test_block_with_cache_equals_full_run(cfg):
    """Prefill of 8 rows then 3 single rows through a cache reproduces one full pass of 11 rows."""
    block = fill(Block(cfg), seed=24)
    h = randn(1, 11, cfg.hidden_size, seed=25)
    cos, sin = rope_tables(cfg, torch.arange(11))
    full = block(h, 11, Pass(cos, sin, DECODER))  # [1, 11, d]
    block.self_attn.kv_cache = cache = KVCache((1, cfg.num_kv_heads, 11, cfg.head_dim), torch.float32, CPU)
    outs = [block(h[:, :8], 8, Pass(cos[:8], sin[:8], DECODER, torch.arange(8)))]
    for t in range(8, 11):
        outs.append(block(h[:, t : t + 1], 1, Pass(cos[t : t + 1], sin[t : t + 1], DECODER, torch.tensor([t]))))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    keys, _ = block.self_attn.project_kv(block.input_layernorm(h), DECODER)  # [1, H_kv, 11, D] before RoPE
    torch.testing.assert_close(cache.k, apply_rope(keys, cos, sin), atol=1e-6, rtol=1e-6)  # every position cached


def test_block_residual_structure(cfg):
    """Block = x + attn(norm1(h)); out = x + mlp(norm2(x)), with only the query rows kept."""
    block = fill(Block(cfg), seed=26)
    h = randn(2, 7, cfg.hidden_size, seed=27)
    cos, sin = rope_tables(cfg, torch.arange(7))
    out = block(h, 3, Pass(cos, sin, ENCODER))
    assert out.shape == (2, 3, cfg.hidden_size)
    x = h[:, -3:] + block.self_attn(block.input_layernorm(h), 3, Pass(cos, sin, ENCODER))
    expected = x + block.mlp(block.post_attention_layernorm(x), ENCODER)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    mlp_in = block.post_attention_layernorm(x)
    by_hand = block.mlp.down_proj(
        torch.nn.functional.silu(block.mlp.gate_proj(mlp_in, ENCODER)) * block.mlp.up_proj(mlp_in, ENCODER), ENCODER
    )
    torch.testing.assert_close(block.mlp(mlp_in, ENCODER), by_hand, atol=0, rtol=0)
