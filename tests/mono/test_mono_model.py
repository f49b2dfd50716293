"""MonoInternVL: presets, the encoder-free visual embedding, static routing and its guarantees (spec §3-§5, §13)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from mono_helpers import IMG_CONTEXT, IMG_END, IMG_START, image_prompt, tiny_mono

from ivl.config import InternVLConfig, MonoConfig, get_preset
from ivl.errors import ConfigError
from ivl.models.attention import AttentionPlan
from ivl.models.cache import KVCache
from ivl.models.decoder import CausalLM
from ivl.models.internvl import InternVL, count_parameters
from ivl.models.mono import MonoInternVL

# --------------------------------------------------------------------------------------------------------
# independent references written here


def plain_decoder(model: MonoInternVL) -> CausalLM:
    """The base decoder without experts, holding the model's other language weights."""
    plain = CausalLM(dataclasses.replace(model.config.text, visual_experts=False)).eval()
    missing, unexpected = plain.load_state_dict(model.language_model.state_dict(), strict=False)
    assert not missing and unexpected and all(".mlp_visual." in k for k in unexpected)
    return plain


def dense_blend_logits(model: MonoInternVL, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    """Both FFNs on every token, blended by the 0/1 ``<IMG_CONTEXT>`` mask (the original HF formulation)."""
    dec = model.language_model.model
    h = model.embed(ids, pixel_values=pixels)
    cos, sin = dec.rotary_emb(torch.arange(ids.shape[1])[None].expand_as(ids), h.dtype)
    m = (ids == IMG_CONTEXT)[..., None].to(h.dtype)
    for layer in dec.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, AttentionPlan(is_causal=True))
        y = layer.post_attention_layernorm(h)
        h = h + (1 - m) * layer.mlp(y) + m * layer.mlp_visual(y)
    return model.language_model.lm_head(dec.norm(h))


def reference_visual_tokens(model: InternVL, pixels: torch.Tensor) -> torch.Tensor:
    """Patch conv as a matmul, + positions (CLS row dropped), 2x2 unshuffle by explicit TL/TR/BL/BR loops, mlp1."""
    emb = model.vision_model.embeddings
    weight, bias = emb.patch_embedding.weight, emb.patch_embedding.bias
    c, p = weight.shape[0], weight.shape[-1]
    n, _, height, width = pixels.shape
    gh, gw = height // p, width // p
    patches = pixels.reshape(n, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, 3 * p * p)
    x = patches @ weight.reshape(c, -1).T + bias
    table = emb.position_embedding[0, 1:]
    side = math.isqrt(table.shape[0])
    if (gh, gw) != (side, side):
        grid = table.reshape(1, side, side, c).permute(0, 3, 1, 2)
        table = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        table = table.reshape(gh * gw, c)
    grid = (x + table).reshape(n, gh, gw, c)
    tokens = []
    for r in range(gh // 2):
        for q in range(gw // 2):
            corners = [
                grid[:, 2 * r, 2 * q],
                grid[:, 2 * r, 2 * q + 1],
                grid[:, 2 * r + 1, 2 * q],
                grid[:, 2 * r + 1, 2 * q + 1],
            ]
            tokens.append(torch.cat(corners, dim=-1))
    y = torch.stack(tokens, dim=1)
    ln, fc1, fc2 = model.mlp1[0], model.mlp1[1], model.mlp1[3]
    y = F.layer_norm(y, (y.shape[-1],), ln.weight, ln.bias, 1e-5)
    y = y @ fc1.weight.T + fc1.bias
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return y @ fc2.weight.T + fc2.bias


def count_ffn_tokens(model: MonoInternVL, layer: int = 0) -> tuple[dict[str, int], list]:
    seen = {"mlp": 0, "mlp_visual": 0}

    def counter(name):
        def hook(_module, args):
            seen[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    block = model.language_model.model.layers[layer]
    handles = [block.mlp.register_forward_pre_hook(counter("mlp"))]
    handles.append(block.mlp_visual.register_forward_pre_hook(counter("mlp_visual")))
    return seen, handles


# --------------------------------------------------------------------------------------------------------
# config and presets


def test_mono_2b_preset_matches_spec_dimensions():
    cfg = get_preset("mono-internvl-2b")
    assert isinstance(cfg, MonoConfig) and cfg.is_mono and cfg.text.visual_experts
    t = cfg.text
    assert (t.flavour, t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (
        "internlm2", 24, 2048, 16, 8,
    )  # fmt: skip
    assert (t.intermediate_size, t.vocab_size, t.attention_bias, t.tie_word_embeddings) == (8192, 92553, False, False)
    assert (t.rms_norm_eps, t.rope_theta) == (1e-5, 1e6)
    assert cfg.image_token_id == 92546 and cfg.num_image_token == 256 and cfg.template == "internlm2-chat"
    assert (cfg.vision.hidden_size, cfg.vision.patch_size, cfg.image_size) == (1024, 14, 448)
    assert (cfg.ps_version, cfg.downsample_ratio, cfg.use_thumbnail, cfg.max_dynamic_patch) == ("v2", 0.5, True, 12)


def test_mono_2b_parameter_count_matches_spec_arithmetic():
    """Spec §1: 3,111,355,392 parameters = LLM with 24 visual FFNs + patch embedding + mlp1."""
    with torch.device("meta"):
        model = MonoInternVL(get_preset("mono-internvl-2b"))
    counts = count_parameters(model)
    assert counts["vision"] == 1_653_760
    assert counts["connector"] == 12_595_200
    assert counts["language"] == 3_097_106_432
    assert counts["language.visual_experts"] == 24 * 3 * 2048 * 8192
    assert counts["total"] == 3_111_355_392


def test_mono_config_rejects_a_vit_config_and_defaults_to_2b():
    with pytest.raises(ConfigError, match="intern_vit_patch"):
        MonoConfig.from_config(get_preset("tiny"))
    with pytest.raises(ConfigError, match="not a Mono-InternVL config"):
        MonoInternVL(get_preset("tiny"))
    assert MonoConfig() == get_preset("mono-internvl-2b")
    cfg = MonoConfig.from_dict({"text": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}})
    assert cfg.is_mono and cfg.text.visual_experts and cfg.text.vocab_size == 92553
    assert InternVLConfig.from_dict(cfg.to_dict()) == InternVLConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(InternVLConfig)}
    )


def test_ivl_exports_mono_names():
    import ivl

    assert ivl.MonoInternVL is MonoInternVL and ivl.MonoConfig is MonoConfig
    assert issubclass(MonoInternVL, InternVL)


# --------------------------------------------------------------------------------------------------------
# visual embedding


@torch.no_grad()
def test_one_448_tile_gives_256_tokens_matching_a_hand_reference():
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "num_hidden_layers": 1}  # fmt: skip
    model = MonoInternVL(MonoConfig.from_dict({"text": text})).eval()  # vision C = 1024 as released
    pixels = torch.randn(1, 3, 448, 448)
    got = model.encode_images(pixels)
    assert got.shape == (1, 256, 64)
    assert (got - reference_visual_tokens(model, pixels)).abs().max() <= 1e-4


