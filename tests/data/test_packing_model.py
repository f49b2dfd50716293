"""A packed batch gives the loss and gradients of the same samples run one by one (fp32, ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch

from ivl.config import get_preset
from ivl.data.collate import packed_collate, padded_collate
from ivl.data.packing import GreedyPacker, PackingConfig
from ivl.models.internvl import InternVL
from ivl.models.mono import MonoInternVL
from ivl.training.loss import loss_weights, shift_targets, weighted_cross_entropy


def make_samples(config, seed=0):
    """Mixed samples: 0, 1, 2 and 3 tiles, different lengths and supervised spans."""
    g = torch.Generator().manual_seed(seed)
    per_tile = config.num_image_token
    size = config.image_size
    out = []
    for i, (tiles, text_len, answer) in enumerate([(2, 20, 7), (0, 31, 12), (1, 9, 3), (3, 14, 9), (0, 6, 2)]):
        text = torch.randint(0, 400, (text_len,), generator=g)
        ids = torch.cat([text[:3], torch.full((tiles * per_tile,), config.image_token_id), text[3:]])
        labels = ids.clone()
        labels[: ids.numel() - answer] = -100
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": torch.randn(tiles, 3, size, size, generator=g),
                "image_flags": torch.ones(tiles, dtype=torch.long),
                "num_patches_list": [tiles] if tiles else [],
                "key": i,
            }
        )
    return out


@pytest.fixture(scope="module", params=["tiny", "mono-tiny"])
def model(request):
    torch.manual_seed(0)
    config = get_preset(request.param)
    cls = MonoInternVL if config.is_mono else InternVL
    return cls(config).float()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def separate(model, samples, mode):
    model.zero_grad()
    parts = []
    for s in samples:
        ids, labels = s["input_ids"][None], s["labels"][None]
        pixels = s["pixel_values"] if s["pixel_values"].shape[0] else None
        logits = model(ids, pixels, image_flags=s["image_flags"] if pixels is not None else None).logits
        targets = shift_targets(labels)
        parts.append(weighted_cross_entropy(logits, targets, loss_weights(targets, mode)))
    denom = sum(w for _, w in parts)
    loss = sum(l for l, _ in parts) / denom
    loss.backward()
    return loss.detach(), grads(model)


def run_batch(model, batch, packed):
    model.zero_grad()
    extra = {"cu_seqlens": batch["cu_seqlens"]} if packed else {"attention_mask": batch["attention_mask"]}
    logits = model(
        batch["input_ids"],
        batch["pixel_values"],
        image_flags=batch["image_flags"],
        position_ids=batch["position_ids"],
        **extra,
    ).logits
    loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["loss_weights"])
    loss = loss_sum / weight_sum
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert (loss_a - loss_b).abs().item() <= 1e-5
    assert grads_a.keys() == grads_b.keys()
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("mode", ["square", "token"])
def test_packed_equals_separate(model, mode):
    config = model.config
    samples = make_samples(config)
    packer = GreedyPacker(
        PackingConfig(max_packed_tokens=200, max_packed_tiles=8), image_token_id=config.image_token_id
    )
    packs = [p for s in samples for p in packer.add(s)] + packer.flush()
    assert len(packs) == 1 and len(packs[0].samples) == 5
    batch = packed_collate(packs, loss_mode=mode)
    reference = separate(model, samples, mode)
    assert_same(run_batch(model, batch, packed=True), reference)
    # vision tower, projector and decoder all received gradients
    assert any(k.startswith("vision_model") for k in reference[1]) and any(k.startswith("mlp1") for k in reference[1])


def test_packed_with_padding_segment_and_text_only_dummy_tile(model):
    config = model.config
    samples = [s for s in make_samples(config, seed=1) if s["pixel_values"].shape[0] == 0]
    packer = GreedyPacker(PackingConfig(max_packed_tokens=100, max_packed_tiles=8))
    packs = [p for s in samples for p in packer.add(s)] + packer.flush()
    batch = packed_collate(packs, loss_mode="square", pad_to=64, dummy_tile_size=config.image_size)
    assert batch["image_flags"].tolist() == [0] and batch["cu_seqlens"].numel() == len(samples) + 2
    loss, g = run_batch(model, batch, packed=True)
    ref_loss, ref_g = separate(model, samples, "square")
    assert abs(loss - ref_loss).item() <= 1e-5
    # the dummy tile must not leak into the loss: any vision gradient it produces is exactly zero
    assert all(g[k].abs().max() == 0 for k in g if k.startswith("vision_model"))
    assert max((g[k] - ref_g[k]).abs().max().item() for k in ref_g) <= 1e-5


def test_padded_batch_equals_separate(model):
    samples = make_samples(model.config, seed=2)
    batch = padded_collate(samples, pad_token_id=0, padding_side="right", loss_mode="square")
    assert_same(run_batch(model, batch, packed=False), separate(model, samples, "square"))
