"""Normalisation layers shared by the vision encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn

from ivl.errors import ConfigError


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2/InternLM2/InternViT-6B: variance in fp32, cast back, then scale.

    The order (cast to the input dtype *before* multiplying by the weight) matters for bf16 parity.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """Build the vision norm named in ``VisionConfig.norm_type`` (LayerNorm has a bias, RMSNorm does not)."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm_type {norm_type!r} (expected layer_norm or rms_norm)")
