"""Recipes: YAML + inheritance + key=value overrides, typed errors, and the shipped recipes' published numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ivl.errors import ConfigError
from ivl.training.recipe import load_recipe, parse_override, recipe_from_dict
from ivl.training.stages import plan_for

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def shipped() -> list[Path]:
    """The InternVL-2.5 stage recipes and the demo's (``_*.yaml`` and ``*_base.yaml`` are partial bases)."""
    found = [p for d in ("internvl2_5", "demo") for p in (RECIPES / d).glob("*.yaml")]
    return sorted(p for p in found if not p.name.startswith("_") and not p.stem.endswith("_base"))


def test_overrides_parse_yaml_values():
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("data.num_epochs=null") == (["data", "num_epochs"], None)
    assert parse_override("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("optim.lr")


def test_inherit_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"optim": {"lr": 1e-3, "weight_decay": 0.05}, "train": {"max_steps": 5}})
    )
    (tmp_path / "child.yaml").write_text(
        "inherit: base.yaml\nmodel:\n  preset: tiny\noptim:\n  lr: 2.0e-4\nstage:\n  name: stage1\n"
    )
    recipe = load_recipe(tmp_path / "child.yaml", ["train.max_steps=7", "stage.vision_drop_path=0.2"])
    assert recipe.optim.lr == 2e-4 and recipe.optim.weight_decay == 0.05  # child wins, parent fills in
    assert recipe.train.max_steps == 7 and recipe.stage.vision_drop_path == 0.2
    assert recipe.name == "child"
    assert plan_for(recipe.stage.name, **recipe.stage.plan_overrides()).vision_drop_path == 0.2


def test_unknown_keys_and_wrong_types_name_the_culprit(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.*unknown key.*'lrr'"):
        recipe_from_dict({"model": {"preset": "tiny"}, "optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer"):
        recipe_from_dict({"model": {"preset": "tiny"}, "train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="unknown recipe section"):
        recipe_from_dict({"model": {"preset": "tiny"}, "optimizer": {}})
    with pytest.raises(ConfigError, match="unknown stage"):
        recipe_from_dict({"model": {"preset": "tiny"}, "stage": {"name": "stage3"}})
    with pytest.raises(ConfigError, match=r"data\.loss_reduction: must be one of"):
        recipe_from_dict({"model": {"preset": "tiny"}, "data": {"loss_reduction": "mean"}})
    (tmp_path / "loop.yaml").write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "loop.yaml")


def test_grad_accumulation_from_global_batch():
    recipe = recipe_from_dict({"model": {"preset": "tiny"}, "train": {"global_batch_size": 1024}})
    assert recipe.grad_accum(512) == 2 and recipe.grad_accum(1) == 1024
    with pytest.raises(ConfigError, match="multiple of the world size"):
        recipe.grad_accum(3)


@pytest.mark.parametrize("path", shipped(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name


def _stage(stage: str, size: str):
    return load_recipe(RECIPES / "internvl2_5" / f"{stage}_{size}.yaml")


@pytest.mark.parametrize("size", ["1b", "2b", "4b", "8b", "26b", "38b", "78b"])
def test_internvl2_5_recipes_carry_the_published_hyper_parameters(size):
    """Spec internvl-2.5 §6.1 table."""
    big = size in ("8b", "26b", "38b", "78b")
    vit_6b = size in ("26b", "38b", "78b")
    s1, s15, s2 = _stage("stage1", size), _stage("stage1_5", size), _stage("stage2", size)
    for r in (s1, s15, s2):
        assert r.data.max_packed_tokens == 16384 and r.data.max_packed_tiles == 48
        assert r.data.loss_reduction == "square" and r.data.max_dynamic_patch == 12
        assert r.optim.betas == [0.9, 0.999] and r.optim.eps == 1e-8 and r.optim.max_grad_norm == 1.0
        assert r.train.gradient_checkpointing and r.optim.min_lr_ratio == 0.0
    assert s1.stage.name == "stage1" and s1.optim.lr == 2e-4 and s1.optim.warmup_steps == 100
    assert s1.optim.weight_decay == (0.05 if big else 0.01) and s1.train.global_batch_size == 512
    assert s1.stage.vision_drop_path == 0.0 and s1.model.init_new_tokens
    assert s15.stage.name == "stage1_5" and s15.optim.lr == 1e-5 and s15.optim.warmup_steps == 100
    assert s15.optim.weight_decay == 0.05 and s15.train.global_batch_size == 1024
    assert s15.stage.vision_drop_path == (0.4 if vit_6b else 0.1)
    assert s2.stage.name == "stage2" and s2.optim.warmup_ratio == 0.03 and s2.optim.warmup_steps is None
    assert s2.optim.lr == (2e-5 if size in ("26b", "38b", "78b") else 4e-5)
    assert s2.optim.weight_decay == (0.05 if big else 0.01) and s2.train.global_batch_size == 512
    assert s2.stage.vision_drop_path == (0.4 if vit_6b else 0.1)
    steps, epochs = {"1b": (22000, 4), "2b": (22000, 4), "4b": (11000, 2)}.get(size, (5500, 1))
    assert (s2.train.max_steps, s2.data.num_epochs) == (steps, epochs)


def test_stage_plans_of_the_recipes_match_the_spec():
    s1 = _stage("stage1", "8b")
    plan = plan_for(s1.stage.name, **s1.stage.plan_overrides())
    assert (plan.vision, plan.mlp, plan.llm) == (False, True, False)
    s15 = _stage("stage1_5", "8b")
    plan = plan_for(s15.stage.name, **s15.stage.plan_overrides())
    assert (plan.vision, plan.mlp, plan.llm) == (True, True, False)
