"""Decoder self-attention: GQA + RoPE over SDPA, with a per-forward plan (causal fast path, padding/cache
mask, or packed sub-sequences) computed once by the decoder and shared by all layers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ivl.config import TextConfig
from ivl.errors import ModelInputError
from ivl.models.cache import KVCache
from ivl.models.rope import apply_rotary

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@dataclass
class AttentionPlan:
    """How every layer attends in one forward pass.

    ``mask`` is boolean ``[B or 1, 1, T, S]`` (True = may attend) and only set when padding or a cache
    offset forbids the plain causal kernel; ``segments`` lists packed sub-sequences ``(start, end)``.
    """

    is_causal: bool = True
    mask: torch.Tensor | None = None
    segments: list[tuple[int, int]] | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def plan_attention(
    *,
    batch_size: int,
    q_len: int,
    past_len: int,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> AttentionPlan:
    """Pick the cheapest exact way to attend for this forward (see AttentionPlan)."""
    total = past_len + q_len
    if cu_seqlens is not None:
        return _packed_plan(batch_size, q_len, past_len, attention_mask, cu_seqlens)
    padded = False
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch_size, total):
            raise ModelInputError(
                f"attention_mask must be [batch, cache.length + T] = [{batch_size}, {total}], "
                f"got {tuple(attention_mask.shape)}"
            )
        padded = not bool(attention_mask.bool().all())
    if not padded:
        if past_len == 0:
            return AttentionPlan(is_causal=q_len > 1)
        if q_len == 1:  # one new token sees everything stored
            return AttentionPlan(is_causal=False)
    keys = torch.arange(total, device=device)
    queries = torch.arange(past_len, total, device=device)
    allowed = keys[None, :] <= queries[:, None]  # [T, S] causal with offset
    if padded:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
        allowed = allowed | (keys[None, :] == queries[:, None])  # padding queries see themselves: no empty rows
        return AttentionPlan(is_causal=False, mask=allowed[:, None])
    return AttentionPlan(is_causal=False, mask=allowed[None, None])


def _packed_plan(
    batch_size: int, q_len: int, past_len: int, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor
) -> AttentionPlan:
    if batch_size != 1:
        raise ModelInputError(f"packed input (cu_seqlens) needs batch size 1, got {batch_size}")
    if past_len:
        raise ModelInputError("packed input (cu_seqlens) cannot be combined with a KV cache")
    if attention_mask is not None:
        raise ModelInputError("give either cu_seqlens (packed) or attention_mask, not both")
    bounds = [int(b) for b in cu_seqlens.reshape(-1).tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q_len or any(b < a for a, b in pairwise(bounds)):
        raise ModelInputError(f"cu_seqlens must rise from 0 to the sequence length {q_len}, got {bounds}")
    segments = [(a, b) for a, b in pairwise(bounds) if b > a]
    return AttentionPlan(
        is_causal=True,
        segments=segments,
        cu_seqlens=cu_seqlens.to(torch.int32),
        max_seqlen=max(b - a for a, b in segments),
    )


def packed_positions(cu_seqlens: torch.Tensor, q_len: int, device: torch.device) -> torch.Tensor:
    """Positions restarting at 0 in every packed sub-sequence, ``[1, T]``."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long).reshape(-1)
    lengths = bounds[1:] - bounds[:-1]
    starts = torch.repeat_interleave(bounds[:-1], lengths, output_size=q_len)
    return (torch.arange(q_len, device=device) - starts)[None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q ``[B, H, T, d]``, k/v ``[B, Hkv, S, d]`` -> ``[B, H, T, d]``."""
    gqa = q.shape[1] != k.shape[1]
    if plan.segments is not None:
        return _attend_packed(q, k, v, plan, gqa)
    if gqa and plan.mask is not None and q.is_cuda:  # fused CUDA kernels with a mask do not all take enable_gqa
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.is_causal, enable_gqa=gqa)


def _attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, gqa: bool) -> torch.Tensor:
    if _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_varlen_func

        cu_seqlens = plan.cu_seqlens.to(q.device)
        out = flash_attn_varlen_func(
            q[0].transpose(0, 1),
            k[0].transpose(0, 1),
            v[0].transpose(0, 1),
            cu_seqlens,
            cu_seqlens,
            plan.max_seqlen,
            plan.max_seqlen,
            causal=True,
        )
        return out.transpose(0, 1)[None]
    # Looping over sub-sequences is exact and, on CPU, much faster than one block-diagonal masked call.
    parts = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=gqa)
        for a, b in plan.segments
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class Attention(nn.Module):
    """q/k/v/o projections (q/k/v bias iff ``attention_bias``), RoPE, GQA, optional KV cache."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, plan)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
