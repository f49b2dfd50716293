"""Supervised pre-training of a from-scratch vision encoder on labelled tiles.

InternVL-2.5 starts every stage from a pre-trained InternViT; a model built from scratch (the tiny CPU demo)
has none. Through the LLM's next-token loss the encoder learns shapes and letters slowly: the gradient reaches
it through a 4-token pixel unshuffle and a frozen or barely-trained LLM. Here the same encoder learns directly,
on tiles held in memory, so one image costs one encoder pass and nothing else:

- image attributes (colour, shape, count, a word, …): a linear head on the mean-pooled last-layer features;
- patch attributes (what covers each patch, e.g. the colour of the object there, or background): a linear head
  on every patch's own features, which keeps the features local — the pixel unshuffle hands the LLM one
  token per image region, so *where* a thing is must stay in the patches that show it.

All heads are cross-entropy classifiers, thrown away afterwards as a CLIP projection is; only the encoder moves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ivl.errors import ConfigError, DataError
from ivl.training.metrics import LOSS_CURVE, METRICS_FILE, MetricsLog, ProgressBar, plot_loss_curve
from ivl.training.optim import adamw, cosine_schedule

IGNORE = -100  # a tile without this attribute


@dataclass
class LabelledTiles:
    """Tiles ``[N, 3, S, S]`` and, per attribute, a class index per tile ``[N]`` (an image attribute) or per
    patch ``[N, P]`` (a patch attribute), ``IGNORE`` where there is none."""

    pixel_values: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: dict[str, list[str]]

    @classmethod
    def build(
        cls,
        pixel_values: torch.Tensor,
        attributes: Sequence[Mapping[str, str | Sequence[str | None]]],
        classes: Mapping[str, Sequence[str]],
        num_patches: int | None = None,
    ) -> LabelledTiles:
        """From one ``{attribute: value}`` dict per tile, where a patch attribute's value is a list of
        ``num_patches`` values (None: unlabelled patch); a value outside ``classes`` is an error, not a skip."""
        if pixel_values.ndim != 4 or pixel_values.shape[0] != len(attributes):
            raise DataError(f"{len(attributes)} label sets for tiles of shape {tuple(pixel_values.shape)}")
        labels = {}
        for name, values in classes.items():
            index = {v: i for i, v in enumerate(values)}

            def lookup(i: int, value: str | None, name: str = name, index: dict = index) -> int:
                if value is not None and value not in index:
                    raise DataError(f"tile {i}: {name} {value!r} is not one of {list(index)}")
                return IGNORE if value is None else index[value]

            given = [attrs.get(name) for attrs in attributes]
            if any(isinstance(v, (list, tuple)) for v in given):
                if num_patches is None:
                    raise DataError(f"patch attribute {name!r} needs num_patches")
                rows = []
                for i, value in enumerate(given):
                    if value is not None and (isinstance(value, str) or len(value) != num_patches):
                        raise DataError(f"tile {i}: patch attribute {name!r} needs {num_patches} values")
                    rows.append([lookup(i, v) for v in (value or [None] * num_patches)])
                labels[name] = torch.tensor(rows, dtype=torch.long)
            else:
                labels[name] = torch.tensor([lookup(i, v) for i, v in enumerate(given)], dtype=torch.long)
        unknown = {k for attrs in attributes for k in attrs} - set(classes)
        if unknown:
            raise DataError(f"attributes without a class list: {sorted(unknown)}")
        return cls(pixel_values, labels, {k: list(v) for k, v in classes.items()})

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class VisionPretrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    #: held-out accuracy per attribute (of the heads that are then discarded)
    accuracy: dict[str, float] = field(default_factory=dict)


class AttributeHeads(nn.Module):
    """One linear classifier per attribute: on the mean-pooled features, or on every patch's features."""

    def __init__(self, hidden_size: int, classes: Mapping[str, Sequence[str]], patch: Sequence[str] = ()) -> None:
        super().__init__()
        self.patch = set(patch)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, len(values)) for name, values in classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` ``[B, P, H]`` → ``{name: [B, C]}`` (image) or ``[B, P, C]`` (patch attributes)."""
        pooled = features.mean(dim=1)
        return {name: head(features if name in self.patch else pooled) for name, head in self.heads.items()}


def attribute_loss(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over the tiles (patches) that carry the attribute."""
    total = next(iter(logits.values())).new_zeros(())
    for name, scores in logits.items():
        target = labels[name]
        if bool((target != IGNORE).any()):
            total = total + F.cross_entropy(
                scores.reshape(-1, scores.shape[-1]), target.reshape(-1), ignore_index=IGNORE
            )
    return total


@torch.no_grad()
def head_accuracy(
    vision_model: nn.Module, heads: AttributeHeads, tiles: LabelledTiles, batch_size: int = 256
) -> dict[str, float]:
    """Accuracy of each attribute head over the tiles (patches, for a patch attribute) that carry it."""
    was_training = vision_model.training
    vision_model.eval()
    device = next(vision_model.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in tiles.labels}
    for i in range(0, len(tiles), batch_size):
        for name, value in heads(vision_model(tiles.pixel_values[i : i + batch_size].to(device))).items():
            scores[name].append(value.argmax(-1).cpu())
    vision_model.train(was_training)
    out = {}
    for name, target in tiles.labels.items():
        keep = target != IGNORE
        if bool(keep.any()):
            out[name] = float((torch.cat(scores[name])[keep] == target[keep]).float().mean())
    return out


def pretrain_vision(
    vision_model: nn.Module,
    train: LabelledTiles,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    seed: int = 0,
    held_out: LabelledTiles | None = None,
    out_dir: str | Path | None = None,
    log_steps: int = 25,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> VisionPretrainResult:
    """Train ``vision_model`` (in place) to predict ``train``'s attributes; return losses and held-out accuracy.

    The heads read the encoder's last layer (CLS dropped), the features InternVL's ``select_layer: -1`` hands to
    the pixel unshuffle. Frozen parameters (``requires_grad`` False) stay as they are. ``out_dir`` receives
    ``metrics.jsonl`` and the loss curve, as the trainer writes them.
    """
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"vision pre-training needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    if len(train) == 0:
        raise DataError("vision pre-training got no labelled tiles")
    hidden = getattr(getattr(vision_model, "config", None), "hidden_size", None)
    if hidden is None:
        raise ConfigError(f"{type(vision_model).__name__} has no config.hidden_size to size the attribute heads")
    device = next(vision_model.parameters()).device
    dtype = next(vision_model.parameters()).dtype
    torch.manual_seed(seed)
    patch = [name for name, labels in train.labels.items() if labels.ndim == 2]
    heads = AttributeHeads(hidden, train.classes, patch).to(device=device, dtype=dtype)
    parameters = [p for p in vision_model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = adamw(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, steps, min(warmup_steps, steps))
    metrics = MetricsLog(Path(out_dir) / METRICS_FILE) if out_dir is not None else None
    if metrics is not None and metrics.path.exists():
        metrics.path.unlink()
    order = random.Random(seed)
    result = VisionPretrainResult(steps=0, seconds=0.0)
    bar = ProgressBar(steps, enabled=progress, description="vision pre-training")
    vision_model.train()
    started = last = time.perf_counter()
    last_step = 0
    try:
        for step in range(1, steps + 1):
            index = torch.tensor([order.randrange(len(train)) for _ in range(batch_size)])
            logits = heads(vision_model(train.pixel_values[index].to(device=device, dtype=dtype)))
            loss = attribute_loss(logits, {k: v[index].to(device) for k, v in train.labels.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            result.losses.append(value)
            if step % log_steps == 0 or step == steps:
                now = time.perf_counter()
                tiles_per_s = batch_size * (step - last_step) / max(now - last, 1e-9)
                last, last_step = now, step
                lr_now = optimizer.param_groups[0]["lr"]
                if metrics is not None:
                    metrics.write({"step": step, "loss": value, "lr": lr_now, "tiles_per_s": tiles_per_s})
                bar.update(step, value, lr_now, None, tiles_per_s)
    finally:
        bar.close()
    result.steps = steps
    result.seconds = time.perf_counter() - started
    if held_out is not None:
        result.accuracy = head_accuracy(vision_model, heads, held_out)
    if metrics is not None:
        plot_loss_curve(metrics.path, Path(out_dir) / LOSS_CURVE, title="vision pre-training: loss")
    if log is not None:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in result.accuracy.items())
        log(f"vision pre-training: {steps} steps in {result.seconds:.1f} s" + (f"; held-out {shown}" if shown else ""))
    return result
