"""EViP through the real trainer: S1.1/S1.2 change no language weight, S1.3 adds only attention; the recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from mono_helpers import IMG_END, IMG_START, tiny_mono

from ivl.config import get_preset
from ivl.training.recipe import load_recipe, recipe_from_dict
from ivl.training.stages import apply_freeze_plan, plan_for
from ivl.training.trainer import train

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "mono"
PROBE = torch.tensor([[1, 40, 41, 42, IMG_START, IMG_END, 43, 44, 45], [1, 90, 91, 92, 93, 94, 95, 96, 97]])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from ivl.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("mono_world") / "world"
    generate_world(root, seed=0, n_train=12, n_val=0, n_test=0, tasks=["colour", "shape", "text"],
                   image_size_range=(56, 112), absolute_paths=True)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def processor(world, tmp_path_factory):
    from ivl.data.synthetic import corpus_texts
    from ivl.processing.processor import Processor
    from ivl.processing.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus_texts(world), flavour="internlm2", save_dir=tmp_path_factory.mktemp("tok"))
    return Processor.from_config(tok, get_preset("mono-tiny"), max_num=2)


def run_stage(stage: str, model, processor, world: Path, out: Path, steps: int = 3):
    recipe = recipe_from_dict(
        {
            "model": {"preset": "mono-tiny"},
            "data": {
                "meta": str(world / "train_meta.json"),
                "max_packed_tokens": 512,
                "max_packed_tiles": 8,
                "max_dynamic_patch": 2,
                "num_epochs": None,
                "loss_reduction": "token",
            },
            "stage": {"name": stage},
            "optim": {"lr": 5e-3, "warmup_steps": 1, "weight_decay": 0.01},
            "train": {"output_dir": str(out), "max_steps": steps, "progress": False, "threads": 1, "save_final": False},
        }
    )
    result = train(recipe, model=model, processor=processor, log=lambda _msg: None)
    assert result.steps == steps and all(torch.isfinite(torch.tensor(result.losses)))
    return model.eval()


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("stage", ["mono_s1_1", "mono_s1_2"])
def test_s1_1_and_s1_2_change_no_language_weight(stage, world, processor, tmp_path):
    model = tiny_mono(seed=2)
    before_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(PROBE).logits
    run_stage(stage, model, processor, world, tmp_path / stage)
    with torch.no_grad():
        after = model(PROBE).logits
    assert torch.equal(after, before)  # text-only logits bit-identical after the optimizer steps
    changed = _changed(before_state, model.state_dict())
    language = {k for k in changed if k.startswith("language_model.") and ".mlp_visual." not in k}
    assert not language
    # and the visual parameters really trained (so the check above is not vacuous)
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("mlp1.") for k in changed)
    assert any(".mlp_visual." in k for k in changed)


def test_s1_3_trains_attention_but_not_norms_or_text_ffn(world, processor, tmp_path):
    model = tiny_mono(seed=3)
    before_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(PROBE).logits
    run_stage("mono_s1_3", model, processor, world, tmp_path / "s13")
    changed = _changed(before_state, model.state_dict())
    language = {k for k in changed if k.startswith("language_model.") and ".mlp_visual." not in k}
    assert language and all(".self_attn." in k for k in language)
    assert {k.rsplit(".", 2)[-2] for k in language} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with torch.no_grad():
        assert not torch.equal(model(PROBE).logits, before)  # attention moved, as S1.3 intends


# --------------------------------------------------------------------------------------------------------
# recipes


def _trainable_kinds(stage_name: str, overrides: dict) -> dict[str, bool]:
    model = tiny_mono()
    apply_freeze_plan(model, plan_for(stage_name, **overrides))
    kinds: dict[str, set[bool]] = {}
    for name, p in model.named_parameters():
        if name.startswith(("vision_model.", "mlp1.")):
            kind = name.split(".")[0]
        elif ".mlp_visual." in name:
            kind = "visual_experts"
        elif ".self_attn." in name:
            kind = "attention"
        elif "layernorm" in name or name.endswith("model.norm.weight"):
            kind = "norms"
        elif ".mlp." in name:
            kind = "text_ffn"
        else:
            kind = "embeddings_and_head"
        kinds.setdefault(kind, set()).add(p.requires_grad)
    assert all(len(v) == 1 for v in kinds.values()), kinds  # every part is wholly frozen or wholly trained
    return {k: next(iter(v)) for k, v in kinds.items()}


VISUAL_ONLY = {"vision_model": True, "mlp1": True, "visual_experts": True, "attention": False, "norms": False,
               "text_ffn": False, "embeddings_and_head": False}  # fmt: skip


@pytest.mark.parametrize(
    ("file", "tiles", "lr", "trainable"),
    [
        ("s1_1_concept.yaml", 4, 5e-5, VISUAL_ONLY),
        ("s1_2_semantic.yaml", 6, 5e-5, VISUAL_ONLY),
        ("s1_3_alignment.yaml", 12, 5e-5, {**VISUAL_ONLY, "attention": True}),
        ("s2_instruct.yaml", 12, 4e-5, dict.fromkeys(VISUAL_ONLY, True)),
        ("sft_llava.yaml", 6, 4e-5, dict.fromkeys(VISUAL_ONLY, True)),
    ],
)
def test_evip_recipes(file, tiles, lr, trainable):
    recipe = load_recipe(RECIPES / file)
    assert recipe.data.max_dynamic_patch == tiles and recipe.data.use_thumbnail and recipe.data.min_dynamic_patch == 1
    assert recipe.optim.lr == lr and recipe.optim.weight_decay == 0.01 and recipe.data.loss_reduction == "token"
    assert recipe.model.checkpoint and recipe.data.augment
    assert _trainable_kinds(recipe.stage.name, recipe.stage.plan_overrides()) == trainable
    # the image-token cap of the stage (spec §8): 256 tokens per tile, thumbnail included
    assert 256 * (tiles + 1) == {4: 1280, 6: 1792, 12: 3328}[tiles]


def test_stage_chain_follows_the_evip_order():
    starts = {f: load_recipe(RECIPES / f).model.checkpoint for f in
              ("s1_1_concept.yaml", "s1_2_semantic.yaml", "s1_3_alignment.yaml", "s2_instruct.yaml")}  # fmt: skip
    outputs = {f: load_recipe(RECIPES / f).train.output_dir for f in starts}
    assert starts["s1_2_semantic.yaml"] == outputs["s1_1_concept.yaml"] + "/final"
    assert starts["s1_3_alignment.yaml"] == outputs["s1_2_semantic.yaml"] + "/final"
    assert starts["s2_instruct.yaml"] == outputs["s1_3_alignment.yaml"] + "/final"
    assert load_recipe(RECIPES / "s1_3_alignment.yaml").train.max_steps == 70000
