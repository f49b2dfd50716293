"""Patch embedding shared by InternViT and the encoder-free Mono-InternVL stem.

Conv 14x14 patches + a CLS token + a learned position table, bicubically resized (in fp32) when the
patch grid differs from the one the table was trained for. The Mono stem stops here and drops CLS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ivl.config import VisionConfig
from ivl.errors import ModelInputError


def interpolate_position_embedding(position_embedding: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a ``[1, 1+P, D]`` table to a ``grid_h x grid_w`` patch grid; the CLS row is kept as is.

    Bicubic, align_corners=False, computed in fp32 and cast back (as the official InternViT does).
    At the native grid the table is returned untouched (bicubic at scale 1 is the identity).
    """
    cls_pos, patch_pos = position_embedding[:, :1], position_embedding[:, 1:]
    side = round(patch_pos.shape[1] ** 0.5)
    if side * side != patch_pos.shape[1]:
        raise ModelInputError(f"position embedding has {patch_pos.shape[1]} patch rows, not a square grid")
    if (grid_h, grid_w) == (side, side):
        return position_embedding
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(position_embedding.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionEmbeddings(nn.Module):
    """pixels ``[N, 3, H, W]`` -> tokens ``[N, 1 + (H/p)(W/p), D]`` (CLS first, patches row-major)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + config.num_patches, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ModelInputError(
                f"pixel_values must be [N, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ModelInputError(f"image size {height}x{width} is not a multiple of patch size {self.patch_size}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [N, D, h, w]
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # row-major: index = row * w + col
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        return tokens + interpolate_position_embedding(self.position_embedding, grid_h, grid_w).to(tokens.dtype)


class PatchStem(nn.Module):
    """Mono-InternVL's vision "model": embeddings only, CLS dropped (no encoder layers)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor, *, select_layer: int = -1) -> torch.Tensor:
        """Return patch tokens ``[N, P, D]``; ``select_layer`` is accepted and ignored (there are no layers)."""
        del select_layer
        return self.embeddings(pixel_values)[:, 1:]
