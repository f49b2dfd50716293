"""frozen_weights_report: finds every changed frozen tensor, ignores trained ones and re-initialised rows."""

from __future__ import annotations

import torch

from ivl.config import get_preset
from ivl.models.internvl import InternVL
from ivl.training.frozen_check import frozen_weights_report
from ivl.training.stages import plan_for


def _pair(tmp_path, preset: str, edit) -> tuple:
    torch.manual_seed(0)
    model = InternVL(get_preset(preset))
    before, after = tmp_path / "before", tmp_path / "after"
    model.save_pretrained(before)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(after)
    return before, after


def test_trained_parts_and_reinitialised_rows_are_not_reported(tmp_path):
    def edit(model):
        model.mlp1[1].weight.add_(1.0)  # trainable in stage 1
        model.language_model.lm_head.weight[3].zero_()  # a re-initialised new-token row

    before, after = _pair(tmp_path, "tiny", edit)
    report = frozen_weights_report(before, after, plan_for("stage1"), reinitialised_output_rows=[3], text_ids=[1, 2])
    assert report["changed"] == [] and report["frozen_tensors"] > 0
    assert report["text_logits_identical"] is True


def test_a_changed_frozen_weight_is_named(tmp_path):
    def edit(model):
        model.language_model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
        model.language_model.lm_head.weight[5, 0] += 1.0  # not in the excluded rows

    before, after = _pair(tmp_path, "tiny", edit)
    report = frozen_weights_report(before, after, plan_for("stage1"), reinitialised_output_rows=[3], text_ids=[1, 2, 3])
    assert sorted(report["changed"]) == [
        "language_model.lm_head.weight",
        "language_model.model.layers.0.mlp.down_proj.weight",
    ]
    assert report["text_logits_identical"] is False


def test_mono_s1_1_allows_visual_experts_only(tmp_path):
    def edit(model):
        model.language_model.model.layers[0].mlp_visual.up_proj.weight.mul_(2.0)

    before, after = _pair(tmp_path, "mono-tiny", edit)
    report = frozen_weights_report(before, after, plan_for("mono_s1_1"), text_ids=[1, 2, 3])
    assert report["changed"] == [] and report["text_logits_identical"] is True
    # S1.3 trains attention too: text logits are then not expected to match, so they are not compared
    assert frozen_weights_report(before, after, plan_for("mono_s1_3"), text_ids=[1])["text_logits_identical"] is None
