"""THE parity test: transformers' InternVLForConditionalGeneration, saved with save_pretrained, loaded by our
production loader, gives the same logits; and our exports load back (ours and transformers') unchanged."""

from __future__ import annotations

import pytest
import torch

from ivl.checkpoint.io import load_model, save_model

IMAGE_TOKEN = 500
TOKENS_PER_TILE = 4  # 56 px tiles, 14 px patches: 4x4 grid -> 2x2 after pixel unshuffle
ATOL = 1e-4


def _hf_model(text: str, vision: str, seed: int = 0):
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlamaConfig,
        Qwen2Config,
    )

    vision_kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56, patch_size=14
    )
    if vision == "300m":
        vision_config = InternVLVisionConfig(attention_bias=True, norm_type="layer_norm", **vision_kwargs)
    else:
        vision_config = InternVLVisionConfig(
            attention_bias=False, norm_type="rms_norm", use_qk_norm=True, **vision_kwargs
        )
    text_kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if text == "qwen2":
        text_config = Qwen2Config(rms_norm_eps=1e-6, rope_theta=10000.0, **text_kwargs)
    else:  # InternLM2-style Llama: eps 1e-5, theta 1e6, dynamic NTK x2
        text_config = LlamaConfig(
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
            attention_bias=False,
            **text_kwargs,
        )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # large random weights everywhere (layer scales, norms, biases too)
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def _inputs(seed: int = 1):
    """Two samples: the first holds a 2-tile image, the second a 1-tile image (3 tiles in all)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(3, 3, 56, 56, generator=g)
    ids = torch.randint(0, 490, (2, 20), generator=g)
    ids[0, 3 : 3 + 2 * TOKENS_PER_TILE] = IMAGE_TOKEN
    ids[1, 10 : 10 + TOKENS_PER_TILE] = IMAGE_TOKEN
    return ids, pixel_values


def _hf_logits(model, ids, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def _our_logits(model, ids, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixel_values).logits


@pytest.mark.parametrize(("text", "vision"), [("qwen2", "300m"), ("llama", "6b")])
def test_load_transformers_checkpoint(text, vision, tmp_path):
    reference = _hf_model(text, vision)
    reference.save_pretrained(tmp_path / "hf")
    ids, pixel_values = _inputs()
    expected = _hf_logits(reference, ids, pixel_values)

    ours = load_model(tmp_path / "hf")
    assert ours.config.text.flavour == text and ours.config.vision.qk_normalization == (vision == "6b")
    with torch.no_grad():  # the vision path alone (ViT, pixel unshuffle, mlp1): far more sensitive than logits
        ref_features = reference.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        features = ours.encode_images(pixel_values)
    feature_delta = (features - ref_features).abs().max().item()
    assert feature_delta <= ATOL
    got = _our_logits(ours, ids, pixel_values)
    delta = (got - expected).abs().max().item()
    print(
        f"parity {text}+{vision}: logits max|Δ| = {delta:.3e} (scale {expected.abs().max().item():.2f}), "
        f"image features max|Δ| = {feature_delta:.3e} (scale {ref_features.abs().max().item():.2f})"
    )
    assert got.shape == expected.shape
    assert delta <= ATOL

    # official layout: save -> load -> identical logits (bit for bit: same fp32 weights, same code)
    save_model(ours, tmp_path / "official", layout="official", max_shard_size="40KB")
    again = load_model(tmp_path / "official")
    assert torch.equal(_our_logits(again, ids, pixel_values), got)

    # our HF export loads in transformers and matches the reference
    save_model(ours, tmp_path / "export", layout="hf", max_shard_size="40KB")
    from transformers import InternVLForConditionalGeneration

    exported = InternVLForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(_hf_logits(exported, ids, pixel_values), expected, rtol=0, atol=0)


def test_internlm2_packed_wqkv_matches_transformers(tmp_path):
    """An InternLM2 official checkpoint (packed wqkv, tok_embeddings, w1/w3/w2, output) built from a transformers
    Llama-text model loads back to the reference logits: checks the wqkv packing against an independent forward."""
    reference = _hf_model("llama", "6b", seed=3)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ours.config.text.flavour = "internlm2"  # same numerics; changes only the official key names
    save_model(ours, tmp_path / "official", layout="official")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "official" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.1.attention.wqkv.weight" in keys
    assert "language_model.output.weight" in keys

    loaded = load_model(tmp_path / "official")
    assert loaded.config.text.flavour == "internlm2"
    ids, pixel_values = _inputs(seed=5)
    delta = (_our_logits(loaded, ids, pixel_values) - _hf_logits(reference, ids, pixel_values)).abs().max().item()
    print(f"parity internlm2 (packed wqkv) via official layout: max|Δ| = {delta:.3e}")
    assert delta <= ATOL
