"""Loss weighting and normalisation: hand-computed values, accumulation and 2-rank equivalence."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ivl.errors import ConfigError, ModelInputError
from ivl.training.loss import (
    global_weight_sum,
    loss_weights,
    mean_loss,
    normalised_loss,
    shift_targets,
    weighted_cross_entropy,
)

I = -100


def test_shift_targets_stays_inside_subsamples():
    labels = torch.tensor([[I, 5, 6, 9, 7, 8]])
    assert shift_targets(labels).tolist() == [[5, 6, 9, 7, 8, I]]
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    # position 2 would predict the first label of the next sample: masked
    assert shift_targets(labels, cu).tolist() == [[5, 6, I, 7, 8, I]]


def test_loss_weights_hand_values():
    # sub-sample 0 has 4 supervised targets, sub-sample 1 has 1, sub-sample 2 none
    targets = torch.tensor([[1, 2, I, 3, 4, I, 5, I, I, I]])
    cu = torch.tensor([0, 6, 8, 10], dtype=torch.int32)
    a = [1, 1, 0, 1, 1, 0, 1, 0, 0, 0]
    assert loss_weights(targets, "token", cu).tolist() == [[float(v) for v in a]]
    assert loss_weights(targets, "sample", cu).tolist() == [[0.25, 0.25, 0, 0.25, 0.25, 0, 1, 0, 0, 0]]
    assert loss_weights(targets, "square", cu).tolist() == [[0.5, 0.5, 0, 0.5, 0.5, 0, 1, 0, 0, 0]]
    # rows of a padded batch are the sub-samples when no cu_seqlens is given
    rows = torch.tensor([[1, 2, 3, 4, I], [5, I, I, I, I]])
    sq = loss_weights(rows, "square")
    assert sq[0, :4].tolist() == [0.5] * 4 and sq[1, 0].item() == 1.0 and sq[1, 1:].abs().sum() == 0


def test_weighted_cross_entropy_hand_computed():
    # vocab 2, logits (0, ln 3): p(1) = 3/4, p(0) = 1/4
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)
    targets = torch.tensor([1, 0, I])
    weights = torch.tensor([2.0, 0.5, 0.0])
    loss_sum, weight_sum = weighted_cross_entropy(logits, targets, weights)
    expected = 2.0 * -math.log(0.75) + 0.5 * -math.log(0.25)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert weight_sum.item() == 2.5


def _batch(seed=0, rows=4, length=9, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    # different supervised lengths per row: the modes then disagree
    for r, keep in enumerate([8, 5, 2, 7][:rows]):
        labels[r, : length - keep] = I
    return logits, labels


def test_modes_match_independent_formulas():
    logits, labels = _batch()
    targets = shift_targets(labels)
    per_row_mean, counts = [], []
    for r in range(labels.shape[0]):
        m = targets[r] != I
        per_row_mean.append(F.cross_entropy(logits[r][m], targets[r][m]))
        counts.append(int(m.sum()))
    means, x = torch.stack(per_row_mean), torch.tensor(counts, dtype=torch.float32)
    token = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=I)
    sample = means.mean()
    square = (x.sqrt() * means).sum() / x.sqrt().sum()
    torch.testing.assert_close(mean_loss(logits, labels, "token"), token)
    torch.testing.assert_close(mean_loss(logits, labels, "sample"), sample)
    torch.testing.assert_close(mean_loss(logits, labels, "square"), square)
    assert not torch.isclose(token, square) and not torch.isclose(sample, square)


def test_packed_row_equals_padded_batch():
    logits, labels = _batch()
    lengths = [9, 9, 9, 9]
    cu = torch.tensor([0, 9, 18, 27, 36], dtype=torch.int32)
    for mode in ("token", "sample", "square"):
        packed = mean_loss(logits.reshape(1, 36, 11), labels.reshape(1, 36), mode, cu)
        torch.testing.assert_close(packed, mean_loss(logits, labels, mode), msg=mode)
    assert sum(lengths) == 36


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(ConfigError, match="loss mode"):
        loss_weights(torch.tensor([1, 2]), "median")  # type: ignore[arg-type]
    with pytest.raises(ModelInputError, match="cu_seqlens"):
        loss_weights(torch.tensor([[1, 2, 3]]), "square", torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ModelInputError, match="must agree"):
        weighted_cross_entropy(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long), torch.zeros(4))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _data(vocab=11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (8, 10), generator=g)
    labels = ids.clone()
    for r, keep in enumerate([9, 3, 6, 1, 8, 2, 5, 7]):
        labels[r, : 10 - keep] = I
    return ids, labels


def _step(model, micro_batches, mode, world):
    """One optimizer step's loss/grad with the global-denominator recipe."""
    prepared = []
    for ids, labels in micro_batches:
        targets = shift_targets(labels)
        prepared.append((ids, targets, loss_weights(targets, mode)))
    denom = global_weight_sum([w.sum() for _, _, w in prepared])
    total = torch.zeros(())
    for ids, targets, weights in prepared:
        loss_sum, _ = weighted_cross_entropy(model(ids), targets, weights)
        normalised_loss(loss_sum, denom, world).backward()
        total += loss_sum.detach()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total / denom


def _reference(mode):
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = _data()
    loss = _step(model, [(ids, labels)], mode, 1)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_gradient_accumulation_is_exact(mode):
    ref_loss, ref_grads = _reference(mode)
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = _data()
    loss = _step(model, [(ids[:3], labels[:3]), (ids[3:4], labels[3:4]), (ids[4:], labels[4:])], mode, 1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for g, r in zip([p.grad for p in model.parameters()], ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


def _rank_main(rank, world, init_file, out_dir, mode):
    torch.set_num_threads(1)  # two ranks on a loaded 2-core machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyLM())
        ids, labels = _data()
        mine = slice(rank * 4, rank * 4 + 4)
        ids, labels = ids[mine], labels[mine]
        # two micro-batches of unequal size per rank; DDP averages grads, normalised_loss undoes that
        micro = [(ids[:1], labels[:1]), (ids[1:], labels[1:])]
        denom = global_weight_sum([loss_weights(shift_targets(lb), mode).sum() for _, lb in micro])
        total = torch.zeros(())
        for i, (mb_ids, mb_labels) in enumerate(micro):
            targets = shift_targets(mb_labels)
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else model.no_sync():
                loss_sum, _ = weighted_cross_entropy(model(mb_ids), targets, loss_weights(targets, mode))
                normalised_loss(loss_sum, denom, world).backward()
            total += loss_sum.detach()
        dist.all_reduce(total)
        torch.save({"loss": total / denom, "grads": [p.grad for p in model.parameters()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_full_batch():
    mode = "square"
    ref_loss, ref_grads = _reference(mode)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "init"), tmp, mode), nprocs=2, join=True)
        results = [torch.load(f"{tmp}/rank{r}.pt") for r in range(2)]
    # all-reduce sums in another order than one process does: a few float32 ulps, far below a wrong normaliser
    for res in results:
        torch.testing.assert_close(res["loss"], ref_loss, atol=1e-6, rtol=1e-5)
        for g, r in zip(res["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
