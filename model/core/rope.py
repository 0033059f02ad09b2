"""Rotary position embeddings in the exact float32 recipes of the authors' checkpoints (docs/algorithm.md §4.4)."""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, bf16-rounded when the config says so."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "llama3":
        inv_freq = _llama3_smoothing(inv_freq, rope)
    if rope.inv_freq_dtype == "bfloat16":
        inv_freq = inv_freq.to(torch.bfloat16).float()
    return inv_freq


def _llama3_smoothing(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_angles(rope: RopeConfig, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[..., S, head_dim/2] angles for integer positions [..., S], computed in float32 as the authors do."""
    p = positions.to(inv_freq.device).float()
    if rope.kind == "linear":
        p = p / rope.factor  # divide the positions, not inv_freq: bit-exact with the authors' 8B
    elif rope.kind == "interpolated":
        p = p * torch.tensor(rope.position_scale, dtype=torch.float32)
    return p[..., None] * inv_freq


def cos_sin(
    rope: RopeConfig, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., S, head_dim] for `positions` [..., S], cast to the activation dtype."""
    angles = rope_angles(rope, inv_freq, positions)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D] or [B, 1, S, D] (positions per batch element)."""
    return x * cos + rotate_half(x) * sin


def rope_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """out = apply_rope(x, cos, sin), written in place into `out` (any strides) without the rotated copy of x.
    x, out: [B, H, S, D]; cos/sin: [S, D]."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
