"""Safetensors IO: layouts, save/load round trips, strict errors, atomic writes, lossless conversion, CLI."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ivl.checkpoint import configs, io
from ivl.checkpoint.layouts import detect_layout
from ivl.errors import CheckpointError


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- layouts


def test_detect_layout(tmp_path, random_model):
    model = random_model("qwen2")
    io.save_model(model, tmp_path / "a", layout="official")
    io.save_model(model, tmp_path / "b", layout="hf")
    assert detect_layout(tmp_path / "a") == "official"
    assert detect_layout(tmp_path / "b") == "hf"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"model_type": "llava", "architectures": ["LlavaForCausalLM"]}')
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*llava"):
        detect_layout(tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        detect_layout(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_layout(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("kind", "layout"),
    [("qwen2", "official"), ("qwen2", "hf"), ("internlm2", "official"), ("internlm2_mqa", "hf"), ("mono", "official")],
)
def test_save_load_round_trip(kind, layout, tmp_path, random_model):
    model = random_model(kind)
    io.save_model(model, tmp_path / "ckpt", layout=layout, max_shard_size="30KB")
    names = _files(tmp_path / "ckpt")
    assert io.INDEX_FILE in names and len([n for n in names if n.endswith(".safetensors")]) > 2
    index = json.loads((tmp_path / "ckpt" / io.INDEX_FILE).read_text())
    sizes = sum(os.path.getsize(tmp_path / "ckpt" / f) for f in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] <= sizes  # headers add a little on top of the tensor bytes
    loaded = io.load_model(tmp_path / "ckpt")
    assert _equal_states(model, loaded)
    assert not loaded.training
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    if layout == "hf":  # the spelling transformers' save_pretrained writes
        keys = set(index["weight_map"])
        assert (
            "vision_tower.encoder.layer.0.attention.q_proj.weight" in keys and "language_model.lm_head.weight" in keys
        )


def test_single_file_and_dtypes(tmp_path, random_model):
    model = random_model("internlm2").to(torch.bfloat16)
    io.save_model(model, tmp_path / "ckpt")
    assert _files(tmp_path / "ckpt") == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = io.load_model(tmp_path / "ckpt")  # dtype None: the checkpoint's
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert _equal_states(model, loaded)
    as_fp32 = io.load_model(tmp_path / "ckpt", dtype="float32", device="cpu")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.mlp1[1].weight, model.mlp1[1].weight.float())


def test_empty_model_allocates_nothing(tiny_config):
    model = io.empty_model(tiny_config("qwen2"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_image_token_id_from_tokenizer_files(tmp_path, random_model):
    model = random_model("qwen2")
    io.save_model(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["image_token_id"]  # shipped official configs do not carry it
    (tmp_path / "ckpt" / "config.json").write_text(configs.dump_json(config))
    assert io.load_model(tmp_path / "ckpt").config.image_token_id == 505  # vocab 512 - 7
    (tmp_path / "ckpt" / "added_tokens.json").write_text(json.dumps({"<img>": 498, "<IMG_CONTEXT>": 500}))
    assert io.load_model(tmp_path / "ckpt").config.image_token_id == 500


# ---------------------------------------------------------------------------------------------- strict errors


@pytest.fixture
def sharded(tmp_path, random_model):
    model = random_model("qwen2")
    path = tmp_path / "ckpt"
    io.save_model(model, path, max_shard_size="30KB")
    return path


def _shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / io.INDEX_FILE).read_text())["weight_map"][key]


def test_missing_shard(sharded):
    shard = _shard_of(sharded, "mlp1.1.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard files .* missing: {shard.name}"):
        io.load_model(sharded)


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_key(sharded):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    _rewrite(_shard_of(sharded, key), lambda t: t.pop(key))
    index = json.loads((sharded / io.INDEX_FILE).read_text())
    del index["weight_map"][key]
    (sharded / io.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): language_model\.model\.layers\.1\.mlp\.up_proj"):
        io.load_model(sharded)


def test_key_absent_from_its_shard(sharded):
    key = "mlp1.3.bias"
    _rewrite(_shard_of(sharded, key), lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"lacks tensors the index puts there: mlp1\.3\.bias"):
        io.load_model(sharded)


def test_unexpected_keys(sharded):
    def add(tensors):
        tensors["vision_model.encoder.layers.7.attn.qkv.weight"] = torch.zeros(2)
        tensors["decoder.extra"] = torch.zeros(2)

    _rewrite(_shard_of(sharded, "mlp1.0.bias"), add)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): ") as info:
        io.load_model(sharded)
    assert "vision_model.encoder.layers.7.attn.qkv.weight" in str(info.value) and "decoder.extra" in str(info.value)


def test_shape_mismatch(sharded):
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    _rewrite(_shard_of(sharded, key), lambda t: t.__setitem__(key, torch.zeros(16, 64)))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch \(1\): .*k_proj\.weight: expected \(32, 64\), found \(16, 64\)"
    ):
        io.load_model(sharded)


def test_unknown_architecture(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Phi3ForCausalLM"):
        io.load_model(sharded)


def test_no_weights(tmp_path, sharded):
    for f in sharded.glob("model*"):
        f.unlink()
    (sharded / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"no model\.safetensors\.index\.json or model\.safetensors.*pytorch_model\.bin"
    ):
        io.load_model(sharded)


# ---------------------------------------------------------------------------------------------- atomic writes


class _Boom(RuntimeError):
    pass


def _failing_save_file(monkeypatch, after: int) -> None:
    real = io.save_file
    calls = {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise _Boom("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "save_file", save)


def test_failed_save_leaves_nothing(tmp_path, random_model, monkeypatch):
    _failing_save_file(monkeypatch, after=2)
    with pytest.raises(_Boom):
        io.save_model(random_model("qwen2"), tmp_path / "ckpt", max_shard_size="30KB")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory


def test_failed_save_keeps_old_checkpoint(tmp_path, random_model, monkeypatch):
    path = tmp_path / "ckpt"
    io.save_model(random_model("qwen2", seed=1), path, max_shard_size="30KB")
    before = {f: (path / f).read_bytes() for f in _files(path)}
    _failing_save_file(monkeypatch, after=3)
    with pytest.raises(_Boom):
        io.save_model(random_model("qwen2", seed=2), path, max_shard_size="30KB")
    assert {f: (path / f).read_bytes() for f in _files(path)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrites_checkpoint_but_not_other_directories(tmp_path, random_model):
    path = tmp_path / "ckpt"
    io.save_model(random_model("qwen2", seed=1), path, max_shard_size="30KB")
    newer = random_model("qwen2", seed=2)
    io.save_model(newer, path)  # a checkpoint may be replaced; stale shards disappear with it
    assert _files(path) == ["config.json", "model.safetensors"]
    assert _equal_states(io.load_model(path), newer)
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(CheckpointError, match="not a checkpoint directory; refusing"):
        io.save_model(newer, precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"


# ---------------------------------------------------------------------------------------------- conversion


def _official_like(path: Path, model, monkeypatch_dtype=None) -> None:
    """An official-looking checkpoint: config with the usual leftovers, tokenizer files, remote code, examples."""
    io.save_model(model, path, max_shard_size="30KB")
    config = json.loads((path / "config.json").read_text())
    del config["image_token_id"]
    config["_name_or_path"] = "/mnt/share/InternVL2_5-tiny"
    config["auto_map"] = {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    config["llm_config"]["rope_theta"] = int(config["llm_config"]["rope_theta"])
    config["llm_config"]["attn_implementation"] = "flash_attention_2"
    config["llm_config"]["add_cross_attention"] = False
    config["vision_config"]["use_flash_attn"] = True
    config["system_message"] = None
    (path / "config.json").write_text(configs.dump_json(config))
    (path / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 500}, indent=2))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 8192}\n')
    (path / "generation_config.json").write_text('{"eos_token_id": [2, 92542]}\n')
    (path / "modeling_internvl_chat.py").write_text("# remote code\n")
    (path / "examples").mkdir()
    (path / "examples" / "image1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


@pytest.mark.parametrize("kind", ["qwen2", "internlm2"])
def test_official_hf_official_is_byte_exact(kind, tmp_path, random_model):
    model = random_model(kind)
    _official_like(tmp_path / "official", model)
    io.convert_checkpoint(tmp_path / "official", tmp_path / "hf", "hf")
    assert detect_layout(tmp_path / "hf") == "hf"
    hf_loaded = io.load_model(tmp_path / "hf")
    assert _equal_states(hf_loaded, model)
    assert hf_loaded.config.image_token_id == 500 and hf_loaded.config.text.flavour == kind
    assert (tmp_path / "hf" / "examples" / "image1.jpg").is_file()

    io.convert_checkpoint(tmp_path / "hf", tmp_path / "back", "official")
    original, back = _files(tmp_path / "official"), _files(tmp_path / "back")
    assert original == back
    mismatched = [
        f for f in original if not filecmp.cmp(tmp_path / "official" / f, tmp_path / "back" / f, shallow=False)
    ]
    assert mismatched == []


def test_convert_dtype_and_reshard(tmp_path, random_model):
    model = random_model("internlm2")
    _official_like(tmp_path / "official", model)
    io.convert_checkpoint(tmp_path / "official", tmp_path / "hf16", "hf", dtype="bfloat16", max_shard_size="1GB")
    names = _files(tmp_path / "hf16")
    assert "model.safetensors" in names and io.INDEX_FILE not in names  # one 1 GB shard holds it all
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = io.load_model(tmp_path / "hf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ref = model.to(torch.bfloat16)
    assert _equal_states(loaded, ref)
    io.convert_checkpoint(tmp_path / "hf16", tmp_path / "off16", "official")
    config = json.loads((tmp_path / "off16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["auto_map"]["AutoModel"].startswith("modeling_internvl")


def test_convert_in_place_and_same_layout(tmp_path, random_model):
    model = random_model("qwen2")
    path = tmp_path / "ckpt"
    io.save_model(model, path, max_shard_size="30KB")
    io.convert_checkpoint(path, path, "hf")  # read everything, then swap atomically
    assert detect_layout(path) == "hf" and _equal_states(io.load_model(path), model)
    io.convert_checkpoint(path, tmp_path / "copy", "hf", dtype="float16")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["torch_dtype"] == "float16"


def test_mono_cannot_become_hf(tmp_path, random_model):
    io.save_model(random_model("mono"), tmp_path / "mono")
    with pytest.raises(CheckpointError, match="Mono-InternVL"):
        io.convert_checkpoint(tmp_path / "mono", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match="unknown layout 'gguf'"):
        io.convert_checkpoint(tmp_path / "mono", tmp_path / "x", "gguf")


def test_cli_convert(tmp_path, random_model):
    from typer.testing import CliRunner

    from ivl.cli import app

    io.save_model(random_model("qwen2"), tmp_path / "official")
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "official"), str(tmp_path / "hf"), "--layout", "hf", "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote hf checkpoint" in result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "internvl"
    bad = CliRunner().invoke(app, ["convert", str(tmp_path / "official"), str(tmp_path / "x"), "--layout", "onnx"])
    assert bad.exit_code != 0 and isinstance(bad.exception, CheckpointError)


def test_parse_size():
    assert io.parse_size("5GB") == 5 * 10**9
    assert io.parse_size("2GiB") == 2 * 2**30
    assert io.parse_size("500 mb") == 500 * 10**6
    assert io.parse_size(1234) == 1234
    with pytest.raises(CheckpointError, match="'lots'"):
        io.parse_size("lots")


def test_save_copies_tokenizer_files(tmp_path, random_model):
    source = tmp_path / "source"
    _official_like(source, random_model("qwen2"))
    io.save_model(random_model("qwen2", seed=3), tmp_path / "tuned", layout="hf", copy_files_from=source)
    names = _files(tmp_path / "tuned")
    assert {"added_tokens.json", "generation_config.json", "tokenizer_config.json", "examples/image1.jpg"} <= set(names)
    assert (tmp_path / "tuned" / "added_tokens.json").read_bytes() == (source / "added_tokens.json").read_bytes()
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["model_type"] == "internvl"
