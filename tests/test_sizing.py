"""Closed-form parameter counts vs the published totals, and memory arithmetic checked by hand."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ivl.cli import app
from ivl.config import PUBLISHED_TOTALS_B, get_preset
from ivl.sizing import inference_memory, kv_cache_bytes, parameter_counts, training_memory


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS_B))
def test_preset_totals_within_half_percent(name: str) -> None:
    total = parameter_counts(get_preset(name))["total"]
    published = PUBLISHED_TOTALS_B[name] * 1e9
    assert abs(total - published) / published < 0.005


def test_vision_and_connector_counts_match_spec() -> None:
    # spec §1.2 and §2 (verified counts)
    assert parameter_counts(get_preset("1b"))["vision"] == 304_012_288
    assert parameter_counts(get_preset("26b"))["vision"] == 5_536_496_000
    assert parameter_counts(get_preset("1b"))["connector"] == 4_482_816
    assert parameter_counts(get_preset("78b"))["connector"] == 172_008_448


def test_memory_by_hand() -> None:
    cfg = get_preset("tiny")
    total = parameter_counts(cfg)["total"]
    # 2 layers x 2 (k,v) x 2 kv heads x 16 head_dim x 10 tokens x 3 batch x 2 bytes
    assert kv_cache_bytes(cfg.text, 10, 3) == 2 * 2 * 2 * 16 * 10 * 3 * 2
    infer = inference_memory(cfg, context_tokens=10, batch=1)
    assert infer.weights == 2 * total and infer.gradients == 0
    train = training_memory(cfg)
    assert (train.weights, train.gradients, train.optimizer) == (6 * total, 4 * total, 8 * total)
    assert train.total == 18 * total
    sharded = training_memory(cfg, shards=4)
    assert sharded.optimizer == 8 * total // 4


def test_info_cli_prints_tables() -> None:
    result = CliRunner().invoke(app, ["info", "internvl2_5-8b", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    assert "8,075,365,376" in result.output
    assert "optimizer" in result.output


def test_info_cli_unknown_preset() -> None:
    result = CliRunner().invoke(app, ["info", "no-such-model"])
    assert result.exit_code != 0
    assert "unknown preset" in str(result.exception)


def test_info_reads_a_checkpoint_directory(tmp_path) -> None:
    import torch

    from ivl.models.internvl import InternVL, count_parameters

    torch.manual_seed(0)
    model = InternVL(get_preset("tiny"))
    model.save_pretrained(tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    # closed-form count of the loaded config equals the instantiated model's count
    assert f"{count_parameters(model)['total']:,}" in result.output
