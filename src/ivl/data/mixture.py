"""A deterministic, checkpointable sampler over a mixture of datasets (spec §6.5, §10.7).

Every random choice is derived from counters (seed, dataset, epoch, draw number), not from a running
RNG, so the whole position fits in a few integers: ``state_dict()`` after k draws and
``load_state_dict`` in a fresh process continue with draw k+1 exactly.

``repeat_time`` r: r ≥ 1 repeats the dataset ⌊r⌋ times plus a ⌊len·(r−⌊r⌋)⌋-sample subset; r < 1 keeps
⌊len·r⌋ samples. ``subsample="random"`` (default) draws that subset with a seeded RNG; ``"prefix"``
keeps the first lines like the official loader, which silently biases toward whatever the annotation
file lists first (often one source or one time span), hence the different default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from ivl.errors import ConfigError

SampleKey = tuple[int, int, int]
"""(dataset index in the meta file, record index in that dataset, epoch)."""

_DRAW_STREAM = 0x5EED_D1CE
_ORDER_STREAM = 0x0DE5_0DE5
_SUBSET_STREAM = 0x5B5E_7000


def repeat_indices(
    length: int, repeat_time: float, seed: int = 0, subsample: Literal["random", "prefix"] = "random"
) -> np.ndarray:
    """Record indices of one dataset after ``repeat_time`` (before shuffling)."""
    if length < 0:
        raise ConfigError(f"dataset length must be >= 0, got {length}")
    if not math.isfinite(repeat_time) or repeat_time <= 0:
        raise ConfigError(f"repeat_time must be a positive number, got {repeat_time!r}")
    if subsample not in ("random", "prefix"):
        raise ConfigError(f"subsample must be 'random' or 'prefix', got {subsample!r}")
    whole = math.floor(repeat_time)
    extra = math.floor(length * (repeat_time - whole))
    parts = [np.arange(length, dtype=np.int64)] * whole
    if extra:
        if subsample == "prefix":
            parts.append(np.arange(extra, dtype=np.int64))
        else:
            rng = np.random.default_rng([seed, _SUBSET_STREAM])
            parts.append(np.sort(rng.choice(length, size=extra, replace=False)).astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class MixtureSampler:
    """Iterator of ``(dataset, record, epoch)`` keys for one shard (rank × dataloader worker).

    Each epoch every dataset's repeated index list is shuffled (seed, dataset, epoch), cut into equal
    shards, and the shard's datasets are drawn with probability ∝ their repeated length (``"sqrt"``: ∝ its
    square root), renormalised over the datasets not yet exhausted; the epoch ends when all are exhausted.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        repeat_times: Sequence[float] | None = None,
        *,
        seed: int = 0,
        weighting: Literal["length", "sqrt"] = "length",
        subsample: Literal["random", "prefix"] = "random",
        shuffle: bool = True,
        num_epochs: int | None = 1,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        even_shards: bool = True,
    ) -> None:
        if not lengths:
            raise ConfigError("MixtureSampler needs at least one dataset")
        repeat_times = [1.0] * len(lengths) if repeat_times is None else list(repeat_times)
        if len(repeat_times) != len(lengths):
            raise ConfigError(f"{len(repeat_times)} repeat_times for {len(lengths)} datasets")
        if weighting not in ("length", "sqrt"):
            raise ConfigError(f"weighting must be 'length' or 'sqrt', got {weighting!r}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be >= 1 or None (endless), got {num_epochs}")
        self.lengths = [int(n) for n in lengths]
        self.repeat_times = [float(r) for r in repeat_times]
        self.seed = int(seed)
        self.weighting = weighting
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.even_shards = even_shards
        self.subsample = subsample
        self.pools = [
            repeat_indices(n, r, seed=self.seed * 1_000_003 + d, subsample=subsample)
            for d, (n, r) in enumerate(zip(self.lengths, self.repeat_times, strict=True))
        ]
        self.set_shard(rank, world_size, worker_id, num_workers)
        self.epoch = 0
        self.draws = 0
        self.positions = [0] * len(self.lengths)
        self._order_epoch: int | None = None
        self._orders: list[np.ndarray] = []

    # ---------------------------------------------------------------- sharding
    def set_shard(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1) -> None:
        """Select this process's share: shard ``rank·num_workers + worker_id`` of ``world_size·num_workers``."""
        if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
            raise ConfigError(f"invalid shard: rank {rank} of {world_size}, worker {worker_id} of {num_workers}")
        self.shard = rank * num_workers + worker_id
        self.num_shards = world_size * num_workers
        self._order_epoch = None
        repeated = [self._shard_size(len(pool)) for pool in self.pools]
        raw = [float(n) if self.weighting == "length" else math.sqrt(n) for n in repeated]
        self.weights = np.asarray(raw, dtype=np.float64)
        self.shard_lengths = repeated

    def _shard_size(self, total: int) -> int:
        if self.even_shards:
            return total // self.num_shards
        return len(range(self.shard, total, self.num_shards))

    def __len__(self) -> int:
        """Keys per epoch in this shard."""
        return sum(self.shard_lengths)

    # ---------------------------------------------------------------- iteration
    def _orders_for(self, epoch: int) -> list[np.ndarray]:
        if self._order_epoch != epoch:
            orders = []
            for d, pool in enumerate(self.pools):
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, _ORDER_STREAM, d, epoch])
                    pool = pool[rng.permutation(len(pool))]
                if self.even_shards:
                    pool = pool[: (len(pool) // self.num_shards) * self.num_shards]
                orders.append(pool[self.shard :: self.num_shards])
            self._orders, self._order_epoch = orders, epoch
        return self._orders

    def _pick_dataset(self) -> int:
        remaining = np.array(
            [w if self.positions[d] < self.shard_lengths[d] else 0.0 for d, w in enumerate(self.weights)]
        )
        total = remaining.sum()
        if total <= 0:  # only zero-weight datasets with samples left (possible with sqrt of 0): take in order
            return next(d for d in range(len(self.positions)) if self.positions[d] < self.shard_lengths[d])
        u = np.random.default_rng([self.seed, _DRAW_STREAM, self.shard, self.epoch, self.draws]).random()
        cum = np.cumsum(remaining / total)
        return int(min(np.searchsorted(cum, u, side="right"), len(cum) - 1))

    def __iter__(self) -> Iterator[SampleKey]:
        return self

    def __next__(self) -> SampleKey:
        while all(p >= n for p, n in zip(self.positions, self.shard_lengths, strict=True)):
            if len(self) == 0 or (self.num_epochs is not None and self.epoch + 1 >= self.num_epochs):
                raise StopIteration
            self.epoch += 1
            self.draws = 0
            self.positions = [0] * len(self.lengths)
        d = self._pick_dataset()
        record = int(self._orders_for(self.epoch)[d][self.positions[d]])
        self.positions[d] += 1
        self.draws += 1
        return (d, record, self.epoch)

    # ---------------------------------------------------------------- checkpointing
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "repeat_times": self.repeat_times,
            "seed": self.seed,
            "weighting": self.weighting,
            "subsample": self.subsample,
            "shuffle": self.shuffle,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "even_shards": self.even_shards,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON position: epoch, draws, per-dataset positions, plus the settings they are valid for."""
        return {"epoch": self.epoch, "draws": self.draws, "positions": list(self.positions), **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"sampler checkpoint was made for a different data mixture or shard ({details})")
        self.epoch = int(state["epoch"])
        self.draws = int(state["draws"])
        self.positions = [int(p) for p in state["positions"]]