@torch.no_grad()
def test_thirteen_tiles_give_3328_tokens():
    text = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
            "num_hidden_layers": 1}  # fmt: skip
    model = MonoInternVL(MonoConfig.from_dict({"vision": {"hidden_size": 8}, "text": text})).eval()
    assert model.encode_images(torch.randn(13, 3, 448, 448)).reshape(-1, 32).shape[0] == 3328


@torch.no_grad()
def test_other_grids_interpolate_positions_bicubically_and_drop_cls(mono_model):
    pixels = torch.randn(2, 3, 56, 84)  # 4x6 patches against a 4x4 position table
    got = mono_model.encode_images(pixels)
    assert got.shape == (2, 6, 64)
    assert (got - reference_visual_tokens(mono_model, pixels)).abs().max() <= 1e-5
    native = torch.randn(1, 3, 56, 56)
    assert (mono_model.encode_images(native) - reference_visual_tokens(mono_model, native)).abs().max() <= 1e-5
    # the CLS embedding is dead weight: changing it changes nothing
    before = mono_model.encode_images(native)
    mono_model.vision_model.embeddings.class_embedding.add_(5.0)
    assert torch.equal(mono_model.encode_images(native), before)


# --------------------------------------------------------------------------------------------------------
# routing and its guarantees


def test_routing_mask_is_exactly_the_image_context_token(mono_model):
    ids = torch.tensor([image_prompt(1, [1, 7], [9])])
    mask = mono_model.visual_token_mask(ids)
    assert mask.tolist() == [[tok == IMG_CONTEXT for tok in ids[0].tolist()]]
    seen, handles = count_ffn_tokens(mono_model)
    with torch.no_grad():
        mono_model(ids, torch.randn(1, 3, 56, 56))
    for h in handles:
        h.remove()
    # <img> and </img> go through the text FFN with the rest of the text
    assert seen == {"mlp": ids.shape[1] - 4, "mlp_visual": 4}


