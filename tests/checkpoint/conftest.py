"""Tiny configs and random models for the checkpoint tests (offline, fp32, deterministic)."""

from __future__ import annotations

import os

import pytest
import torch

from ivl.config import InternVLConfig, TextConfig, VisionConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _vision(style: str) -> VisionConfig:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56)
    if style == "300m":  # LayerNorm with bias, qkv bias, no QK-norm
        return VisionConfig(model_type="intern_vit_6b", **common)
    if style == "6b":  # RMSNorm, no qkv bias, QK-norm over the full width
        return VisionConfig(
            model_type="intern_vit_6b", norm_type="rms_norm", qkv_bias=False, qk_normalization=True, **common
        )
    return VisionConfig(model_type="intern_vit_patch", **common)


def _text(flavour: str, *, heads: int = 4, kv: int = 2, experts: bool = False) -> TextConfig:
    return TextConfig(
        flavour=flavour,
        vocab_size=512,
        hidden_size=48 if heads == 6 else 64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=96,
        rms_norm_eps=1e-6 if flavour == "qwen2" else 1e-5,
        rope_theta=10000.0 if flavour == "qwen2" else 1_000_000.0,
        rope_scaling=None if flavour == "qwen2" else {"type": "dynamic", "factor": 2.0},
        max_position_embeddings=4096,
        attention_bias=flavour == "qwen2",
        visual_experts=experts,
        bos_token_id=None if flavour == "qwen2" else 1,
        eos_token_id=505 if flavour == "qwen2" else 2,
        pad_token_id=None,
    )


def make_config(kind: str) -> InternVLConfig:
    """``qwen2`` (300M-style ViT), ``internlm2`` (6B-style ViT, g=2), ``internlm2_g3`` (6 heads / 2 kv),
    ``internlm2_mqa`` (one kv head), ``llama`` (300M-style ViT) or ``mono`` (patch stem + visual experts)."""
    if kind == "qwen2":
        vision, text, template = _vision("300m"), _text("qwen2"), "internvl2_5"
    elif kind == "internlm2":
        vision, text, template = _vision("6b"), _text("internlm2"), "internvl2_5"
    elif kind == "internlm2_g3":
        vision, text, template = _vision("300m"), _text("internlm2", heads=6, kv=2), "internvl2_5"
    elif kind == "internlm2_mqa":
        vision, text, template = _vision("6b"), _text("internlm2", heads=4, kv=1), "internvl2_5"
    elif kind == "llama":
        vision, text, template = _vision("300m"), _text("llama"), "internvl2_5"
    elif kind == "mono":
        vision, text, template = _vision("patch"), _text("internlm2", experts=True), "internlm2-chat"
    else:
        raise ValueError(kind)
    return InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=500,
        force_image_size=56,
        template=template,
        use_thumbnail=True,
        max_dynamic_patch=12,
        name=f"tiny-{kind}",
    ).validate()


def make_random_model(kind: str, seed: int = 0, std: float = 0.2):
    """Our model with every parameter drawn from N(0, std²), so no two tensors coincide."""
    from ivl.models.internvl import InternVL

    torch.manual_seed(seed)
    model = InternVL(make_config(kind))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.eval()


@pytest.fixture
def tiny_config():
    return make_config


@pytest.fixture
def random_model():
    return make_random_model
