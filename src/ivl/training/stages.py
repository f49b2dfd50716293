"""Freeze plans: which parts of the model train in each stage (spec internvl-2.5 §6.1, mono-internvl §8).

The plan lives in the recipe, never in model code. Applying a plan sets ``requires_grad`` and puts wholly
frozen towers in eval mode (the official code does the same for a frozen LLM / ViT), sets the ViT drop-path
rates of the stage, and reports trainable parameters per component so the trainer can print them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ivl.errors import ConfigError


@dataclass
class FreezePlan:
    """What trains. ``*_patterns`` re-enable parameter-name substrings inside a frozen tower.

    ``unfreeze_vit_layers = k`` trains ViT ``layers[k:]`` only (official ``unfreeze_vit_layers``; negative k
    counts from the end). ``llm_patterns`` serves Mono-InternVL's EViP, where the LLM is frozen except the
    visual experts (``mlp_visual``) and, in S1.3, attention (``self_attn.``).
    """

    vision: bool = True
    mlp: bool = True
    llm: bool = True
    unfreeze_vit_layers: int | None = None
    vision_patterns: tuple[str, ...] = ()
    llm_patterns: tuple[str, ...] = ()
    vision_drop_path: float | None = None  # None: keep the model's own rates

    def validate(self) -> FreezePlan:
        if self.vision_drop_path is not None and not 0.0 <= self.vision_drop_path < 1.0:
            raise ConfigError(f"stage.vision_drop_path must be in [0, 1), got {self.vision_drop_path}")
        if self.unfreeze_vit_layers is not None and self.vision:
            raise ConfigError("stage.unfreeze_vit_layers only makes sense with stage.vision: false (ViT frozen)")
        self.vision_patterns = tuple(self.vision_patterns)
        self.llm_patterns = tuple(self.llm_patterns)
        return self


#: Named plans. InternVL-2.5: stage1 (MLP warm-up), stage1_5 (ViT incremental), stage2 (full SFT).
#: Mono-InternVL EViP: S1.1/S1.2 patch embedding + mlp1 + visual experts, S1.3 adds attention; SFT all.
STAGE_PLANS: dict[str, FreezePlan] = {
    "stage1": FreezePlan(vision=False, mlp=True, llm=False, vision_drop_path=0.0),
    "stage1_5": FreezePlan(vision=True, mlp=True, llm=False),
    "stage2": FreezePlan(vision=True, mlp=True, llm=True),
    "lm_warmup": FreezePlan(vision=False, mlp=False, llm=True, vision_drop_path=0.0),
    "mono_s1_1": FreezePlan(vision=True, mlp=True, llm=False, llm_patterns=("mlp_visual",)),
    "mono_s1_2": FreezePlan(vision=True, mlp=True, llm=False, llm_patterns=("mlp_visual",)),
    "mono_s1_3": FreezePlan(vision=True, mlp=True, llm=False, llm_patterns=("mlp_visual", "self_attn.")),
    "mono_sft": FreezePlan(vision=True, mlp=True, llm=True),
}


def plan_for(stage: str, **overrides: object) -> FreezePlan:
    """The named plan with recipe overrides applied (unknown stage or field names raise ConfigError)."""
    if stage not in STAGE_PLANS:
        raise ConfigError(f"unknown stage {stage!r}; known stages: {', '.join(STAGE_PLANS)}")
    base = STAGE_PLANS[stage]
    names = {f.name for f in fields(FreezePlan)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown freeze-plan field(s) {unknown} for stage {stage!r}; known: {sorted(names)}")
    values = {f.name: getattr(base, f.name) for f in fields(FreezePlan)}
    values.update(overrides)
    return FreezePlan(**values).validate()  # type: ignore[arg-type]


def _vision_layers(model: nn.Module) -> Sequence[nn.Module]:
    encoder = getattr(model.vision_model, "encoder", None)
    return list(encoder.layers) if encoder is not None else []


def apply_freeze_plan(model: nn.Module, plan: FreezePlan, extra_trainable: Iterable[str] = ()) -> None:
    """Set ``requires_grad`` of every parameter per ``plan`` (and drop-path rates); see ``set_train_mode``.

    ``extra_trainable`` are name substrings that always train (e.g. ``lora_`` adapters).
    """
    plan.validate()
    extra = tuple(extra_trainable)
    layers = _vision_layers(model)
    vit_from = None
    if plan.unfreeze_vit_layers is not None:
        vit_from = plan.unfreeze_vit_layers % len(layers) if layers else 0
    for name, param in model.named_parameters():
        param.requires_grad_(_trainable(name, plan, vit_from) or any(p in name for p in extra))
    if plan.vision_drop_path is not None:
        set_vision_drop_path(model, plan.vision_drop_path)


def _trainable(name: str, plan: FreezePlan, vit_from: int | None) -> bool:
    if name.startswith("vision_model."):
        if plan.vision:
            return True
        if vit_from is not None and ".encoder.layers." in name:
            index = int(name.split(".encoder.layers.")[1].split(".")[0])
            if index >= vit_from:
                return True
        return any(p in name for p in plan.vision_patterns)
    if name.startswith("mlp1."):
        return plan.mlp
    if name.startswith("language_model."):
        return plan.llm or any(p in name for p in plan.llm_patterns)
    return True  # anything else (e.g. wrappers' own parameters) trains unless a plan says otherwise


def set_train_mode(model: nn.Module, plan: FreezePlan) -> None:
    """``model.train()``, then eval mode for towers without any trainable parameter (no drop path there)."""
    model.train()
    for tower in ("vision_model", "language_model"):
        module = getattr(model, tower, None)
        if module is not None and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def set_vision_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic-depth rates linearly increasing from 0 to ``rate`` over the ViT layers (official linspace)."""
    layers = _vision_layers(model)
    count = len(layers)
    for i, layer in enumerate(layers):
        layer.drop_path_rate = rate * i / (count - 1) if count > 1 else 0.0
    config = getattr(getattr(model, "config", None), "vision", None)
    if config is not None:
        config.drop_path_rate = rate