@torch.no_grad()
def test_text_only_is_bit_identical_to_the_base_decoder_whatever_the_experts(mono_model):
    plain = plain_decoder(mono_model)
    ids = torch.randint(0, 480, (2, 15))
    ids[:, 3], ids[:, 9] = IMG_START, IMG_END  # image delimiters alone are text
    want = plain(ids).logits
    assert torch.equal(mono_model(ids).logits, want)
    for layer in mono_model.language_model.model.layers:
        for p in layer.mlp_visual.parameters():
            p.fill_(float("nan"))  # any expert weights at all, even NaN, must not touch the text path
    assert torch.equal(mono_model(ids).logits, want)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding too
    assert torch.equal(mono_model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


@torch.no_grad()
def test_experts_equal_to_text_ffn_give_the_plain_decoder_on_the_same_embeddings(mono_model):
    mono_model.language_model.init_visual_experts_from_text()
    ids = torch.tensor([image_prompt(2, [1, 20, 21], [30, 31, 32]), image_prompt(2, [1, 40, 41], [50, 51, 52])])
    pixels = torch.randn(4, 3, 56, 56)
    got = mono_model(ids, pixels).logits
    want = plain_decoder(mono_model)(inputs_embeds=mono_model.embed(ids, pixel_values=pixels)).logits
    assert (got - want).abs().max() <= 1e-5


@torch.no_grad()
def test_routed_output_equals_the_dense_blend_reference(mono_model):
    ids = torch.tensor([image_prompt(2, [1, 20], [30, 31, 32, 33]), image_prompt(2, [1, 40, 41, 42], [50, 51])])
    pixels = torch.randn(4, 3, 56, 56)
    got = mono_model(ids, pixels).logits
    delta = (got - dense_blend_logits(mono_model, ids, pixels)).abs().max()
    assert delta <= 1e-5
    # the experts really matter here (so the comparison is not vacuous)
    assert (
        got - plain_decoder(mono_model)(inputs_embeds=mono_model.embed(ids, pixel_values=pixels)).logits
    ).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------
# KV cache


def _greedy_without_cache(model, ids, pixels, steps):
    seq = ids
    for _ in range(steps):
        logits = model(seq, pixels).logits[:, -1]
        logits[:, IMG_CONTEXT] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def _greedy_with_cache(model, ids, pixels, steps):
    cache = KVCache.allocate(model.config.text, 1, ids.shape[1] + steps, dtype=torch.float32)
    logits = model(ids, pixels, cache=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        logits[:, IMG_CONTEXT] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        logits = model(token, cache=cache).logits[:, -1]
    return out


@torch.no_grad()
def test_greedy_with_cache_equals_greedy_without(mono_model):
    ids = torch.tensor([image_prompt(2, [1, 11, 12], [13, 14, 15])])
    pixels = torch.randn(2, 3, 56, 56)
    want = _greedy_without_cache(mono_model, ids, pixels, 16)
    assert len(set(want)) > 3  # a non-degenerate continuation
    assert _greedy_with_cache(mono_model, ids, pixels, 16) == want


@torch.no_grad()
def test_image_appended_after_cached_turns_is_routed_to_the_experts(mono_model):
    turn1 = torch.tensor([[1, 60, 61, 62, 63, 64]])
    cache = KVCache.allocate(mono_model.config.text, 1, 64, dtype=torch.float32)
    logits = mono_model(turn1, cache=cache).logits[:, -1:]
    history = [turn1]
    for _ in range(3):  # a cached answer
        token = logits[:, -1].argmax(-1, keepdim=True)
        history.append(token)
        logits = mono_model(token, cache=cache).logits
    turn2 = torch.tensor([image_prompt(1, [70, 71], [72, 73, 74])])
    pixels = torch.randn(1, 3, 56, 56)
    seen, handles = count_ffn_tokens(mono_model)
    cached = mono_model(turn2, pixels, cache=cache).logits
    for h in handles:
        h.remove()
    assert seen == {"mlp": turn2.shape[1] - 4, "mlp_visual": 4}
    full_ids = torch.cat([*history, turn2], dim=1)
    full = mono_model(full_ids, pixels).logits[:, -turn2.shape[1] :]
    assert (cached - full).abs().max() <= 1e-5
    assert (cached - dense_blend_logits(mono_model, full_ids, pixels)[:, -turn2.shape[1] :]).abs().max() <= 1e-5

    # the official HF shortcut (every cached-step token to the text FFN) would give something else
    quirk_cache = KVCache.allocate(mono_model.config.text, 1, 64, dtype=torch.float32)
    prefix = torch.cat(history, dim=1)
    mono_model(prefix, cache=quirk_cache)
    embeds = mono_model.embed(turn2, pixel_values=pixels)
    quirk = mono_model.language_model(inputs_embeds=embeds, cache=quirk_cache).logits
    assert (quirk - full).abs().max() > 1e-2


def test_two_seeds_give_different_models():
    """Guards the fixtures: the spread init really depends on the seed (tests above compare distinct weights)."""
    a, b = tiny_mono(0), tiny_mono(1)
    assert not torch.equal(a.mlp1[1].weight, b.mlp1[1].weight)
