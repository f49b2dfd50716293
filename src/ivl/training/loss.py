"""Next-token loss with token / sample / square averaging, exact across gradient accumulation and ranks.

The global objective of one optimizer step is ``Σ w·CE / Σ w`` over every supervised token of every
micro-batch on every rank (spec §6.4). Because the weights depend only on the labels, the denominator is
known before any forward pass: sum the weights of the step's micro-batches, all-reduce it once, then
back-propagate ``loss_sum / denominator`` per micro-batch (times the world size when the data-parallel
wrapper averages gradients). That makes 2 ranks × 2 micro-batches give exactly the loss and gradients of
1 rank with the whole batch, which the official per-micro-batch normalisation does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F

from ivl.errors import ConfigError, ModelInputError

IGNORE_INDEX = -100
LossMode = Literal["token", "sample", "square"]
LOSS_MODES = ("token", "sample", "square")


def shift_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with logits: ``targets[t] = labels[t + 1]`` inside a sub-sample, −100 at its end.

    With ``cu_seqlens`` (packed rows) the last position of every sub-sample gets −100, so no token is
    ever trained to predict the first token of the next, unrelated sample.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(torch.long) - 1
        ends = ends[ends >= 0]
        targets[..., ends] = IGNORE_INDEX
    return targets


def segment_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Sub-sample index of every position of a packed row (``[0,0,0,1,1,2,…]``)."""
    bounds = cu_seqlens.to(torch.long)
    if bounds.ndim != 1 or bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != length:
        raise ModelInputError(
            f"cu_seqlens must be 1-D, start at 0 and end at the sequence length {length}, got {bounds.tolist()}"
        )
    lengths = bounds.diff()
    if bool((lengths < 0).any()):
        raise ModelInputError(f"cu_seqlens must be non-decreasing, got {bounds.tolist()}")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=bounds.device), lengths)


def loss_weights(
    targets: torch.Tensor, mode: LossMode = "square", cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token weights (float32, same shape as ``targets``), 0 where the target is ignored.

    ``x`` is the number of supervised targets of the sub-sample (a row of a padded batch, or a
    ``cu_seqlens`` segment of a packed row): token → 1, sample → 1/x, square → 1/√x.
    """
    if mode not in LOSS_MODES:
        raise ConfigError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    active = (targets != IGNORE_INDEX).to(torch.float32)
    if mode == "token":
        return active
    if cu_seqlens is None:
        counts = active.sum(dim=-1, keepdim=True).expand_as(active)
    else:
        seg = segment_ids(cu_seqlens, targets.shape[-1])
        flat = active.reshape(-1, targets.shape[-1])
        per_seg = torch.zeros(flat.shape[0], int(seg.max()) + 1 if seg.numel() else 0, device=targets.device)
        per_seg.index_add_(1, seg, flat)
        counts = per_seg[:, seg].reshape(active.shape)
    scale = counts.clamp_min(1.0)
    scale = scale.reciprocal() if mode == "sample" else scale.rsqrt()
    return active * scale


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w·CE, Σ w)`` in float32 over aligned ``logits [..., V]``, ``targets [...]`` and ``weights [...]``.

    Returning the two sums (not their ratio) is what lets callers normalise exactly across micro-batches
    and ranks.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ModelInputError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and weights {tuple(weights.shape)} "
            "must agree (logits carry one extra vocabulary dimension)"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    w = weights.reshape(-1).to(torch.float32)
    return (ce * w).sum(), w.sum()


def global_weight_sum(weight_sums: torch.Tensor | Iterable[torch.Tensor], group=None) -> torch.Tensor:
    """Σ w over the micro-batches of one optimizer step and, when torch.distributed is up, over all ranks."""
    if isinstance(weight_sums, torch.Tensor):
        total = weight_sums.detach().to(torch.float32).sum()
    else:
        parts = [torch.as_tensor(w, dtype=torch.float32).detach().sum() for w in weight_sums]
        if not parts:
            raise ModelInputError("global_weight_sum needs at least one micro-batch weight sum")
        total = torch.stack(parts).sum()
    total = total.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    return total


def normalised_loss(
    loss_sum: torch.Tensor, denominator: torch.Tensor, grad_average_world_size: int = 1
) -> torch.Tensor:
    """The micro-batch term to back-propagate: ``loss_sum / denominator · world_size``.

    ``grad_average_world_size`` is the number of ranks whose gradients DDP/FSDP *average*; multiplying it
    back turns their mean into the sum the global objective needs. A step with no supervised token
    (denominator 0) gives a zero loss (and zero gradients) instead of NaN.
    """
    if grad_average_world_size < 1:
        raise ConfigError(f"grad_average_world_size must be >= 1, got {grad_average_world_size}")
    return loss_sum * (grad_average_world_size / denominator.clamp_min(torch.finfo(torch.float32).tiny))


def mean_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mode: LossMode = "token",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convenience for one micro-batch on one rank: shift, weight, ``Σ w·CE / Σ w``."""
    targets = shift_targets(labels, cu_seqlens)
    weights = loss_weights(targets, mode, cu_seqlens)
    loss_sum, weight_sum = weighted_cross_entropy(logits, targets, weights)
    return normalised_loss(loss_sum, weight_sum)
