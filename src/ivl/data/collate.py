"""Batch collation: packed rows (one sequence, sub-samples isolated by ``cu_seqlens``) and padded batches.

Both produce the same loss inputs — ``targets`` (labels shifted inside each sub-sample) and per-token
``loss_weights`` — so the trainer's loss code is identical for both paths. The padding mask is built from
the true lengths, never from a pad token id (spec §10.12).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ivl.data.packing import Pack, Sample, cu_seqlens_for, num_tiles, position_ids_for
from ivl.errors import ConfigError, DataError
from ivl.training.loss import IGNORE_INDEX, LossMode, loss_weights, shift_targets

Batch = dict[str, Any]


def _tiles(
    samples: Sequence[Sample], dummy_tile_size: int | None
) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """Concatenate the tiles of all samples; add one zero tile with flag 0 if there are none and asked to.

    The dummy tile keeps the vision tower in the autograd graph on text-only batches (needed by
    FSDP/DDP, which expect every trainable parameter to receive a gradient); the model drops its features.
    """
    pixels = [s["pixel_values"] for s in samples if num_tiles(s)]
    flags = [s["image_flags"] for s in samples if num_tiles(s)]
    patches: list[int] = []
    for s in samples:
        patches.extend(int(n) for n in s.get("num_patches_list", []))
    if pixels:
        return torch.cat(pixels), torch.cat(flags).to(torch.long), patches
    if dummy_tile_size is not None:
        like = next((s["pixel_values"] for s in samples if s.get("pixel_values") is not None), None)
        dtype = like.dtype if like is not None else torch.float32
        dummy = torch.zeros(1, 3, dummy_tile_size, dummy_tile_size, dtype=dtype)
        return dummy, torch.zeros(1, dtype=torch.long), patches
    return None, torch.zeros(0, dtype=torch.long), patches


def _check(sample: Sample) -> None:
    ids, labels = sample["input_ids"], sample["labels"]
    if ids.ndim != 1 or ids.shape != labels.shape:
        raise DataError(
            f"sample {sample.get('key')!r}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} "
            "must be equal-length 1-D tensors"
        )
    tiles = num_tiles(sample)
    flags = sample.get("image_flags")
    if tiles and (flags is None or flags.shape[0] != tiles):
        raise DataError(f"sample {sample.get('key')!r}: image_flags must have one entry per tile ({tiles})")


def packed_collate(
    packs: Pack | Sequence[Pack],
    loss_mode: LossMode = "square",
    pad_to: int | None = None,
    pad_token_id: int = 0,
    dummy_tile_size: int | None = None,
) -> Batch:
    """One packed row (batch size 1) from one or more packs.

    Returns ``input_ids``/``position_ids``/``labels``/``targets``/``loss_weights`` of shape [1, T],
    ``cu_seqlens`` int32 [S+1], ``pixel_values`` [N,3,S,S] (or None), ``image_flags`` [N],
    ``num_patches_list``, ``keys``. ``pad_to`` appends one extra padding segment (ignored by the loss, own
    attention segment) so shapes can stay static.
    """
    if isinstance(packs, Pack):
        packs = [packs]
    samples = [s for p in packs for s in p.samples]
    if not samples:
        raise DataError("packed_collate got no samples")
    for s in samples:
        _check(s)
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    ids = [s["input_ids"].to(torch.long) for s in samples]
    labels = [s["labels"].to(torch.long) for s in samples]
    total = sum(lengths)
    if pad_to is not None:
        if pad_to < total:
            raise ConfigError(f"pad_to={pad_to} is shorter than the packed row ({total} tokens)")
        if pad_to > total:
            pad = pad_to - total
            ids.append(torch.full((pad,), pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            lengths.append(pad)
    cu = cu_seqlens_for(lengths)
    input_ids = torch.cat(ids)[None]
    label_row = torch.cat(labels)[None]
    targets = shift_targets(label_row, cu)
    pixel_values, image_flags, patches = _tiles(samples, dummy_tile_size)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids_for(lengths)[None],
        "cu_seqlens": cu,
        "labels": label_row,
        "targets": targets,
        "loss_weights": loss_weights(targets, loss_mode, cu),
        "pixel_values": pixel_values,
        "image_flags": image_flags,
        "num_patches_list": patches,
        "num_real_tokens": total,
        "keys": [s.get("key") for s in samples],
    }


def padded_collate(
    samples: Sequence[Sample],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    loss_mode: LossMode = "token",
    pad_to_multiple_of: int | None = None,
    dummy_tile_size: int | None = None,
) -> Batch:
    """A [B, L] batch padded on the right (training) or left (generation) with an explicit attention mask.

    Padding positions get label −100, attention_mask 0 and position id 0; real tokens get positions
    0..len−1 whatever the padding side, so a row's logits do not depend on its padding.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not samples:
        raise DataError("padded_collate got no samples")
    for s in samples:
        _check(s)
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = s["input_ids"]
        labels[row, cols] = s["labels"]
        attention_mask[row, cols] = 1
        position_ids[row, cols] = torch.arange(n)
    targets = shift_targets(labels)
    # with left padding the last pad position would otherwise predict the row's first label
    targets[attention_mask == 0] = IGNORE_INDEX
    pixel_values, image_flags, patches = _tiles(samples, dummy_tile_size)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "targets": targets,
        "loss_weights": loss_weights(targets, loss_mode),
        "pixel_values": pixel_values,
        "image_flags": image_flags,
        "num_patches_list": patches,
        "num_real_tokens": sum(lengths),
        "keys": [s.get("key") for s in samples],
    }