# --------------------------------------------------------------------------------------------------------
# reporting


@dataclass
class ComponentCount:
    name: str
    trainable: int = 0
    total: int = 0
    names: list[str] = field(default_factory=list)


def _component(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "mlp1"
    if ".mlp_visual." in name:
        return "llm.visual_experts"
    if "lora_" in name:
        return "lora"
    if name.startswith("language_model."):
        if "embed_tokens" in name:
            return "llm.embeddings"
        if "lm_head" in name:
            return "llm.lm_head"
        return "llm.layers"
    return "other"


def trainable_parameters(model: nn.Module) -> list[ComponentCount]:
    """Trainable / total parameters per component (vision, mlp1, llm.*, lora), in that order."""
    order = ["vision", "mlp1", "llm.embeddings", "llm.layers", "llm.visual_experts", "llm.lm_head", "lora", "other"]
    counts = {name: ComponentCount(name) for name in order}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        clean = name.replace("base_model.model.", "").replace(".base_layer", "")
        entry = counts[_component(clean)]
        n = param.numel()
        entry.total += n
        if param.requires_grad:
            entry.trainable += n
            entry.names.append(clean)
    return [c for c in counts.values() if c.total]


def format_trainable(counts: list[ComponentCount]) -> str:
    """A small fixed-width table; the trainer prints it at start."""
    lines = [f"{'component':<20}{'trainable':>14}{'total':>14}{'share':>8}"]
    for c in counts:
        share = c.trainable / c.total if c.total else 0.0
        lines.append(f"{c.name:<20}{c.trainable:>14,}{c.total:>14,}{share:>8.1%}")
    trainable = sum(c.trainable for c in counts)
    total = sum(c.total for c in counts)
    lines.append(f"{'total':<20}{trainable:>14,}{total:>14,}{trainable / max(total, 1):>8.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# new special tokens (spec §6.9)


def output_embedding(model: nn.Module) -> nn.Module:
    return model.language_model.lm_head


def _input_embedding(model: nn.Module) -> nn.Embedding:
    return model.language_model.model.embed_tokens


@torch.no_grad()
def init_new_token_rows(model: nn.Module, token_ids: Sequence[int], *, input_rows: bool = False) -> None:
    """Set the output-embedding rows of ``token_ids`` to the mean of all other output rows (spec §6.9).

    Input rows keep their initialisation unless ``input_rows`` (then they get the mean input row too).
    """
    head = output_embedding(model)
    weight = head.weight
    ids = sorted({int(t) for t in token_ids})
    if not ids:
        return
    if ids[0] < 0 or ids[-1] >= weight.shape[0]:
        raise ConfigError(f"new token ids {ids} are outside the vocabulary of {weight.shape[0]} rows")
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[ids] = False
    index = torch.tensor(ids, device=weight.device)
    weight[index] = weight[keep].float().mean(0).to(weight.dtype)
    if input_rows:
        table = _input_embedding(model).weight
        table[index] = table[keep].float().mean(0).to(table.dtype)


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, new_size: int) -> list[int]:
    """Resize input and output embeddings to ``new_size`` rows (may shrink); returns the ids of added rows.

    Added output rows get the mean of the previous output rows (spec §6.9); added input rows get the mean of
    the previous input rows (transformers' default ``mean_resizing``, without its tiny random jitter).
    """
    embed = _input_embedding(model)
    old = embed.weight.shape[0]
    if new_size < 1:
        raise ConfigError(f"new vocabulary size must be positive, got {new_size}")
    if new_size == old:
        return []
    keep = min(old, new_size)
    new_embed = nn.Embedding(new_size, embed.weight.shape[1], device=embed.weight.device, dtype=embed.weight.dtype)
    new_embed.weight[:keep] = embed.weight[:keep]
    if new_size > old:
        new_embed.weight[old:] = embed.weight.float().mean(0).to(embed.weight.dtype)
    model.language_model.model.embed_tokens = new_embed
    head = output_embedding(model)
    if isinstance(head, nn.Linear):
        new_head = nn.Linear(head.in_features, new_size, bias=False, device=head.weight.device, dtype=head.weight.dtype)
        new_head.weight[:keep] = head.weight[:keep]
        if new_size > old:
            new_head.weight[old:] = head.weight.float().mean(0).to(head.weight.dtype)
        model.language_model.lm_head = new_head
    else:  # tied head: rebuild it around the new table
        from ivl.models.decoder import TiedHead

        model.language_model.lm_head = TiedHead(new_embed)
    model.config.text.vocab_size = new_size
    model.language_model.config.vocab_size = new_size
    return list(range(old, new_size))
