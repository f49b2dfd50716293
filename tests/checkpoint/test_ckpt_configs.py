"""config.json <-> InternVLConfig for both layouts, and lossless layout-to-layout conversion."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from ivl.checkpoint import configs
from ivl.config import get_preset
from ivl.errors import CheckpointError


def official_8b() -> dict:
    """Shaped like the shipped InternVL2_5-8B config.json, leftovers included (auto_map, int rope_theta, ...)."""
    internlm_map = {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    }
    return {
        "_commit_hash": None,
        "_name_or_path": "/mnt/petrelfs/share/InternVL2_5-8B",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "hidden_size": 4096,
        "image_fold": None,
        "llm_config": {
            "_name_or_path": "internlm/internlm2_5-7b-chat",
            "add_cross_attention": False,
            "architectures": ["InternLM2ForCausalLM"],
            "attn_implementation": "flash_attention_2",
            "auto_map": internlm_map,
            "bad_words_ids": None,
            "bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "internlm2",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "pad_token_id": 2,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rope_theta": 1000000,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.37.2",
            "use_bfloat16": True,
            "use_cache": True,
            "vocab_size": 92553,
        },
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "system_message": None,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": None,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "image_size": 448,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b",
            "norm_type": "layer_norm",
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "qk_normalization": False,
            "qkv_bias": True,
            "torch_dtype": "bfloat16",
            "use_flash_attn": True,
            "use_moe": False,
        },
    }


def _same_model(a, b) -> bool:
    """Equal configs up to the name and the spelling of rope_scaling ("type" vs "rope_type")."""

    def norm(c):
        rope = json.loads(configs._rope_key(c.text.rope_scaling))
        return dataclasses.replace(c, name="x", text=dataclasses.replace(c.text, rope_scaling=rope))

    return norm(a) == norm(b)


def test_official_8b_parses_to_preset():
    config = configs.official_to_config(official_8b())
    preset = get_preset("internvl2_5-8b")
    # the shipped llm_config says eos 2 (</s>); the preset stops on <|im_end|> (the template's stop token)
    assert config.text.eos_token_id == 2
    assert dataclasses.replace(config.text, eos_token_id=92542) == preset.text
    assert config.image_token_id == 92546  # <IMG_CONTEXT>: vocab 92553 - 7
    assert config.system_message is None  # null means the template's default
    assert dataclasses.replace(config.vision, initializer_factor=0.1) == preset.vision
    assert (config.template, config.use_thumbnail, config.max_dynamic_patch, config.force_image_size) == (
        "internvl2_5",
        True,
        12,
        448,
    )
    assert configs.config_dtype(official_8b()) is torch.bfloat16


def test_official_system_message_and_token_id_override():
    data = official_8b()
    data["system_message"] = "You are a helpful assistant."
    config = configs.official_to_config(data, image_token_id=1234)
    assert config.system_message == "You are a helpful assistant."
    assert config.image_token_id == 1234


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("llm_config", "architectures", ["MistralForCausalLM"], "MistralForCausalLM"),
        ("vision_config", "model_type", "siglip_vision", "siglip_vision"),
        (None, "ps_version", "v1", "ps_version"),
    ],
)
def test_official_rejects_unsupported(where, key, value, message):
    data = official_8b()
    (data[where] if where else data)[key] = value
    with pytest.raises(CheckpointError, match=message):
        configs.official_to_config(data)


@pytest.mark.parametrize("kind", ["qwen2", "internlm2", "internlm2_g3", "llama", "mono"])
def test_official_dict_round_trip(kind, tiny_config):
    config = tiny_config(kind)
    data = configs.config_to_official(config, dtype=torch.float32)
    assert data["torch_dtype"] == "float32" and data["llm_config"]["torch_dtype"] == "float32"
    assert _same_model(configs.official_to_config(json.loads(configs.dump_json(data))), config)
    if kind == "mono":
        assert data["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
        assert data["vision_config"]["model_type"] == "intern_vit_patch"


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_hf_dict_round_trip(kind, tiny_config):
    config = tiny_config(kind)
    data = configs.config_to_hf(config, dtype="bfloat16")
    assert data["tie_word_embeddings"] is False and data["image_seq_length"] == 4
    parsed = configs.hf_to_config(json.loads(configs.dump_json(data)))
    # HF keeps template / tiling limits outside config.json: InternVL-2.5 defaults come back
    assert _same_model(parsed, config)


def test_hf_config_loads_in_transformers(tiny_config):
    from transformers import InternVLConfig as HFConfig

    config = tiny_config("internlm2")
    hf = HFConfig.from_dict(configs.config_to_hf(config))
    assert hf.text_config.model_type == "llama"
    assert hf.text_config.rope_parameters["rope_type"] == "dynamic"
    assert hf.text_config.rope_parameters["rope_theta"] == 1_000_000.0
    assert hf.vision_config.use_qk_norm and hf.vision_config.norm_type == "rms_norm"
    assert hf.vision_config.attention_bias is False
    assert hf.tie_word_embeddings is False and hf.image_token_id == 500
    # ... and what transformers itself writes parses back to the same model
    assert _same_model(configs.hf_to_config(hf.to_dict()), dataclasses.replace(config, text=_as_llama(config.text)))


def _as_llama(text):
    return dataclasses.replace(text, flavour="llama")


def test_hf_rejects_unsupported(tiny_config):
    data = configs.config_to_hf(tiny_config("qwen2"))
    bad = copy.deepcopy(data)
    bad["text_config"]["model_type"] = "gemma2"
    with pytest.raises(CheckpointError, match="gemma2"):
        configs.hf_to_config(bad)
    bad = copy.deepcopy(data)
    bad["image_seq_length"] = 256
    with pytest.raises(CheckpointError, match="image_seq_length 256"):
        configs.hf_to_config(bad)
    bad = copy.deepcopy(data)
    bad["vision_config"]["use_mean_pooling"] = False
    with pytest.raises(CheckpointError, match="use_mean_pooling"):
        configs.hf_to_config(bad)
    with pytest.raises(CheckpointError, match="Mono-InternVL"):
        configs.config_to_hf(tiny_config("mono"))


def test_official_hf_official_is_byte_exact():
    original = official_8b()
    text = configs.dump_json(original)
    hf, hf_text = configs.official_to_hf_dict(original, text=text)
    assert json.loads(hf_text) == hf
    assert hf["text_config"]["model_type"] == "llama" and hf["image_token_id"] == 92546
    assert configs.OFFICIAL_EXTRAS in hf
    # the HF side knows it is really InternLM2 (template etc. come back through the stash)
    assert configs.hf_to_config(hf).text.flavour == "internlm2"
    back, back_text = configs.hf_to_official_dict(json.loads(hf_text), text=hf_text)
    assert back == original
    assert back_text == text


def test_non_standard_formatting_survives():
    original = official_8b()
    text = json.dumps(original, indent=4, ensure_ascii=False)  # unsorted keys, 4 spaces, no final newline
    _, hf_text = configs.official_to_hf_dict(original, text=text)
    _, back_text = configs.hf_to_official_dict(json.loads(hf_text), text=hf_text)
    assert back_text == text


def test_dtype_override_shows_after_round_trip():
    original = official_8b()
    _, hf_text = configs.official_to_hf_dict(original, dtype=torch.float16)
    hf = json.loads(hf_text)
    assert hf["torch_dtype"] == "float16"
    back, _ = configs.hf_to_official_dict(hf)
    assert back["torch_dtype"] == "float16" and back["llm_config"]["torch_dtype"] == "float16"
    assert back["auto_map"] == original["auto_map"]  # the rest is still restored


def test_hf_official_hf_is_lossless(tiny_config):
    """A transformers-written config (no ivl stash) survives hf -> official -> hf, its extras included."""
    from transformers import InternVLConfig as HFConfig

    hf = HFConfig.from_dict(configs.config_to_hf(tiny_config("qwen2"), dtype="float32")).to_dict()
    hf_text = configs.dump_json(hf)
    official, official_text = configs.hf_to_official_dict(hf, text=hf_text)
    assert configs.HF_EXTRAS in official
    _, again = configs.official_to_hf_dict(json.loads(official_text), text=official_text, image_token_id=500)
    assert again == hf_text


def test_json_diff_is_type_aware():
    diff = configs.json_diff({"a": 1, "b": {"c": True}}, {"a": 1.0, "b": {"c": 1}, "d": 0})
    assert diff == {"set": {"a": 1, "b": {"c": True}}, "drop": [["d"]]}
    patched = configs.json_patch({"a": 1.0, "b": {"c": 1}, "d": 0}, diff)
    assert json.dumps(patched, sort_keys=True) == json.dumps({"a": 1, "b": {"c": True}}, sort_keys=True)


def test_vocab_rule():
    assert configs.image_token_id_from_vocab(151674) == 151667
    assert configs.image_token_id_from_vocab(92553) == 92546


def test_parse_dtype():
    assert configs.parse_dtype("bf16") is torch.bfloat16
    assert configs.parse_dtype("torch.float16") is torch.float16
    with pytest.raises(CheckpointError, match="int4"):
        configs.parse_dtype("int4")


def test_vision_initializer_range_round_trips_and_sets_the_init_std(tiny_config):
    from ivl.models.internvl import InternVL

    config = tiny_config("qwen2")
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, initializer_range=0.05))
    official = configs.official_to_config(json.loads(configs.dump_json(configs.config_to_official(config))))
    hf = configs.hf_to_config(json.loads(configs.dump_json(configs.config_to_hf(config))))
    assert official.vision.initializer_range == hf.vision.initializer_range == 0.05
    torch.manual_seed(0)
    std = InternVL(official).vision_model.encoder.layers[0].mlp.fc1.weight.std().item()
    assert std == pytest.approx(0.05, rel=0.1)
