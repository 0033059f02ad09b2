"""`model.layers.attend`'s two kernels give the same outputs: flash-attn (the optional [cuda] extra, half precision on
CUDA) and SDPA, for a square causal block, one decoding step and a bottom-right aligned rectangle, with GQA."""

from __future__ import annotations

import pytest
import torch

from model.core import layers
from model.core.layers import attend

CASES = [  # (H, H_kv, q_len, k_len)
    (8, 8, 128, 128),  # q_len == k_len: plain causal
    (8, 2, 1, 301),  # one decoding step over a prefix: sees every key
    (8, 2, 37, 300),  # q_len < k_len: query i sits at k_len - q_len + i (bottom-right)
    (32, 8, 64, 1089),  # the 8B models' heads over a memory prefix
]

needs_flash = pytest.mark.skipif(
    layers.flash_attn_func is None or not torch.cuda.is_available(),
    reason="flash-attn not installed (pip install -e '.[cuda]') or no CUDA device: nothing to compare SDPA with",
)


def qkv(H: int, H_kv: int, q_len: int, k_len: int, D: int = 128) -> tuple[torch.Tensor, ...]:
    """bf16 CUDA q [2, H, q_len, D], k, v [2, H_kv, k_len, D]."""
    g = torch.Generator("cuda").manual_seed(q_len * k_len + H_kv)
    shapes = ((2, H, q_len, D), (2, H_kv, k_len, D), (2, H_kv, k_len, D))
    return tuple(torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in shapes)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, monkeypatch) -> torch.Tensor:
    """`attend` with flash-attn hidden: its SDPA path."""
    with monkeypatch.context() as patch:
        patch.setattr(layers, "flash_attn_func", None)
        return attend(q, k, v)


def float64_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Masked softmax in float64 (bottom-right causal, kv head h // (H / H_kv))."""
    q_len, k_len, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, q_len, k_len]
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@needs_flash
@pytest.mark.parametrize(("H", "H_kv", "q_len", "k_len"), CASES)
def test_flash_attn_and_sdpa_agree(H, H_kv, q_len, k_len, monkeypatch):
    q, k, v = qkv(H, H_kv, q_len, k_len)
    flash, reference = attend(q, k, v), sdpa(q, k, v, monkeypatch)
    assert flash.shape == reference.shape == (2, H, q_len, q.shape[-1]) and flash.dtype == torch.bfloat16
    torch.testing.assert_close(flash.float(), reference.float(), atol=2e-2, rtol=2e-2)  # a few bf16 ulps
    exact = float64_reference(q, k, v)  # both kernels are as close to it as bf16 rounding allows
    for out in (flash, reference):
        torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)


@needs_flash
def test_flash_path_masks_future_keys_bottom_right(monkeypatch):
    """Queries at positions k_len-2 and k_len-1: the last key reaches only the last query."""
    q, k, v = qkv(8, 2, 2, 64)
    changed = v.clone()
    changed[:, :, -1] += 100.0
    base, moved = attend(q, k, v), attend(q, k, changed)
    assert torch.equal(moved[:, :, 0], base[:, :, 0])
    assert (moved[:, :, 1].float() - base[:, :, 1].float()).abs().max() > 1.0
