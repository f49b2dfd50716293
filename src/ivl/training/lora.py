"""LoRA adapters on the LLM (and optionally the ViT) through peft, and merging them into plain weights.

Adapters are injected in place, so the model stays an :class:`~ivl.models.internvl.InternVL` whose targeted
``nn.Linear`` layers became peft ``LoraLayer`` wrappers. ``save_adapter`` writes peft's own layout
(``adapter_config.json`` + ``adapter_model.safetensors``); ``merge_lora`` folds ``B·A·α/r`` into the base
weights and puts plain ``nn.Linear`` layers back, so the merged model saves in the official layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivl.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BASE = "ivl_adapter_base.json"

#: Module-name prefixes of the layers LoRA may wrap.
_LLM_PREFIX = r"language_model\.model\.layers\.\d+\."
_VIT_PREFIX = r"vision_model\.encoder\.layers\.\d+\."
#: Official targets: every LLM projection; ViT attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (spec §6.1).
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def target_pattern(llm_targets: Sequence[str] = (), vision_targets: Sequence[str] = ()) -> str:
    """A full-match regex over module names: ``…layers.N.<target>`` for each LLM / ViT target suffix."""
    parts = []
    if llm_targets:
        parts.append(_LLM_PREFIX + r"(?:.*\.)?(?:" + "|".join(re.escape(t) for t in llm_targets) + r")")
    if vision_targets:
        parts.append(_VIT_PREFIX + r"(?:" + "|".join(re.escape(t) for t in vision_targets) + r")")
    if not parts:
        raise ConfigError("LoRA needs at least one target (lora.llm and/or lora.vision)")
    return "^(?:" + "|".join(parts) + ")$"


def lora_config(
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.05,
    llm_targets: Sequence[str] = LLM_TARGETS,
    vision_targets: Sequence[str] = (),
) -> Any:
    """A peft ``LoraConfig`` with the official defaults (α = 2·r, dropout 0.05)."""
    from peft import LoraConfig

    if r < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_pattern(llm_targets, vision_targets),
        bias="none",
    )


def add_lora(model: nn.Module, config: Any) -> nn.Module:
    """Inject LoRA layers into ``model`` in place (base weights untouched; B starts at 0, so outputs are equal)."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"no module of the model matches the LoRA targets {config.target_modules!r}: {exc}") from exc
    if not has_lora(model):
        raise ConfigError(f"no module of the model matches the LoRA targets {config.target_modules!r}")
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, under peft's key names (adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, config: Any, directory: str | Path, base: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (and the base checkpoint it belongs to)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(adapter_state_dict(model), str(out / ADAPTER_WEIGHTS))
    if base is not None:
        (out / ADAPTER_BASE).write_text(json.dumps({"base": str(base)}) + "\n", encoding="utf-8")
    return out


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` and load its weights (strict)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = LoraConfig.from_pretrained(str(path))
    add_lora(model, config)
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{path}: adapter tensors match no LoRA layer of the model: {unexpected[:5]}")
    expected = set(adapter_state_dict(model))
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(f"{path}: adapter lacks tensors for LoRA layers: {missing[:5]}")
    return model


def adapter_base(directory: str | Path) -> str | None:
    """The base checkpoint an adapter was trained on, if recorded."""
    path = Path(directory) / ADAPTER_BASE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("base")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base ``nn.Linear`` and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    names = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not names:
        raise ConfigError("the model has no LoRA layers to merge")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        layer.merge(safe_merge=True)
        setattr(parent, child, layer.get_base_layer())
    return model
