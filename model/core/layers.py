"""Llama building blocks with a per-layer memory prefix: RMSNorm, LoRA linears, GQA attention, SwiGLU."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import apply_rope

try:  # optional, CUDA only
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

ENCODER, DECODER = "encoder", "decoder"  # our names for the authors' `default` / `decoder_adapter`


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized in float32, cast back, then scaled (the authors' order of operations)."""
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Linear(nn.Module):
    """A bias-free linear layer with optional LoRA adapters, applied unmerged: W x + s * B(A(x))."""

    def __init__(self, in_features: int, out_features: int, adapters: tuple[str, ...] = (), r: int = 0, scaling=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scaling = scaling
        self.scaling_is_power_of_two = scaling > 0 and math.frexp(scaling)[0] == 0.5
        self.lora_A = nn.ParameterDict({a: nn.Parameter(torch.empty(r, in_features)) for a in adapters})
        self.lora_B = nn.ParameterDict({a: nn.Parameter(torch.empty(out_features, r)) for a in adapters})

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [.., out]
        if adapter is None or adapter not in self.lora_A:
            return y
        a = F.linear(x, self.lora_A[adapter])  # [.., r]
        if y.dtype == torch.float32 and self.scaling_is_power_of_two:
            # y += s * (a B^T) inside the matmul: in float32 a power-of-two s scales exactly, so these are the bits
            # of PEFT's two steps (round(a B^T) * s, then the sum) without two more passes over y.
            y.view(-1, y.shape[-1]).addmm_(a.view(-1, a.shape[-1]), self.lora_B[adapter].T, alpha=self.scaling)
            return y
        return y + F.linear(a, self.lora_B[adapter]) * self.scaling

    def merged_weight(self, adapter: str | None = None) -> torch.Tensor:
        """W + s * B A [out, in]: one matrix for many rows (the same map up to rounding)."""
        if adapter is None or adapter not in self.lora_A:
            return self.weight
        return torch.addmm(self.weight, self.lora_B[adapter], self.lora_A[adapter], alpha=self.scaling)


def make_linear(cfg: ModelConfig, name: str, in_features: int, out_features: int) -> Linear:
    lora = cfg.lora
    if lora is None or name not in lora.target_modules:
        return Linear(in_features, out_features)
    adapters = (ENCODER, DECODER) if lora.decoder_adapter else (ENCODER,)
    return Linear(in_features, out_features, adapters, lora.r, lora.scaling)


class KVCache:
    """One attention layer's keys (after RoPE) and values, each [B, H_kv, max_len, D], written at explicit
    positions (gpt-fast's cache). The buffers are allocated at the first update, or adopted with a prefix
    already in place (a state's cached memory keys/values), so that a question never copies the memory's keys."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def adopt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Use buffers k, v [B, H_kv, >= max_len, D] whose prefix positions are already filled."""
        if k.shape[2] < self.max_len:
            raise ValueError(f"adopted buffers hold {k.shape[2]} positions, {self.max_len} needed")
        self.k, self.v = k, v

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, S, D] at the consecutive positions input_pos [S]; returns the keys and values
        of positions 0..input_pos[-1] [B, H_kv, end, D]."""
        start, end = int(input_pos[0]), int(input_pos[-1]) + 1
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.allocate()
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def put(self, element: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one batch element's k, v [1, H_kv, P, D] at slots start..start+P-1 (its memory prefix)."""
        self.allocate()
        self.k[element, :, start : start + k.shape[2]] = k[0]
        self.v[element, :, start : start + v.shape[2]] = v[0]

    def allocate(self) -> None:
        """Zeroed buffers: slots no element writes (a batch's shorter prefixes) must hold finite values, as
        attention multiplies masked values by a zero weight."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the last q_len positions over k_len >= q_len keys (bottom-right aligned).

    q: [B, H, q_len, D]; k, v: [B, H_kv, k_len, D] -> [B, H, q_len, D]. Query i sits at absolute
    position k_len - q_len + i and sees keys 0..that position (so every prefix row is visible). An
    explicit boolean `mask` [B, 1, q_len, k_len] (True: visible) replaces that rule (batched states).
    """
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # [B, S, H, D] layout. causal=True aligns the mask bottom-right when q_len < k_len (flash-attn >= 2.1, as the
        # SDPA mask below); H_kv < H heads are shared by groups of H / H_kv query heads (GQA), as enable_gqa does.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(q_len, k_len, q.device, q.dtype)  # [q_len, k_len]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@functools.lru_cache(maxsize=8)
