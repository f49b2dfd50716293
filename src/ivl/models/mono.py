"""Mono-InternVL: the encoder-free member of the family, as a thin layer over :class:`InternVL`.

All computation lives in the shared modules: the patch stem (conv 14x14 + CLS/position table, CLS dropped),
pixel unshuffle v2 + ``mlp1``, and the decoder whose layers route every token through exactly one FFN (the
text FFN or the visual expert) by the ``<IMG_CONTEXT>`` mask, also in cached steps. This class pins the
Mono invariants (patch stem <-> visual experts), defaults to Mono-InternVL-2B and loads only Mono checkpoints,
checking the vision width against the weights themselves (spec mono-internvl §6, §13.5).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ivl.config import InternVLConfig, MonoConfig
from ivl.errors import CheckpointError, ConfigError
from ivl.models.internvl import InternVL

#: The official key whose last dimension is the patch-stem width C (1024 for Mono-InternVL-2B).
POSITION_KEY = "vision_model.embeddings.position_embedding"


def require_mono(config: InternVLConfig, where: str = "config") -> None:
    """Raise ConfigError unless ``config`` describes a Mono-InternVL (patch stem + visual experts)."""
    if not config.is_mono or not config.text.visual_experts:
        raise ConfigError(
            f"{where} is not a Mono-InternVL config: vision.model_type={config.vision.model_type!r}, "
            f"text.visual_experts={config.text.visual_experts} (need 'intern_vit_patch' and True)"
        )


class MonoInternVL(InternVL):
    """Encoder-free Mono-InternVL; ``MonoInternVL()`` is Mono-InternVL-2B with random weights.

    Forward, chat, engine and trainer use it exactly as an :class:`InternVL`.
    """

    def __init__(self, config: InternVLConfig | None = None) -> None:
        config = MonoConfig() if config is None else config
        require_mono(config)
        super().__init__(config)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean routing mask: True exactly at ``<IMG_CONTEXT>``; ``<img>``/``</img>`` are text tokens."""
        return input_ids == self.config.image_token_id

    @classmethod
    def from_internvl(cls, model: InternVL) -> MonoInternVL:
        """View a loaded :class:`InternVL` holding a Mono config as a MonoInternVL (same object, no copy)."""
        config = model.config
        require_mono(config, "model.config")
        if not isinstance(config, MonoConfig):  # same vision/text objects: the submodules keep sharing them
            model.config = MonoConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(InternVLConfig)})
        model.__class__ = cls  # MonoInternVL adds no state, so re-classing is safe
        return model  # type: ignore[return-value]

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> MonoInternVL:
        """Load an official Mono-InternVL checkpoint strictly (every key used, none missing, shapes checked).

        The vision width C is read from ``position_embedding`` in the safetensors headers: it must agree with
        ``vision_config.hidden_size`` when config.json states one, and is used when it does not. A non-Mono
        checkpoint raises CheckpointError.
        """
        from ivl.checkpoint.io import load_model, read_checkpoint_config
        from ivl.checkpoint.layouts import read_config

        layout, config = read_checkpoint_config(path)
        try:
            require_mono(config, f"{path}/config.json")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
        width = vision_width_from_weights(path)
        raw, _ = read_config(path)
        stated = (raw.get("vision_config") or {}).get("hidden_size")
        if stated is not None:
            if int(stated) != width:
                raise CheckpointError(
                    f"{path}: the weights have a vision width of {width} ({POSITION_KEY}) but config.json says "
                    f"vision_config.hidden_size = {stated}"
                )
            return cls.from_internvl(load_model(path, dtype=dtype, device=device))
        config.vision.hidden_size = width
        return cls.from_internvl(_load_with_config(path, layout, config, raw, dtype=dtype, device=device))


def vision_width_from_weights(path: str | Path) -> int:
    """Patch-stem width C from the safetensors headers (no tensor data read)."""
    from ivl.checkpoint.io import checkpoint_files

    for shard in checkpoint_files(path).shards:
        for info in shard.tensors:
            if info.key == POSITION_KEY:
                if len(info.shape) != 3:
                    raise CheckpointError(f"{path}: {POSITION_KEY} has shape {info.shape}, expected [1, 1+P, C]")
                return int(info.shape[-1])
    raise CheckpointError(f"{path}: no {POSITION_KEY} tensor; not an official-layout Mono-InternVL checkpoint")


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Assign ``state`` to ``module`` (meta or real) after checking names and shapes; one error lists all problems."""
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(t.shape)}"
        for k, t in state.items()
        if k in expected and tuple(t.shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label} ({len(items)}): {shown}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)


def _load_with_config(
    path: str | Path,
    layout: str,
    config: InternVLConfig,
    raw: dict,
    *,
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
) -> InternVL:
    """Strict load with a config corrected from the weights (the production loader takes its config from disk)."""
    from safetensors.torch import load_file

    from ivl.checkpoint.configs import config_dtype, parse_dtype
    from ivl.checkpoint.io import checkpoint_files, empty_model
    from ivl.checkpoint.keymap import to_ours_map

    target = parse_dtype(dtype, "dtype") if dtype is not None else config_dtype(raw)
    files = checkpoint_files(path)
    state: dict[str, torch.Tensor] = {}
    for shard in files.shards:
        for key, tensor in load_file(str(files.directory / shard.file)).items():
            cast = target is not None and tensor.is_floating_point()
            state[key] = tensor.to(dtype=target if cast else None, device=device)
    mapped = to_ours_map(layout, config).convert(state, strict=True)  # type: ignore[arg-type]
    model = empty_model(config)
    load_state_strict(model, mapped, str(path))
    return model.eval()
