"""torchrun / FSDP2 helpers: process-group setup, per-block sharding, reductions, gradient clipping.

One process (plain ``python``) needs no process group: everything here degrades to the local case. Under
``torchrun`` the backend is NCCL on CUDA and gloo on CPU. Sharding follows the usual FSDP2 recipe: every ViT
and decoder layer is its own ``fully_shard`` unit, and so are the vision stem and ``mlp1`` (so the vision path
can run on its own for text-only batches), then the root.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ivl.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device != "cpu" and not device.startswith("cuda:"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    target = pick_device(device, local)
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, target, backend)
    if world <= 1:
        return DistInfo(0, 1, 0, target, None)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, target, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); the identity in one process."""
    out = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (used to stop together when any rank runs out of data)."""
    value = torch.tensor([1 if flag else 0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------------------
# FSDP2


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit, innermost first (the root is added by ``shard_model``)."""
    units: list[nn.Module] = []
    encoder = getattr(model.vision_model, "encoder", None)
    if encoder is not None:
        units += list(encoder.layers)
    units.append(model.vision_model)
    units.append(model.mlp1)
    units += list(model.language_model.model.layers)
    return units


def shard_model(model: nn.Module, *, bf16: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` per block, then to the root; ``bf16``: bf16 compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the vision stem returns a slice (CLS dropped); nothing downstream modifies it in place, so FSDP's
    # warning about in-place ops on returned views does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip FSDP's gradient reduce-scatter on all but the last micro-batch of a step (saves communication)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    yield


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Global gradient L2 norm (over all ranks for sharded parameters), clipped to ``max_norm`` when given."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded model state on CPU (only rank 0 gets the tensors when sharded; others get {})."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
