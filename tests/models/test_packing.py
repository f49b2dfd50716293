"""Packed training input (cu_seqlens): identical to running each sub-sequence alone, gradients included."""

from __future__ import annotations

import pytest
import torch

from ivl.errors import ModelInputError
from ivl.models.attention import AttentionPlan, packed_positions
from ivl.models.decoder import CausalLM, Routing


@pytest.fixture
def model(make_text):
    return CausalLM(make_text())


def test_packed_positions_restart():
    cu = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32)
    assert packed_positions(cu, 9, torch.device("cpu")).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]


def test_packed_forward_and_grads_equal_separate(model):
    lengths = [5, 9, 1, 7]
    ids = torch.randint(0, 256, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    weights = torch.randn(1, sum(lengths), 256)

    packed = model(ids, cu_seqlens=cu).logits
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        logits = model(ids[:, a:b]).logits
        (logits * weights[:, a:b]).sum().backward()
        pieces.append(logits)
    assert (packed - torch.cat(pieces, 1)).abs().max() <= 1e-5
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().clamp(min=1.0)  # sums of many terms: compare relative to their size
        assert (packed_grads[name] - p.grad).abs().max() <= 1e-5 * scale, name


def test_packed_equals_block_diagonal_mask_reference(model):
    """The same packing expressed as one masked attention call (the slow reference) agrees."""
    ids = torch.randint(0, 256, (1, 12))
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    with torch.no_grad():
        got = model(ids, cu_seqlens=cu).logits
        seg = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([4, 8]))
        allowed = (seg[:, None] == seg[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
        plan = AttentionPlan(is_causal=False, mask=allowed[None, None])
        positions = packed_positions(cu, 12, ids.device)
        h = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(positions, h.dtype)
        for layer in model.model.layers:
            h = layer(h, cos, sin, plan, None, Routing("text"))
        want = model.lm_head(model.model.norm(h))
    assert (got - want).abs().max() <= 1e-5


def test_packed_input_errors(model):
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ModelInputError, match="batch size 1"):
        model(torch.randint(0, 256, (2, 4)), cu_seqlens=cu)
    with pytest.raises(ModelInputError, match="rise from 0"):
        model(torch.randint(0, 256, (1, 5)), cu_seqlens=cu)
    with pytest.raises(ModelInputError, match="not both"):
        model(torch.randint(0, 256, (1, 4)), cu_seqlens=cu, attention_mask=torch.ones(1, 4))
