"""Shared tiny configs for the model tests (fp32, deterministic, offline)."""

from __future__ import annotations

import os

import pytest
import torch

from ivl.config import TextConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_text(**overrides) -> TextConfig:
    """A 2-layer GQA decoder small enough for sub-second tests."""
    fields = dict(
        flavour="qwen2",
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        attention_bias=True,
    )
    fields.update(overrides)
    config = TextConfig(**fields)
    config.validate()
    return config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_text():
    """Factory fixture for tiny decoder configs (avoids importing conftest from test modules)."""
    return tiny_text
