"""Helpers shared by the Mono tests (a uniquely named module, safe to import from any test directory)."""

from __future__ import annotations

import torch

from ivl.config import get_preset
from ivl.models.mono import MonoInternVL

#: mono-tiny: 56 px tiles of 4x4 patches -> 4 LLM tokens per tile; <IMG_CONTEXT> = 500 in a 507-token tokenizer.
IMG_START, IMG_END, IMG_CONTEXT = 498, 499, 500
TOKENS_PER_TILE = 4


def spread_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every matrix/bias/table with a larger std, so logits have clear margins (greedy is not degenerate)
    and the visual experts differ strongly from the text FFNs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_mono(seed: int = 0) -> MonoInternVL:
    torch.manual_seed(seed)
    return spread_weights(MonoInternVL(get_preset("mono-tiny")), seed).eval()


def image_prompt(tiles: int, prefix: list[int], suffix: list[int]) -> list[int]:
    """``prefix <img> <IMG_CONTEXT>*(4*tiles) </img> suffix`` (the official image block)."""
    return [*prefix, IMG_START, *[IMG_CONTEXT] * (TOKENS_PER_TILE * tiles), IMG_END, *suffix]
