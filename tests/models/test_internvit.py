"""InternViT parity: 300M style vs transformers' InternVLVisionModel, 6B style (QK-norm) vs a reference
written here, position-embedding interpolation, select_layer, drop path and the Mono patch stem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLVisionConfig, InternVLVisionModel

from ivl.config import VisionConfig
from ivl.errors import ModelInputError
from ivl.models.internvit import InternViT
from ivl.models.patch_embed import PatchStem, interpolate_position_embedding


def _vision(**overrides) -> VisionConfig:
    fields = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=56, patch_size=14
    )
    fields.update(overrides)
    return VisionConfig(**fields)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # layer scales, norms and embeddings all away from their init values
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


def _to_hf(sd: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Key map of spec §3.3 (vision part), written independently of the checkpoint package."""
    out = {}
    for key, value in sd.items():
        k = key.replace("embeddings.class_embedding", "embeddings.cls_token")
        k = k.replace("embeddings.position_embedding", "embeddings.position_embeddings")
        k = k.replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
        k = k.replace("encoder.layers.", "encoder.layer.")
        k = k.replace(".attn.proj.", ".attention.projection_layer.")
        k = k.replace(".attn.q_norm.", ".attention.q_norm.").replace(".attn.k_norm.", ".attention.k_norm.")
        k = k.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
        k = k.replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
        if ".attn.qkv." in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(dim, dim=0), strict=True):
                out[k.replace(".attn.qkv.", f".attention.{name}.")] = part
            continue
        out[k] = value
    return out


def _hf_vision(config: VisionConfig, ours: InternViT) -> InternVLVisionModel:
    hf = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            attention_bias=config.qkv_bias,
            use_qk_norm=config.qk_normalization,
            norm_type=config.norm_type,
            layer_norm_eps=config.layer_norm_eps,
            image_size=config.image_size,
            patch_size=config.patch_size,
            use_mean_pooling=True,
        )
    )
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(_to_hf(ours.state_dict(), config.hidden_size), strict=True)
    return hf.eval()


@pytest.mark.parametrize(
    "style",
    [dict(), dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True)],
    ids=["300m", "6b"],
)
def test_matches_transformers(style):
    config = _vision(**style)
    ours = _randomise(InternViT(config))
    hf = _hf_vision(config, ours)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = ours(pixels)
        want = hf(pixels, output_hidden_states=True)
        assert (got - want.last_hidden_state[:, 1:]).abs().max() <= 1e-4
        # select_layer indexes the hidden-state list whose element 0 is the embedding output
        for layer in (0, 1, -2):
            assert (ours(pixels, select_layer=layer) - want.hidden_states[layer][:, 1:]).abs().max() <= 1e-4
        # other image sizes interpolate the position table the same way
        other = torch.randn(1, 3, 84, 70)
        assert (ours(other) - hf(other).last_hidden_state[:, 1:]).abs().max() <= 1e-4


def _reference_6b(sd: dict[str, torch.Tensor], pixels: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """InternViT-6B block written from spec §1.2: RMSNorm, QK-norm over the full D, layer scale."""
    d, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    x = F.conv2d(pixels, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["embeddings.class_embedding"].expand(x.shape[0], 1, d), x], 1)
    x = x + sd["embeddings.position_embedding"]
    n, t, _ = x.shape
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        y = rms(x, sd[p + "norm1.weight"])
        qkv = y @ sd[p + "attn.qkv.weight"].T
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        q, k = rms(q, sd[p + "attn.q_norm.weight"]), rms(k, sd[p + "attn.k_norm.weight"])
        q, k, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads)).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(n, t, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + att * sd[p + "ls1"]
        y = rms(x, sd[p + "norm2.weight"])
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
    return x[:, 1:]


def test_6b_style_matches_reference():
    config = _vision(norm_type="rms_norm", qkv_bias=False, qk_normalization=True)
    ours = _randomise(InternViT(config))
    sd = ours.state_dict()
    assert "encoder.layers.0.attn.qkv.bias" not in sd and "encoder.layers.0.norm1.bias" not in sd
    assert sd["encoder.layers.0.attn.q_norm.weight"].shape == (32,)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (ours(pixels) - _reference_6b(sd, pixels, config)).abs().max() <= 1e-4


def test_position_interpolation_is_bicubic_in_fp32():
    table = torch.randn(1, 1 + 16, 8).to(torch.bfloat16)
    got = interpolate_position_embedding(table, 6, 5)
    grid = table[:, 1:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 30, 8).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:, 0], table[:, 0])
    assert torch.equal(got[:, 1:], want)
    assert interpolate_position_embedding(table, 4, 4) is table


def test_embeddings_at_other_size_match_direct_computation():
    config = _vision()
    model = _randomise(InternViT(config))
    emb = model.embeddings
    pixels = torch.randn(2, 3, 84, 70)  # 6 x 5 patch grid vs the 4 x 4 table
    with torch.no_grad():
        got = emb(pixels)
        patches = F.conv2d(pixels, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=14)
        patches = patches.flatten(2).transpose(1, 2)
        table = emb.position_embedding[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        pos = F.interpolate(table, size=(6, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        want = torch.cat([emb.class_embedding.expand(2, 1, 32) + emb.position_embedding[:, :1], patches + pos], 1)
    assert got.shape == (2, 31, 32)
    assert (got - want).abs().max() <= 1e-5


def test_drop_path_only_in_training():
    config = _vision(drop_path_rate=0.5)
    model = _randomise(InternViT(config))
    rates = [layer.drop_path_rate for layer in model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    pixels = torch.randn(8, 3, 56, 56)
    with torch.no_grad():
        eval_out = model(pixels)
        assert torch.equal(eval_out, model(pixels))
        model.train()
        train_out = model(pixels)
    assert not torch.allclose(train_out, eval_out)


def test_select_layer_out_of_range():
    with pytest.raises(ModelInputError, match="select_layer 4"):
        InternViT(_vision())(torch.randn(1, 3, 56, 56), select_layer=4)


def test_patch_stem_equals_vit_embeddings_without_cls():
    config = _vision(model_type="intern_vit_patch")
    stem = _randomise(PatchStem(config))
    assert set(stem.state_dict()) == {
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias",
        "embeddings.position_embedding",
    }
    vit = InternViT(_vision())
    vit.embeddings.load_state_dict(stem.embeddings.state_dict())
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(stem(pixels), vit(pixels, select_layer=0))
        assert stem(torch.randn(1, 3, 84, 70)).shape == (1, 30, 32)
