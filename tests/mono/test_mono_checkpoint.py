"""Official Mono-InternVL checkpoint layout in and out (spec mono-internvl §6, §13.5): strict, width from the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mono_helpers import IMG_CONTEXT, image_prompt, tiny_mono
from safetensors.torch import load_file, save_file

from ivl.config import MonoConfig
from ivl.errors import CheckpointError
from ivl.models.internvl import InternVL
from ivl.models.mono import MonoInternVL


def official_keys(layers: int) -> set[str]:
    """The key list of spec §6, written out by hand."""
    keys = {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
        "language_model.model.tok_embeddings.weight",
        "language_model.model.norm.weight",
        "language_model.output.weight",
    }
    keys |= {f"mlp1.{i}.{kind}" for i in (0, 1, 3) for kind in ("weight", "bias")}
    for i in range(layers):
        base = f"language_model.model.layers.{i}."
        keys |= {base + s for s in ("attention.wqkv.weight", "attention.wo.weight")}
        keys |= {base + s for s in ("attention_norm.weight", "ffn_norm.weight")}
        keys |= {f"{base}{ffn}.{w}.weight" for ffn in ("feed_forward", "feed_forward_ve") for w in ("w1", "w2", "w3")}
    return keys


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_saved_keys_and_config_are_the_official_mono_layout(mono_checkpoint):
    tensors = _tensors(mono_checkpoint)
    assert set(tensors) == official_keys(2)
    assert len(official_keys(24)) == 253  # the released model: ~248 tensors by index size, spec §6
    config = json.loads((mono_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config["model_type"] == "internvl_chat"
    assert config["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert config["vision_config"]["model_type"] == "intern_vit_patch"
    assert config["vision_config"]["hidden_size"] == 32
    assert (config["template"], config["ps_version"], config["downsample_ratio"]) == ("internlm2-chat", "v2", 0.5)


def test_saved_tensors_follow_the_official_packing(mono_checkpoint):
    """wqkv per KV head h: [q(h,0..g-1), k(h), v(h)]; feed_forward(_ve) w1/w3/w2 = gate/up/down."""
    model = tiny_mono(seed=1)
    tensors = _tensors(mono_checkpoint)
    layer = model.language_model.model.layers[1]
    heads, kv, d = 4, 2, 16
    g = heads // kv
    wqkv = tensors["language_model.model.layers.1.attention.wqkv.weight"].view(kv, g + 2, d, -1)
    q = layer.self_attn.q_proj.weight.view(heads, d, -1)
    for h in range(kv):
        for slot in range(g):
            assert torch.equal(wqkv[h, slot], q[h * g + slot])
        assert torch.equal(wqkv[h, g], layer.self_attn.k_proj.weight.view(kv, d, -1)[h])
        assert torch.equal(wqkv[h, g + 1], layer.self_attn.v_proj.weight.view(kv, d, -1)[h])
    ve = "language_model.model.layers.1.feed_forward_ve."
    assert torch.equal(tensors[ve + "w1.weight"], layer.mlp_visual.gate_proj.weight)
    assert torch.equal(tensors[ve + "w3.weight"], layer.mlp_visual.up_proj.weight)
    assert torch.equal(tensors[ve + "w2.weight"], layer.mlp_visual.down_proj.weight)
    assert torch.equal(tensors["language_model.output.weight"], model.language_model.lm_head.weight)


@torch.no_grad()
def test_round_trip_loads_strictly_into_mono_internvl(mono_checkpoint):
    loaded = MonoInternVL.from_pretrained(mono_checkpoint)
    assert type(loaded) is MonoInternVL and not loaded.training
    assert isinstance(loaded.config, MonoConfig) and loaded.config.text is loaded.language_model.config
    original = tiny_mono(seed=1)
    want = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor([image_prompt(1, [1, 5], [6, 7])])
    pixels = torch.randn(1, 3, 56, 56)
    assert torch.equal(loaded(ids, pixels).logits, original(ids, pixels).logits)
    # the generic loader (used by chat, engine and server) reads the same checkpoint identically
    generic = InternVL.from_pretrained(mono_checkpoint)
    assert generic.config.is_mono and torch.equal(generic(ids, pixels).logits, loaded(ids, pixels).logits)
    assert loaded.config.image_token_id == IMG_CONTEXT


def test_bf16_load(mono_checkpoint):
    loaded = MonoInternVL.from_pretrained(mono_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_strict_loading_names_the_offending_key(mono_checkpoint, tmp_path, change):
    path = _copy(mono_checkpoint, tmp_path / "ckpt")
    tensors = _tensors(path)
    if change == "missing":
        del tensors["language_model.model.layers.1.feed_forward_ve.w2.weight"]
        expect = r"missing.*mlp_visual\.down_proj"
    elif change == "unexpected":
        tensors["language_model.model.layers.1.feed_forward_ve2.w1.weight"] = torch.zeros(2, 2)
        expect = "unexpected.*feed_forward_ve2"
    else:
        tensors["mlp1.1.weight"] = torch.zeros(64, 64)
        expect = r"shape mismatch.*mlp1\.1\.weight"
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=expect):
        MonoInternVL.from_pretrained(path)


def test_rotary_buffers_in_the_file_are_ignored(mono_checkpoint, tmp_path):
    path = _copy(mono_checkpoint, tmp_path / "ckpt")
    tensors = _tensors(path)
    tensors["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(path / "model.safetensors"))
    assert isinstance(MonoInternVL.from_pretrained(path), MonoInternVL)


@torch.no_grad()
def test_vision_width_is_read_from_the_weights(mono_checkpoint, tmp_path):
    path = _copy(mono_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"]["hidden_size"]  # the default would be 1024; the weights say 32
    (path / "config.json").write_text(json.dumps(config))
    loaded = MonoInternVL.from_pretrained(path)
    assert loaded.config.vision.hidden_size == 32
    ids = torch.tensor([image_prompt(1, [1], [2])])
    pixels = torch.randn(1, 3, 56, 56)
    assert torch.equal(loaded(ids, pixels).logits, tiny_mono(seed=1)(ids, pixels).logits)


def test_a_config_width_that_contradicts_the_weights_is_refused(mono_checkpoint, tmp_path):
    path = _copy(mono_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision width of 32.*hidden_size = 48"):
        MonoInternVL.from_pretrained(path)


def test_a_vit_checkpoint_is_not_a_mono_checkpoint(tmp_path, mono_tokenizer_dir):
    from ivl.checkpoint.io import save_model
    from ivl.config import get_preset

    save_model(InternVL(get_preset("tiny")), tmp_path / "vit", copy_files_from=mono_tokenizer_dir)
    with pytest.raises(CheckpointError, match="not a Mono-InternVL config"):
        MonoInternVL.from_pretrained(tmp_path / "vit")
