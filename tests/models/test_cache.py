"""KV cache: cached greedy decoding equals full recomputation; left-padded batches equal single rows."""

from __future__ import annotations

import pytest
import torch

from ivl.errors import ModelInputError
from ivl.models.cache import KVCache
from ivl.models.decoder import CausalLM


@pytest.fixture
def model(make_text):
    # Plain RoPE: with dynamic NTK beyond the trained length, cached keys keep their old rotation
    # (as in the reference implementations), so cached and recomputed logits legitimately differ there.
    return CausalLM(make_text()).eval()


def _greedy_cached(model: CausalLM, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None):
    """Prefill, then one token at a time; returns generated ids and the per-step last logits."""
    cache = KVCache.allocate(model.config, ids.shape[0], ids.shape[1] + steps, dtype=torch.float32, device="cpu")
    logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
    tokens, history = [], []
    for _ in range(steps):
        history.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits = model(nxt, attention_mask=mask, cache=cache).logits[:, -1]
    assert cache.length == ids.shape[1] + steps
    return torch.cat(tokens, 1), history


@torch.no_grad()
def test_cached_greedy_equals_full_recompute(model):
    ids = torch.randint(0, 256, (1, 9))
    generated, history = _greedy_cached(model, ids, steps=20)
    seq = ids
    for step in range(20):
        full = model(seq).logits[:, -1]
        assert (full - history[step]).abs().max() <= 1e-5, step
        seq = torch.cat([seq, full.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, 9:], generated)


@torch.no_grad()
def test_left_padded_batch_equals_individual_rows(model):
    lengths = [7, 3, 5]
    rows = [torch.randint(0, 256, (1, n)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row
        mask[i, width - row.shape[1] :] = 1
    batch_tokens, batch_logits = _greedy_cached(model, ids, steps=6, mask=mask)
    for i, row in enumerate(rows):
        tokens, logits = _greedy_cached(model, row, steps=6)
        assert torch.equal(batch_tokens[i], tokens[0])
        for step in range(6):
            assert (batch_logits[step][i] - logits[step][0]).abs().max() <= 1e-5


@torch.no_grad()
def test_chunked_prefill_equals_single_prefill(model):
    ids = torch.randint(0, 256, (2, 12))
    full = model(ids).logits
    cache = KVCache.allocate(model.config, 2, 12, dtype=torch.float32, device="cpu")
    first = model(ids[:, :5], cache=cache).logits
    second = model(ids[:, 5:], cache=cache).logits  # T > 1 at a cache offset: causal mask must shift
    assert (torch.cat([first, second], 1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_keep_rows_drops_finished_sequences(model):
    ids = torch.randint(0, 256, (3, 6))
    cache = KVCache.allocate(model.config, 3, 10, dtype=torch.float32, device="cpu")
    model(ids, cache=cache)
    cache.keep_rows(torch.tensor([0, 2]))
    assert cache.batch_size == 2 and cache.length == 6
    nxt = torch.randint(0, 256, (2, 1))
    got = model(nxt, cache=cache).logits[:, -1]
    want = model(torch.cat([ids[[0, 2]], nxt], 1)).logits[:, -1]
    assert (got - want).abs().max() <= 1e-5


def test_overflow_and_row_mismatch_are_reported(model):
    cache = KVCache.allocate(model.config, 1, 4, dtype=torch.float32, device="cpu")
    with torch.no_grad(), pytest.raises(ModelInputError, match="max_length 4"):
        model(torch.randint(0, 256, (1, 5)), cache=cache)
    assert cache.length == 0
    with torch.no_grad(), pytest.raises(ModelInputError, match="1 rows"):
        model(torch.randint(0, 256, (2, 2)), cache=cache)


def test_attention_mask_shape_is_checked(model):
    with torch.no_grad(), pytest.raises(ModelInputError, match=r"\[2, 5\]"):
        model(torch.randint(0, 256, (2, 5)), attention_mask=torch.ones(2, 4))
