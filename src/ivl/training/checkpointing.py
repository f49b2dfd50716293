"""Resumable training checkpoints: torch.distributed.checkpoint for model + optimizer, plus scheduler, data and
RNG state, written atomically.

Layout of ``OUTPUT/checkpoint-00000040/``::

    state/               DCP shards of {"model", "optim"} (sharded or not: DCP reshards on load)
    rank00000.pt         this rank's RNG states and data-stream state
    trainer_state.json   step, scheduler state, world size; written last

Everything is written into ``.checkpoint-00000040.tmp`` first and renamed into place by rank 0 after every rank
finished, so a run killed at any moment leaves either a complete checkpoint or none (and a stale temp
directory that the next save removes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ivl.errors import CheckpointError
from ivl.training.distributed import DistInfo, barrier

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (their ``trainer_state.json`` exists), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


@dataclass
class Resumed:
    """What a loaded checkpoint hands back to the trainer besides the restored model/optimizer/scheduler."""

    step: int
    data_state: Any
    extra: dict[str, Any]
    path: Path


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_state: Any,
    info: DistInfo,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` (every rank calls this); returns its final path."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    with _quiet_single_process():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / "state"))
    rank_file = tmp / f"rank{info.rank:05d}.pt"
    torch.save({"rng": rng_state(), "data": data_state}, rank_file)
    _fsync(rank_file)
    barrier()
    if info.is_main:
        meta = {
            "step": step,
            "world_size": info.world_size,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a previous attempt at this very step (resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: DistInfo,
) -> Resumed:
    """Restore model, optimizer, scheduler and this rank's RNG; return the step and this rank's data state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    meta = json.loads(state_file.read_text(encoding="utf-8"))
    if meta.get("world_size", 1) != info.world_size:
        raise CheckpointError(
            f"{path}: saved with {meta.get('world_size')} rank(s), resuming with {info.world_size}; the data "
            "streams are per rank, so resume with the same world size"
        )
    rank_file = path / f"rank{info.rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path}: missing {rank_file.name}")
    state = _state_dicts(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    local = torch.load(rank_file, weights_only=False)
    set_rng_state(local["rng"])
    extra = {k: v for k, v in meta.items() if k not in ("step", "world_size", "scheduler")}
    return Resumed(step=int(meta["step"]), data_state=local["data"], extra=extra, path=path)
