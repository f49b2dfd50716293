"""Progressive scaling (spec §6.2): put the Stage-1.5 InternViT of one model (optionally its ``mlp1``) into another.

Works on checkpoint files, one shard at a time, so a 78B target never has to fit in memory: the donor's
``vision_model.*`` (and ``mlp1.*``) tensors are read once, every shard of the receiving checkpoint is
rewritten with them substituted, and ``config.json`` takes the donor's ``vision_config``. Before writing
anything it checks that every substituted tensor exists in the receiver with the same shape, and names the
first mismatch (e.g. an ``mlp1`` that projects to a different LLM width).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ivl.checkpoint.io import INDEX_FILE, atomic_directory, checkpoint_files, copy_auxiliary_files
from ivl.checkpoint.layouts import layout_of_config, read_config
from ivl.errors import CheckpointError

VISION_PREFIX = "vision_model."
MLP_PREFIX = "mlp1."
_VISION_SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "qkv_bias",
    "qk_normalization",
    "norm_type",
)


@dataclass
class TransplantReport:
    out_dir: Path
    replaced: int  # tensors taken from the donor
    kept: int  # tensors kept from the receiver
    prefixes: tuple[str, ...]


def _official(path: Path) -> dict:
    data, _ = read_config(path)
    layout = layout_of_config(data, str(path / "config.json"))
    if layout != "official":
        raise CheckpointError(
            f"{path}: transplant works on the official layout; convert first with "
            f"`ivl convert {path} DIR --layout official`"
        )
    return data


def _tensors(path: Path, prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    wanted = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    files = checkpoint_files(path)
    for shard in files.shards:
        with safe_open(str(path / shard.file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open objects are not mappings
                if key.startswith(wanted):
                    out[key] = fh.get_tensor(key)
    return out


def _check_vision_configs(donor: dict, receiver: dict, donor_dir: Path, receiver_dir: Path) -> None:
    a, b = donor.get("vision_config") or {}, receiver.get("vision_config") or {}
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in _VISION_SHAPE_FIELDS if a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(f"vision encoders differ ({donor_dir} vs {receiver_dir}): " + "; ".join(diffs))
    ra, rb = donor.get("downsample_ratio", 0.5), receiver.get("downsample_ratio", 0.5)
    if ra != rb:
        raise CheckpointError(f"downsample_ratio differs: {ra} ({donor_dir}) vs {rb} ({receiver_dir})")


def transplant(
    vision_from: str | Path, into: str | Path, out_dir: str | Path, *, with_mlp: bool = False
) -> TransplantReport:
    """Write ``out_dir`` = checkpoint ``into`` with the vision encoder (and ``mlp1`` if ``with_mlp``) of ``vision_from``."""
    donor_dir, receiver_dir = Path(vision_from), Path(into)
    donor_cfg, receiver_cfg = _official(donor_dir), _official(receiver_dir)
    _check_vision_configs(donor_cfg, receiver_cfg, donor_dir, receiver_dir)
    prefixes = (VISION_PREFIX, MLP_PREFIX) if with_mlp else (VISION_PREFIX,)
    donor = _tensors(donor_dir, prefixes)
    if not any(k.startswith(VISION_PREFIX) for k in donor):
        raise CheckpointError(f"{donor_dir}: no {VISION_PREFIX}* tensors to transplant")

    files = checkpoint_files(receiver_dir)
    receiver_shapes: dict[str, tuple[int, ...]] = {}
    for shard in files.shards:
        for info in shard.tensors:
            receiver_shapes[info.key] = tuple(info.shape)
    receiver_keys = {k for k in receiver_shapes if k.startswith(prefixes)}
    missing = sorted(receiver_keys - set(donor))
    extra = sorted(set(donor) - receiver_keys)
    if missing or extra:
        raise CheckpointError(
            f"tensor names differ between {donor_dir} and {receiver_dir}: missing in donor {missing[:5]}, "
            f"not in receiver {extra[:5]}"
        )
    for key, tensor in donor.items():
        if tuple(tensor.shape) != receiver_shapes[key]:
            hint = ""
            if key.startswith(MLP_PREFIX):
                hint = " (the mlp1 projects to a different LLM width: transplant the ViT only and run Stage 1)"
            raise CheckpointError(
                f"{key}: donor shape {tuple(tensor.shape)} does not fit receiver shape {receiver_shapes[key]}{hint}"
            )

    replaced = kept = 0
    with atomic_directory(out_dir) as tmp:
        for shard in files.shards:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(receiver_dir / shard.file), framework="pt") as fh:
                metadata = fh.metadata()
                for key in fh.keys():  # noqa: SIM118
                    original = fh.get_tensor(key)
                    if key in donor:
                        tensors[key] = donor[key].to(original.dtype).contiguous()
                        replaced += 1
                    else:
                        tensors[key] = original
                        kept += 1
            save_file(tensors, str(tmp / shard.file), metadata=metadata or {"format": "pt"})
        if files.index is not None:
            (tmp / INDEX_FILE).write_text(json.dumps(files.index, indent=2) + "\n", encoding="utf-8")
        copy_auxiliary_files(receiver_dir, tmp)
        config = dict(receiver_cfg)
        config["vision_config"] = donor_cfg["vision_config"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return TransplantReport(Path(out_dir), replaced, kept, prefixes)
