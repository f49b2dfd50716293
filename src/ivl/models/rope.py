"""Rotary position embedding (rotate-half convention) with plain, linear, dynamic-NTK and llama3 scaling.

Frequencies are computed on the fly per device rather than stored as buffers, so a model built on the
meta device and materialised later never carries stale or uninitialised RoPE state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ivl.config import TextConfig
from ivl.errors import ConfigError


def _scaling_kind(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type")) or "default")


def base_inv_freq(theta: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in fp32, as every reference computes it."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 frequency-dependent scaling: long wavelengths / factor, short kept, smooth in between."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """position ids ``[B, T]`` -> (cos, sin) ``[B, T, head_dim]`` in the requested dtype."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dim = config.resolved_head_dim
        self.theta = float(config.rope_theta)
        self.max_positions = int(config.max_position_embeddings)
        self.scaling = dict(config.rope_scaling or {})
        self.kind = _scaling_kind(config.rope_scaling)
        if self.kind not in ("default", "linear", "dynamic", "llama3"):
            raise ConfigError(f"rope_scaling type {self.kind!r} is not supported (linear, dynamic, llama3)")
        self.factor = float(self.scaling.get("factor", 1.0))
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, seq_len: int = 0) -> torch.Tensor:
        """Inverse frequencies for sequences of length ``seq_len`` (only dynamic NTK depends on it)."""
        length = seq_len if self.kind == "dynamic" and seq_len > self.max_positions else 0
        key = (str(device), length)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        theta = self.theta
        if length:  # dynamic NTK: enlarge the base only beyond the trained context
            ratio = self.factor * length / self.max_positions - (self.factor - 1)
            theta = theta * ratio ** (self.dim / (self.dim - 2))
        inv = base_inv_freq(theta, self.dim, device)
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            inv = llama3_inv_freq(inv, self.scaling)
        if len(self._cache) > 64:  # dynamic lengths grow during long generations; keep the cache small
            self._cache.clear()
        self._cache[key] = inv
        return inv

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_len`` (max position + 1) is only needed for dynamic scaling; computed here if not given."""
        if self.kind == "dynamic" and seq_len is None:
            seq_len = int(position_ids.max()) + 1
        inv = self.inv_freq(position_ids.device, seq_len or 0)
        freqs = position_ids.float().unsqueeze(-1) * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k ``[B, heads, T, d]`` with cos/sin ``[B, T, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
