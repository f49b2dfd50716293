"""Vision-to-language connector: pixel unshuffle (space-to-depth, ps_version v2) and the ``mlp1`` projector."""

from __future__ import annotations

import torch
from torch import nn

from ivl.errors import ModelInputError


def pixel_unshuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """``[n, h, w, C] -> [n, h*s, w*s, C/s^2]`` with InternVL's v2 layout (called pixel_shuffle upstream).

    Output cell (r, c) holds, in this channel order, the patches (2r, 2c), (2r, 2c+1), (2r+1, 2c),
    (2r+1, 2c+1) for s = 0.5: the exact order the released ``mlp1`` weights expect.
    """
    if x.ndim != 4:
        raise ModelInputError(f"pixel_unshuffle expects [n, h, w, C], got shape {tuple(x.shape)}")
    factor = round(1 / scale)
    if factor < 1 or abs(factor * scale - 1) > 1e-9:
        raise ModelInputError(f"pixel_unshuffle scale {scale} is not 1/k for an integer k")
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ModelInputError(f"pixel_unshuffle needs a grid divisible by {factor}, got {h}x{w}")
    # Adjacent columns -> channels, swap axes, adjacent rows -> channels, swap back (v2).
    x = x.reshape(n, h, w // factor, c * factor)
    x = x.permute(0, 2, 1, 3).reshape(n, w // factor, h // factor, c * factor * factor)
    return x.permute(0, 2, 1, 3).contiguous()


class Projector(nn.Sequential):
    """``mlp1``: LayerNorm(4D, eps 1e-5) -> Linear(4D, H) -> GELU -> Linear(H, H); indices 0, 1, 3 hold weights."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__(
            nn.LayerNorm(in_features, eps=1e-5),
            nn.Linear(in_features, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )
