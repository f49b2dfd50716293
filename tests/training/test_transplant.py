"""`ivl transplant`: the donor's ViT (and mlp1) lands in the receiver; everything else is the receiver's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ivl.checkpoint.io import load_model, save_model
from ivl.config import get_preset
from ivl.errors import CheckpointError
from ivl.models.internvl import InternVL
from ivl.training.transplant import transplant


def make(seed: int, hidden: int = 64, layers: int = 2, drop_path: float = 0.0):
    config = get_preset("tiny")
    config.text.hidden_size = hidden
    config.text.num_hidden_layers = layers
    config.vision.drop_path_rate = drop_path
    torch.manual_seed(seed)
    return InternVL(config.validate())


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values(), strict=True)) and list(a) == list(b)


def part(model, prefix):
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_vision_moves_into_a_larger_llm(tmp_path):
    small, large = make(1, drop_path=0.1), make(2, hidden=96, layers=3)
    save_model(small, tmp_path / "small")
    save_model(large, tmp_path / "large", max_shard_size=60_000)  # several shards + index
    assert (tmp_path / "large" / "model.safetensors.index.json").is_file()
    report = transplant(tmp_path / "small", tmp_path / "large", tmp_path / "out")
    out = load_model(tmp_path / "out", dtype=torch.float32)
    assert same(part(out, "vision_model."), part(small, "vision_model."))
    assert same(part(out, "mlp1."), part(large, "mlp1."))
    assert same(part(out, "language_model."), part(large, "language_model."))
    assert report.replaced == len(part(small, "vision_model."))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]["drop_path_rate"] == 0.1


def test_with_mlp_needs_equal_llm_widths(tmp_path):
    donor, receiver = make(1), make(2, layers=3)
    save_model(donor, tmp_path / "a")
    save_model(receiver, tmp_path / "b")
    transplant(tmp_path / "a", tmp_path / "b", tmp_path / "out", with_mlp=True)
    out = load_model(tmp_path / "out", dtype=torch.float32)
    assert same(part(out, "mlp1."), part(donor, "mlp1."))
    save_model(make(3, hidden=96), tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"mlp1\.1\.(weight|bias): donor shape .* different LLM width"):
        transplant(tmp_path / "a", tmp_path / "wide", tmp_path / "out2", with_mlp=True)
    assert not (tmp_path / "out2").exists()


def test_different_vision_encoders_are_refused(tmp_path):
    config = get_preset("tiny")
    config.vision.hidden_size = 64
    save_model(InternVL(config.validate()), tmp_path / "other")
    save_model(make(1), tmp_path / "b")
    with pytest.raises(CheckpointError, match="hidden_size: 64 vs 32"):
        transplant(tmp_path / "other", tmp_path / "b", tmp_path / "out")


def test_cli(tmp_path):
    from ivl.cli import app

    save_model(make(1), tmp_path / "a")
    save_model(make(2, layers=3), tmp_path / "b")
    args = [
        "transplant",
        "--vision-from",
        str(tmp_path / "a"),
        "--into",
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "c"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tensors from" in result.output and (tmp_path / "c" / "config.json").is_file()
