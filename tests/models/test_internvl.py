"""Whole-model tests: parity with transformers' InternVLForConditionalGeneration, image-feature merging,
image_flags, Mono (patch stem + experts), gradient checkpointing and parameter counting."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import InternVLConfig as HFInternVLConfig
from transformers import InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from ivl.config import InternVLConfig, TextConfig, get_preset
from ivl.errors import ModelInputError
from ivl.models.internvl import InternVL, count_parameters

IMG = 500  # image_token_id of the tiny presets; 4 tokens per 56 px tile


def _mono_config() -> InternVLConfig:
    tiny = get_preset("tiny")
    vision = copy.deepcopy(tiny.vision)
    vision.model_type = "intern_vit_patch"
    text = TextConfig(**{**tiny.text.__dict__, "flavour": "internlm2", "attention_bias": False, "visual_experts": True})
    return InternVLConfig(vision=vision, text=text, image_token_id=IMG, force_image_size=56).validate()


def _ids_with_images(rows: list[list[int]]) -> torch.Tensor:
    """Each row: number of image tiles per image block, placed between random text."""
    out = []
    for tiles in rows:
        seq = [7, 8]
        for n in tiles:
            seq += [9] + [IMG] * (4 * n) + [10, 11]
        out.append(seq)
    width = max(map(len, out))
    return torch.tensor([[3] * (width - len(s)) + s for s in out])


def _hf_keys(sd: dict[str, torch.Tensor], vision_dim: int) -> dict[str, torch.Tensor]:
    """Official -> transformers-native names (spec §3.3), written here independently of ivl.checkpoint."""
    out = {}
    for key, value in sd.items():
        if key.startswith("vision_model."):
            k = "model.vision_tower." + key.removeprefix("vision_model.")
            k = k.replace("embeddings.class_embedding", "embeddings.cls_token")
            k = k.replace("embeddings.position_embedding", "embeddings.position_embeddings")
            k = k.replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
            k = k.replace("encoder.layers.", "encoder.layer.").replace(".attn.proj.", ".attention.projection_layer.")
            k = k.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
            k = k.replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
            if ".attn.qkv." in k:
                for name, part in zip(("q", "k", "v"), value.split(vision_dim), strict=True):
                    out[k.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
                continue
        elif key.startswith("mlp1."):
            names = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
            index, rest = key.removeprefix("mlp1.").split(".", 1)
            k = f"model.multi_modal_projector.{names[index]}.{rest}"
        elif key == "language_model.lm_head.weight":
            k = "lm_head.weight"
        else:
            k = "model.language_model." + key.removeprefix("language_model.model.")
        out[k] = value
    return out


def _hf_model(ours: InternVL) -> InternVLForConditionalGeneration:
    v, t = ours.config.vision, ours.config.text
    hf_config = HFInternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
            attention_bias=v.qkv_bias,
            image_size=v.image_size,
            patch_size=v.patch_size,
        ),
        text_config=Qwen2Config(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            tie_word_embeddings=False,
        ),
        image_token_id=ours.config.image_token_id,
        image_seq_length=ours.config.num_image_token,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    hf = InternVLForConditionalGeneration(hf_config)
    missing, unexpected = hf.load_state_dict(_hf_keys(ours.state_dict(), v.hidden_size), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def _randomised(config: InternVLConfig) -> InternVL:
    model = InternVL(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@torch.no_grad()
def test_matches_transformers_internvl():
    ours = _randomised(get_preset("tiny"))
    hf = _hf_model(ours)
    ids = _ids_with_images([[2], [1, 1]])  # tiles in token order: sample 0 (2), sample 1 (1 + 1)
    pixels = torch.randn(4, 3, 56, 56)
    got = ours(ids, pixels).logits
    want = hf(input_ids=ids, pixel_values=pixels).logits
    assert (got - want).abs().max() <= 1e-4


@torch.no_grad()
def test_features_fill_image_tokens_in_sequence_order():
    model = InternVL(get_preset("tiny"))
    ids = _ids_with_images([[1], [2]])
    features = torch.arange(12 * 64, dtype=torch.float32).view(3, 4, 64)
    embeds = model.embed(ids, image_features=features)
    rows = embeds[ids == IMG]
    assert torch.equal(rows, features.reshape(12, 64))  # sample-major, left to right
    text = model.language_model.model.embed_tokens(ids)
    assert torch.equal(embeds[ids != IMG], text[ids != IMG])
    assert torch.equal(model.embed(ids, image_features=features.reshape(12, 64)), embeds)


@torch.no_grad()
def test_encode_images_shape_and_pixel_path_equals_feature_path():
    model = InternVL(get_preset("tiny"))
    pixels = torch.randn(3, 3, 56, 56)
    features = model.encode_images(pixels)
    assert features.shape == (3, model.config.num_image_token, 64)
    ids = _ids_with_images([[1], [2]])
    assert torch.equal(model(ids, pixels).logits, model(ids, image_features=features).logits)


def test_count_mismatch_names_both_counts():
    model = InternVL(get_preset("tiny"))
    ids = _ids_with_images([[2]])
    with pytest.raises(ModelInputError, match=r"8 image tokens.*4 feature rows"):
        model(ids, torch.randn(1, 3, 56, 56))
    with pytest.raises(ModelInputError, match="no pixel_values"):
        model(ids)
    with pytest.raises(ModelInputError, match="not both"):
        model(ids, torch.randn(2, 3, 56, 56), image_features=torch.zeros(2, 4, 64))


@torch.no_grad()
def test_image_flags_drop_dummy_tiles():
    model = InternVL(get_preset("tiny"))
    ids = _ids_with_images([[1], []])  # second sample is text-only with a dummy tile
    real, dummy = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56)
    want = model(ids, real).logits
    got = model(ids, torch.cat([real, dummy]), image_flags=torch.tensor([[1], [0]])).logits
    # the tiles are encoded as one batch of 2 instead of 1, and some CPUs' kernels round differently by batch
    # size (1.5e-7 seen on one machine, bit-identical on another): equal up to that rounding, not bit for bit
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    text_only = _ids_with_images([[]])
    assert torch.equal(model(text_only, dummy, image_flags=torch.tensor([0])).logits, model(text_only).logits)
    with pytest.raises(ModelInputError, match="3 entries for 2 tiles"):
        model(ids, torch.cat([real, dummy]), image_flags=torch.tensor([1, 0, 1]))


@torch.no_grad()
def test_mono_model_routes_image_tokens_to_visual_experts():
    model = _randomised(_mono_config())
    assert {k for k in model.state_dict() if k.startswith("vision_model.")} == {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
    }
    assert "language_model.model.layers.0.mlp_visual.gate_proj.weight" in model.state_dict()
    ids = _ids_with_images([[1, 1]])
    pixels = torch.randn(2, 3, 56, 56)
    got = model(ids, pixels).logits
    embeds = model.embed(ids, pixel_values=pixels)
    lm = model.language_model
    assert torch.equal(got, lm(inputs_embeds=embeds, visual_mask=ids == IMG).logits)
    assert not torch.allclose(got, lm(inputs_embeds=embeds).logits)  # text-only routing differs


def test_gradient_checkpointing_gives_same_gradients():
    model = _randomised(get_preset("tiny")).train()
    ids = _ids_with_images([[1], [1]])
    pixels = torch.randn(2, 3, 56, 56)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, pixels).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.vision_model.encoder.gradient_checkpointing and model.language_model.model.gradient_checkpointing
    checkpointed = grads()
    model.gradient_checkpointing_disable()
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, atol=1e-7, rtol=1e-5), name


def test_count_parameters_adds_up():
    model = InternVL(get_preset("tiny"))
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    lm = (
        counts["language.embeddings"] + counts["language.layers"] + counts["language.norm"] + counts["language.lm_head"]
    )
    assert counts["language"] == lm
    mono = count_parameters(InternVL(_mono_config()))
    assert mono["language.visual_experts"] == 2 * 3 * 64 * 128
    assert mono["vision"] == 32 * 3 * 14 * 14 + 32 + 32 + 17 * 32


def test_bf16_forward_runs_on_cpu():
    model = InternVL(get_preset("tiny")).to(torch.bfloat16).eval()
    ids = _ids_with_images([[1]])
    with torch.no_grad():
        out = model(ids, torch.randn(1, 3, 56, 56))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_vision_config_select_layer_is_used():
    config = get_preset("tiny")
    config.select_layer = 0  # embedding output only
    model = InternVL(config)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = model.encode_images(pixels)
        for p in model.vision_model.encoder.parameters():
            p.add_(1.0)  # encoder layers are unused at select_layer 0
        assert torch.equal(a, model.encode_images(pixels))


def test_dummy_tiles_keep_the_vision_tower_in_the_graph():
    # text-only batch with one dummy tile (flag 0): loss unchanged, yet every vision weight gets a gradient
    torch.manual_seed(0)
    model = InternVL(get_preset("tiny"))
    ids = torch.randint(0, 400, (1, 9))
    pixels = torch.randn(1, 3, 56, 56)
    with_dummy = model(ids, pixels, image_flags=torch.zeros(1, dtype=torch.long)).logits
    plain = model(ids).logits
    assert torch.equal(with_dummy, plain)
    with_dummy.sum().backward()
    for name, param in model.vision_model.named_parameters():
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) == 0, name


def test_other_downsample_ratios_unshuffle_to_fewer_tokens_and_bad_ones_are_refused():
    """1/k unshuffles k×k patches into one token (the official code allows any such k; released models use 2)."""
    import dataclasses

    from ivl.errors import ConfigError

    base = get_preset("tiny")
    config = dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, patch_size=7), downsample_ratio=0.25, force_image_size=56
    )
    model = InternVL(config)
    assert config.num_image_token == 4 and config.connector_in_features == 16 * config.vision.hidden_size
    features = model.encode_images(torch.randn(2, 3, 56, 56))
    assert features.shape == (2, 4, config.text.hidden_size)
    for ratio in (0.3, 1.0):
        with pytest.raises(ConfigError, match="downsample_ratio"):
            dataclasses.replace(base, downsample_ratio=ratio).validate()
    with pytest.raises(ConfigError, match="does not divide"):  # 56 px / 14 px = 4 patches: not divisible by 8
        dataclasses.replace(base, downsample_ratio=0.125).validate()
