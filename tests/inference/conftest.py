"""Tiny random InternVL / Mono-InternVL models and a tiny tokenizer shared by the inference tests."""

from __future__ import annotations

import pytest
import torch

from ivl.config import InternVLConfig, get_preset


def tiny_config(mono: bool = False) -> InternVLConfig:
    cfg = get_preset("tiny")
    if mono:
        from ivl.config import _tiny

        cfg = _tiny(mono=True).validate()
    return cfg


def spread_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw matrices with a larger std: the default 0.02 init makes greedy decoding repeat one token,
    which would make equality tests between decoding paths trivially true."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def build_model(mono: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    from ivl.models.internvl import InternVL

    torch.manual_seed(seed)
    model = InternVL(tiny_config(mono)).eval()
    return spread_weights(model, seed).to(dtype)


@pytest.fixture(scope="session")
def tiny_tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model():
    return build_model()


@pytest.fixture(scope="session")
def tiny_model_f64():
    return build_model(dtype=torch.float64)
