"""Freeze plans, train/eval modes, drop-path rates, trainable counts and new-token initialisation."""

from __future__ import annotations

import pytest
import torch

from ivl.config import get_preset
from ivl.errors import ConfigError
from ivl.models.internvl import InternVL, count_parameters
from ivl.training.stages import (
    apply_freeze_plan,
    format_trainable,
    init_new_token_rows,
    plan_for,
    resize_token_embeddings,
    set_train_mode,
    set_vision_drop_path,
    trainable_parameters,
)
from ivl.training.trainer import route_dummy_tile


@pytest.fixture
def model():
    torch.manual_seed(0)
    return InternVL(get_preset("tiny"))


def mono_model():
    config = get_preset("tiny")
    config.vision.model_type = "intern_vit_patch"
    config.text.visual_experts = True
    torch.manual_seed(0)
    return InternVL(config.validate())


def trainable_names(m):
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_stage_plans_select_the_official_components(model):
    apply_freeze_plan(model, plan_for("stage1"))
    assert trainable_names(model) == {n for n, _ in model.named_parameters() if n.startswith("mlp1.")}
    apply_freeze_plan(model, plan_for("stage1_5"))
    assert trainable_names(model) == {
        n for n, _ in model.named_parameters() if n.startswith(("mlp1.", "vision_model."))
    }
    apply_freeze_plan(model, plan_for("stage2"))
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_unfreeze_vit_layers_trains_only_the_last_layers(model):
    apply_freeze_plan(model, plan_for("stage1", unfreeze_vit_layers=-1))
    vit = {n for n in trainable_names(model) if n.startswith("vision_model.")}
    assert vit and all(n.startswith("vision_model.encoder.layers.1.") for n in vit)
    with pytest.raises(ConfigError, match="unfreeze_vit_layers"):
        plan_for("stage2", unfreeze_vit_layers=1)


def test_mono_evip_plans_unfreeze_visual_experts_then_attention():
    m = mono_model()
    apply_freeze_plan(m, plan_for("mono_s1_1"))
    llm = {n for n in trainable_names(m) if n.startswith("language_model.")}
    assert llm and all(".mlp_visual." in n for n in llm)
    apply_freeze_plan(m, plan_for("mono_s1_3"))
    llm = {n for n in trainable_names(m) if n.startswith("language_model.")}
    assert any(".self_attn." in n for n in llm) and any(".mlp_visual." in n for n in llm)
    # norms, text FFN, embeddings and head stay frozen in S1.3 (spec mono §8: 'attention.' misses the norms)
    assert not any(k in n for n in llm for k in ("layernorm", ".mlp.", "embed_tokens", "lm_head"))


def test_frozen_towers_are_put_in_eval_mode(model):
    plan = plan_for("stage1")
    apply_freeze_plan(model, plan)
    set_train_mode(model, plan)
    assert model.training and model.mlp1.training
    assert not model.language_model.training and not model.vision_model.training
    plan = plan_for("stage2")
    apply_freeze_plan(model, plan)
    set_train_mode(model, plan)
    assert model.language_model.training and model.vision_model.training


def test_drop_path_rates_increase_linearly_to_the_stage_rate():
    config = get_preset("tiny")
    config.vision.num_hidden_layers = 5
    m = InternVL(config)
    set_vision_drop_path(m, 0.4)
    rates = [layer.drop_path_rate for layer in m.vision_model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    apply_freeze_plan(m, plan_for("stage1"))  # the stage-1 plan sets drop path 0
    assert all(layer.drop_path_rate == 0.0 for layer in m.vision_model.encoder.layers)


def test_trainable_counts_add_up_to_the_model_total(model):
    apply_freeze_plan(model, plan_for("stage1"))
    counts = {c.name: c for c in trainable_parameters(model)}
    totals = count_parameters(model)
    assert sum(c.total for c in counts.values()) == totals["total"]
    assert counts["mlp1"].trainable == counts["mlp1"].total == totals["connector"]
    assert counts["vision"].trainable == 0 and counts["vision"].total == totals["vision"]
    assert sum(c.trainable for c in counts.values()) == totals["connector"]
    table = format_trainable(list(counts.values()))
    assert "mlp1" in table and f"{totals['connector']:,}" in table


def test_new_token_output_rows_get_the_mean_of_the_other_rows(model):
    head = model.language_model.lm_head.weight
    embed_before = model.language_model.model.embed_tokens.weight.clone()
    new = [500, 503, 506]
    expected = torch.cat([head[:500], head[501:503], head[504:506], head[507:]]).mean(0)
    init_new_token_rows(model, new)
    for t in new:
        torch.testing.assert_close(head[t], expected)
    assert torch.equal(model.language_model.model.embed_tokens.weight, embed_before)  # input rows untouched
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        init_new_token_rows(model, [512])


def test_resize_adds_mean_rows_and_keeps_old_ones(model):
    old_in = model.language_model.model.embed_tokens.weight.clone()
    old_out = model.language_model.lm_head.weight.clone()
    added = resize_token_embeddings(model, 515)
    assert added == list(range(512, 515))
    new_in, new_out = model.language_model.model.embed_tokens.weight, model.language_model.lm_head.weight
    assert new_in.shape == new_out.shape == (515, 64)
    assert torch.equal(new_in[:512], old_in) and torch.equal(new_out[:512], old_out)
    torch.testing.assert_close(new_out[513], old_out.mean(0))
    torch.testing.assert_close(new_in[514], old_in.mean(0))
    assert model.config.text.vocab_size == 515
    logits = model(torch.tensor([[1, 514, 2]])).logits
    assert logits.shape == (1, 3, 515)
    resize_token_embeddings(model, 510)  # shrinking keeps the first rows (padded Qwen vocabularies)
    assert torch.equal(model.language_model.model.embed_tokens.weight, old_in[:510])


def test_dummy_tile_routing_keeps_loss_and_gives_zero_vision_gradients(model):
    from ivl.training.loss import loss_weights, shift_targets, weighted_cross_entropy

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, 10, 11]])
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    targets = shift_targets(labels, cu)
    batch = {
        "input_ids": ids, "labels": labels, "targets": targets, "loss_weights": loss_weights(targets, "square", cu),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]]), "cu_seqlens": cu,
        "pixel_values": torch.zeros(1, 3, 56, 56), "image_flags": torch.zeros(1, dtype=torch.long),
        "num_real_tokens": 7,
    }  # fmt: skip
    routed = route_dummy_tile(batch, model.config.image_token_id, model.config.num_image_token)
    assert routed["input_ids"].shape[1] == 7 + 4 and routed["cu_seqlens"].tolist() == [0, 4, 7, 11]
    assert routed["image_flags"].tolist() == [1]

    def loss_of(b):
        out = model(b["input_ids"], b["pixel_values"], image_flags=b["image_flags"], position_ids=b["position_ids"],
                    cu_seqlens=b["cu_seqlens"])  # fmt: skip
        return weighted_cross_entropy(out.logits, b["targets"], b["loss_weights"])[0]

    plain, with_dummy = loss_of(batch), loss_of(routed)
    torch.testing.assert_close(with_dummy, plain, rtol=0, atol=1e-6)
    with_dummy.backward()
    grads = [p.grad for p in model.vision_model.parameters()] + [p.grad for p in model.mlp1.parameters()]
    assert all(g is not None for g in grads) and all(bool((g == 0).all()) for g in grads)