def causal_mask(q_len: int, k_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[q_len, k_len] the bottom-right causal mask as SDPA adds it (0 visible, -inf hidden), built once for every
    layer of a pass (and every pass of the same shape): SDPA turns a boolean mask into exactly these values."""
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


@dataclass(frozen=True)
class Pass:
    """What every layer of one forward pass shares: the RoPE tables of its rows' positions, cos/sin [S, D]
    (or [B, 1, S, D]); the LoRA adapter; with a KV cache, the rows' cache slots input_pos [S] and, where the
    queries do not simply see every slot up to theirs, the mask [B, 1, n_query, end] of what they see."""

    cos: torch.Tensor
    sin: torch.Tensor
    adapter: str | None
    input_pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = make_linear(cfg, "q_proj", d, cfg.num_heads * hd)
        self.k_proj = make_linear(cfg, "k_proj", d, cfg.num_kv_heads * hd)
        self.v_proj = make_linear(cfg, "v_proj", d, cfg.num_kv_heads * hd)
        self.o_proj = make_linear(cfg, "o_proj", cfg.num_heads * hd, d)
        self.kv_cache: KVCache | None = None  # set by MemoryLLM.caches() for cached reading

    def kv_weight(self, adapter: str | None) -> torch.Tensor:
        """[W_k; W_v] [2 * H_kv * D, d] with the adapter merged: keys and values of many rows in one matmul."""
        return torch.cat([self.k_proj.merged_weight(adapter), self.v_proj.merged_weight(adapter)])

    def project_kv(self, h: torch.Tensor, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values before RoPE of normed rows h [B, S, d]: two [B, H_kv, S, D]."""
        B, S, _ = h.shape
        k = self.k_proj(h, adapter).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h, adapter).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, h: torch.Tensor, n_query: int, at: Pass) -> torch.Tensor:
        """h: [B, S, d] normed rows (keys-only rows, then the n_query query rows) at the positions of at's
        cos/sin. With at.input_pos the keys/values go into the layer's cache and the queries see every cached
        slot before theirs (a question's memory prefix is already there), or what at.mask shows.
        Returns [B, n_query, d]."""
        B, S, _ = h.shape
        q = self.q_proj(h[:, S - n_query :], at.adapter).view(B, n_query, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.project_kv(h, at.adapter)
        q = apply_rope(q, at.cos[..., -n_query:, :], at.sin[..., -n_query:, :])  # [B, H, n_query, D]
        k = apply_rope(k, at.cos, at.sin)  # [B, H_kv, S, D]
        if at.input_pos is not None:
            k, v = self.kv_cache.update(at.input_pos, k, v)  # [B, H_kv, end, D]
        y = attend(q, k, v, at.mask).transpose(1, 2).reshape(B, n_query, self.n_heads * self.head_dim)
        return self.o_proj(y, at.adapter)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_linear(cfg, "gate_proj", d, f)
        self.up_proj = make_linear(cfg, "up_proj", d, f)
        self.down_proj = make_linear(cfg, "down_proj", f, d)

    def forward(self, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
        gate = self.gate_proj(x, adapter)  # [.., d_ff], fresh: SiLU and the product go in place
        return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x, adapter)), adapter)


class Block(nn.Module):
    """One decoder layer. Prefix rows only give keys/values; residual and MLP run on the query rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, n_query: int, at: Pass) -> torch.Tensor:
        """h: [B, S, d] layer input (keys-only rows then the n_query query rows) -> [B, n_query, d]."""
        x = h[:, -n_query:] + self.self_attn(self.input_layernorm(h), n_query, at)
        return x + self.mlp(self.post_attention_layernorm(x), at.adapter)
