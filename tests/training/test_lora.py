"""LoRA through peft: zero-effect at init, adapter save/load, merge equals base + adapter, `ivl merge-lora`, training."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ivl.checkpoint.io import load_model, save_model
from ivl.config import get_preset
from ivl.models.internvl import InternVL
from ivl.training.lora import add_lora, has_lora, load_adapter, lora_config, merge_lora, save_adapter

LLM = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VIT = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1, 2, 3, 500, 500, 500, 500, 9, 10, 11]])
    return ids, torch.randn(1, 3, 56, 56, generator=g)


def outputs(model):
    ids, pixels = inputs()
    with torch.no_grad():
        return model.eval()(ids, pixels).logits


def base_model():
    torch.manual_seed(0)
    return InternVL(get_preset("tiny"))


def perturb_adapters(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_targets_cover_llm_and_optional_vit_layers():
    model = add_lora(base_model(), lora_config(4, llm_targets=LLM, vision_targets=VIT))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "language_model.model.layers.0.self_attn.q_proj" in wrapped
    assert "language_model.model.layers.1.mlp.down_proj" in wrapped
    assert "vision_model.encoder.layers.0.attn.qkv" in wrapped and "vision_model.encoder.layers.1.mlp.fc2" in wrapped
    assert not any("mlp1" in n or "lm_head" in n for n in wrapped)
    assert len(wrapped) == 2 * 7 + 2 * 4
    cfg = lora_config(8)
    assert cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05  # official α = 2r, dropout 0.05


def test_adapter_round_trip_and_merge_equal_base_plus_adapter(tmp_path):
    base = outputs(base_model())
    model = add_lora(base_model(), lora_config(4, dropout=0.0, llm_targets=LLM, vision_targets=VIT))
    torch.testing.assert_close(outputs(model), base, rtol=0, atol=0)  # B = 0: no change at init
    perturb_adapters(model)
    adapted = outputs(model)
    assert (adapted - base).abs().max() > 1e-3
    save_adapter(model, lora_config(4, dropout=0.0, llm_targets=LLM, vision_targets=VIT), tmp_path / "adapter")

    reloaded = load_adapter(base_model(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(reloaded), adapted, rtol=0, atol=0)
    merged = merge_lora(reloaded)
    assert not has_lora(merged)
    assert set(merged.state_dict()) == set(base_model().state_dict())
    delta = (outputs(merged) - adapted).abs().max().item()
    assert delta < 1e-5, delta


def test_merge_lora_cli_writes_a_plain_official_checkpoint(tmp_path):
    from ivl.cli import app

    base = base_model()
    save_model(base, tmp_path / "base")
    model = add_lora(base_model(), lora_config(4, dropout=0.0, llm_targets=LLM))
    perturb_adapters(model)
    adapted = outputs(model)
    save_adapter(model, lora_config(4, dropout=0.0, llm_targets=LLM), tmp_path / "adapter", base=str(tmp_path / "base"))
    result = CliRunner().invoke(
        app,
        [
            "merge-lora",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "merged"),
        ],
    )
    assert result.exit_code == 0, result.output
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    delta = (outputs(merged) - adapted).abs().max().item()
    assert delta < 1e-5, delta


def test_lora_training_changes_only_adapters(make_recipe):
    from ivl.training.recipe import recipe_from_dict
    from ivl.training.trainer import build_model, train

    recipe = recipe_from_dict(make_recipe(lora={"enabled": True, "r": 4}, train={"max_steps": 3}, optim={"lr": 1e-2}))
    model, processor = build_model(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    try:
        result = train(recipe, model=model, processor=processor)
    finally:
        torch.set_num_threads(threads)
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    after = model.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("mlp1.", "vision_model.")) for k in changed)  # the plan's other parts
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # adapters left their zero init
    llm_base = [k for k in after if k.startswith("language_model.") and "lora_" not in k]
    assert all(torch.equal(after[k], before[k]) for k in llm_base if k in before)


@pytest.mark.parametrize("targets", [[], ["no_such_layer"]])
def test_bad_targets_raise(targets):
    from ivl.errors import ConfigError

    with pytest.raises(ConfigError):
        add_lora(base_model(), lora_config(4, llm_targets=targets))
