"""Mono-InternVL visual FFN experts: real per-token routing by the modality mask."""

from __future__ import annotations

import pytest
import torch

from ivl.models.attention import AttentionPlan
from ivl.models.cache import KVCache
from ivl.models.decoder import CausalLM


@pytest.fixture
def pair(make_text):
    """An expert model and a plain model sharing every non-expert weight; experts are very different."""
    cfg = make_text(flavour="internlm2", attention_bias=False, visual_experts=True)
    experts = CausalLM(cfg).eval()
    with torch.no_grad():
        for layer in experts.model.layers:
            for p in layer.mlp_visual.parameters():
                p.normal_(0, 0.5)
    plain = CausalLM(make_text(flavour="internlm2", attention_bias=False)).eval()
    missing, unexpected = plain.load_state_dict(experts.state_dict(), strict=False)
    assert not missing and all(".mlp_visual." in k for k in unexpected)
    return experts, plain


def _blend_reference(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Both FFNs on every token, blended by the 0/1 mask (the original HF formulation): slow but obvious."""
    dec = model.model
    h = dec.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    cos, sin = dec.rotary_emb(positions, h.dtype)
    m = mask[..., None].to(h.dtype)
    for layer in dec.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, AttentionPlan(is_causal=True))
        y = layer.post_attention_layernorm(h)
        h = h + (1 - m) * layer.mlp(y) + m * layer.mlp_visual(y)
    return model.lm_head(dec.norm(h))


@torch.no_grad()
def test_all_text_mask_is_bit_identical_to_plain_model(pair):
    experts, plain = pair
    ids = torch.randint(0, 256, (2, 11))
    want = plain(ids).logits
    assert torch.equal(experts(ids, visual_mask=torch.zeros(2, 11, dtype=torch.bool)).logits, want)
    assert torch.equal(experts(ids).logits, want)  # no mask = all text


@torch.no_grad()
def test_routed_equals_dense_blend(pair):
    experts, _ = pair
    ids = torch.randint(0, 256, (2, 13))
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 9:] = True
    got = experts(ids, visual_mask=mask).logits
    assert (got - _blend_reference(experts, ids, mask)).abs().max() <= 1e-5
    everything = torch.ones(2, 13, dtype=torch.bool)
    assert (
        experts(ids, visual_mask=everything).logits - _blend_reference(experts, ids, everything)
    ).abs().max() <= 1e-5


@torch.no_grad()
def test_each_token_goes_through_exactly_one_ffn(pair):
    experts, _ = pair
    seen = {"mlp": 0, "mlp_visual": 0}

    def counter(name):
        def hook(_module, args):
            seen[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    layer = experts.model.layers[0]
    handles = [layer.mlp.register_forward_pre_hook(counter("mlp"))]
    handles.append(layer.mlp_visual.register_forward_pre_hook(counter("mlp_visual")))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 3:6] = True
    experts(torch.randint(0, 256, (2, 10)), visual_mask=mask)
    assert seen == {"mlp": 14, "mlp_visual": 6}
    seen.update(mlp=0, mlp_visual=0)
    experts(torch.randint(0, 256, (2, 10)), visual_mask=torch.zeros(2, 10, dtype=torch.bool))
    assert seen == {"mlp": 20, "mlp_visual": 0}  # the visual FFN is skipped entirely
    for h in handles:
        h.remove()


@torch.no_grad()
def test_routing_by_mask_during_cached_decoding(pair):
    """A visual token arriving in a later cached step goes to the visual expert (no text-only shortcut)."""
    experts, _ = pair
    ids = torch.randint(0, 256, (1, 12))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 6:9] = True  # visual run after a text prefix
    full = experts(ids, visual_mask=mask).logits
    cache = KVCache.allocate(experts.config, 1, 12, dtype=torch.float32, device="cpu")
    steps = [experts(ids[:, :5], visual_mask=mask[:, :5], cache=cache).logits]
    for t in range(5, 9):  # one token at a time: text, visual, visual, visual
        steps.append(experts(ids[:, t : t + 1], visual_mask=mask[:, t : t + 1], cache=cache).logits)
    steps.append(experts(ids[:, 9:], visual_mask=mask[:, 9:], cache=cache).logits)  # chunk at an offset
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_gradients_reach_only_the_used_expert(pair):
    experts, _ = pair
    experts.train()
    ids = torch.randint(0, 256, (1, 8))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 2:4] = True
    experts(ids, visual_mask=mask).logits.sum().backward()
    layer = experts.model.layers[0]
    assert layer.mlp_visual.up_proj.weight.grad.abs().sum() > 0
    assert layer.mlp.up_proj.weight.grad.abs().sum() > 0
    experts.zero_grad(set_to_none=True)
    experts(ids).logits.sum().backward()
    assert layer.mlp_visual.up_proj.weight.grad is None


def test_init_visual_experts_from_text(make_text):
    model = CausalLM(make_text(visual_experts=True))
    model.init_visual_experts_from_text()
    for layer in model.model.layers:
        assert torch.equal(layer.mlp.gate_proj.weight, layer.mlp_visual.gate_proj.weight)
        assert layer.mlp.gate_proj.weight.data_ptr() != layer.mlp_visual.gate_proj.weight.data_ptr()
