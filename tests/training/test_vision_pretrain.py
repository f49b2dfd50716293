"""Supervised ViT pre-training: labels, the loss against a hand computation, and learning a separable task."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ivl.config import VisionConfig
from ivl.errors import DataError
from ivl.models.internvit import InternViT
from ivl.training.vision_pretrain import IGNORE, LabelledTiles, attribute_loss, pretrain_vision

CLASSES = {"colour": ["red", "blue"], "count": ["1", "2", "3"]}


def test_labels_mark_missing_attributes_and_refuse_unknown_values():
    tiles = LabelledTiles.build(torch.zeros(3, 3, 4, 4), [{"colour": "blue"}, {"count": "3"}, {}], CLASSES)
    assert tiles.labels["colour"].tolist() == [1, IGNORE, IGNORE]
    assert tiles.labels["count"].tolist() == [IGNORE, 2, IGNORE]
    with pytest.raises(DataError, match="tile 0: colour 'green'"):
        LabelledTiles.build(torch.zeros(1, 3, 4, 4), [{"colour": "green"}], CLASSES)
    with pytest.raises(DataError, match=r"\['shape'\]"):
        LabelledTiles.build(torch.zeros(1, 3, 4, 4), [{"shape": "circle"}], CLASSES)
    with pytest.raises(DataError, match="2 label sets"):
        LabelledTiles.build(torch.zeros(3, 3, 4, 4), [{}, {}], CLASSES)


def test_patch_attributes_give_one_label_per_patch():
    classes = {**CLASSES, "patch_colour": ["background", "red"]}
    attrs = [{"patch_colour": ["red", None, "background", "red"]}, {"colour": "red"}]
    tiles = LabelledTiles.build(torch.zeros(2, 3, 4, 4), attrs, classes, num_patches=4)
    assert tiles.labels["patch_colour"].tolist() == [[1, IGNORE, 0, 1], [IGNORE] * 4]
    assert tiles.labels["colour"].tolist() == [IGNORE, 0]
    with pytest.raises(DataError, match="needs 4 values"):
        LabelledTiles.build(torch.zeros(1, 3, 4, 4), [{"patch_colour": ["red"]}], classes, num_patches=4)


def test_patch_loss_is_the_mean_over_labelled_patches():
    torch.manual_seed(0)
    logits = {"patch_colour": torch.randn(2, 3, 2)}
    labels = {"patch_colour": torch.tensor([[0, IGNORE, 1], [IGNORE, IGNORE, 1]])}
    log_p = F.log_softmax(logits["patch_colour"], -1)
    by_hand = -(log_p[0, 0, 0] + log_p[0, 2, 1] + log_p[1, 2, 1]) / 3
    torch.testing.assert_close(attribute_loss(logits, labels), by_hand)


def test_loss_is_the_sum_over_attributes_of_the_mean_over_labelled_tiles():
    torch.manual_seed(0)
    logits = {"colour": torch.randn(4, 2), "count": torch.randn(4, 3)}
    labels = {"colour": torch.tensor([0, IGNORE, 1, IGNORE]), "count": torch.tensor([IGNORE] * 4)}
    by_hand = (
        -(F.log_softmax(logits["colour"][0], -1)[0] + F.log_softmax(logits["colour"][2], -1)[1]) / 2
    )  # count: no tile carries it, so it adds nothing (not NaN)
    torch.testing.assert_close(attribute_loss(logits, labels), by_hand)


def _solid_tiles(colours: list[str], size: int = 28) -> torch.Tensor:
    rgb = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
    noise = 0.3 * torch.randn(len(colours), 3, size, size)
    return torch.stack([torch.tensor(rgb[c]).view(3, 1, 1).expand(3, size, size) for c in colours]) + noise


def test_pretraining_learns_a_separable_attribute_and_moves_only_trainable_weights(tmp_path):
    torch.manual_seed(0)
    config = VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7
    )
    vit = InternViT(config)
    frozen = vit.embeddings.patch_embedding.weight
    frozen.requires_grad_(False)
    frozen_before = frozen.detach().clone()
    colours = ["red", "blue"] * 16
    train = LabelledTiles.build(_solid_tiles(colours), [{"colour": c} for c in colours], CLASSES)
    held_out = LabelledTiles.build(
        _solid_tiles(["blue", "red"] * 4), [{"colour": c} for c in ["blue", "red"] * 4], CLASSES
    )

    result = pretrain_vision(
        vit, train, steps=30, batch_size=8, lr=3e-3, held_out=held_out, out_dir=tmp_path, log_steps=10, progress=False
    )

    assert result.steps == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert result.accuracy == {"colour": 1.0}  # count: no tile carries it, so no accuracy either
    assert torch.equal(frozen, frozen_before)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert (tmp_path / "loss_curve.png").is_file()
