"""The trainer's loss reads logits only where a target is supervised: same loss and gradients as full logits."""

from __future__ import annotations

import torch

from ivl.config import get_preset
from ivl.models.internvl import InternVL
from ivl.training.loss import loss_weights, shift_targets, weighted_cross_entropy
from ivl.training.trainer import micro_batch_loss


def _packed_batch(config, mode: str) -> dict:
    """Two packed samples, the first with one image; only their answers are supervised."""
    torch.manual_seed(1)
    n = config.num_image_token
    image = [config.image_token_id] * n
    first = [5, 6, *image, 7, 8, 9]
    second = [10, 11, 12, 13, 14, 15, 16]
    ids = torch.tensor([first + second])
    labels = ids.clone()
    labels[0, : len(first) - 2] = -100  # supervised: the first sample's answer (8, 9) ...
    labels[0, len(first) : len(first) + 4] = -100  # ... and the second's last three tokens
    cu = torch.tensor([0, len(first), len(first) + len(second)], dtype=torch.int32)
    targets = shift_targets(labels, cu)
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    return {
        "input_ids": ids, "labels": labels, "targets": targets, "loss_weights": loss_weights(targets, mode, cu),
        "position_ids": positions, "cu_seqlens": cu, "pixel_values": torch.randn(1, 3, 56, 56),
        "image_flags": torch.ones(1, dtype=torch.long), "num_real_tokens": ids.shape[1],
    }  # fmt: skip


def _full_logits_loss(model, batch) -> torch.Tensor:
    out = model(batch["input_ids"], batch["pixel_values"], image_flags=batch["image_flags"],
                position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    return weighted_cross_entropy(out.logits, batch["targets"], batch["loss_weights"])[0]


def test_supervised_logits_give_the_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    model = InternVL(get_preset("tiny"))
    for mode in ("token", "square"):
        batch = _packed_batch(model.config, mode)
        assert 0 < int((batch["targets"] != -100).sum()) < batch["input_ids"].shape[1]
        model.zero_grad()
        reference = _full_logits_loss(model, batch)
        reference.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        loss, tokens, tiles = micro_batch_loss(model, batch, torch.device("cpu"))
        loss.backward()
        assert (tokens, tiles) == (batch["input_ids"].shape[1], 1)
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5)  # float rounding only


def test_a_micro_batch_without_supervised_tokens_gives_zero_loss_and_gradients():
    torch.manual_seed(0)
    model = InternVL(get_preset("tiny"))
    batch = _packed_batch(model.config, "token")
    batch["targets"] = torch.full_like(batch["targets"], -100)
    batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
    loss, _, _ = micro_batch_loss(model, batch, torch.device("cpu"))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())
