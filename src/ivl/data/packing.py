"""Greedy packing of samples into sequences bounded by a token and a tile budget (spec §6.7).

A pack is a list of whole samples: a sample that does not fit an empty pack is truncated or rejected by a
configured rule and counted, never split across packs. ``PackedStream`` ties a sampler, a fetch function
and the packer together and can checkpoint its position (sampler state + keys of buffered samples), so a
resumed run yields exactly the packs the uninterrupted run would have yielded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch

from ivl.errors import ConfigError, DataError

OverlongRule = Literal["truncate", "reject"]
Sample = dict[str, Any]
"""A training sample: ``input_ids`` [L], ``labels`` [L] (long), ``pixel_values`` [N,3,S,S], ``image_flags`` [N],
``num_patches_list``, plus bookkeeping (``dataset``, ``index``, ``key``)."""


@dataclass
class PackingConfig:
    """Budgets of one pack (official defaults 16,384 tokens / 48 tiles / 20 open buffers)."""

    max_packed_tokens: int = 16384
    max_packed_tiles: int = 48
    max_buffer_size: int = 20
    overlong: OverlongRule = "truncate"

    def validate(self) -> PackingConfig:
        if self.max_packed_tokens < 2:
            raise ConfigError(f"max_packed_tokens must be >= 2, got {self.max_packed_tokens}")
        if self.max_packed_tiles < 0:
            raise ConfigError(f"max_packed_tiles must be >= 0, got {self.max_packed_tiles}")
        if self.max_buffer_size < 1:
            raise ConfigError(f"max_buffer_size must be >= 1, got {self.max_buffer_size}")
        if self.overlong not in ("truncate", "reject"):
            raise ConfigError(f"overlong must be 'truncate' or 'reject', got {self.overlong!r}")
        return self


@dataclass
class PackingStats:
    """What happened to the samples that went in; reported by the trainer."""

    samples: int = 0
    packs: int = 0
    tokens: int = 0
    tiles: int = 0
    truncated: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + 1


def num_tokens(sample: Sample) -> int:
    return int(sample["input_ids"].shape[0])


def num_tiles(sample: Sample) -> int:
    pixels = sample.get("pixel_values")
    return 0 if pixels is None else int(pixels.shape[0])


def num_image_tokens(sample: Sample, image_token_id: int) -> int:
    return int((sample["input_ids"] == image_token_id).sum())


def truncate_sample(sample: Sample, max_tokens: int, image_token_id: int | None) -> tuple[Sample | None, str]:
    """Cut ``input_ids``/``labels`` to ``max_tokens``; refuse when that would cut an image (spec §6.5).

    Returns ``(sample, "ok")``, ``(truncated_sample, "truncated")`` or ``(None, reason)``.
    """
    length = num_tokens(sample)
    if length <= max_tokens:
        return sample, "ok"
    if num_tiles(sample):
        if image_token_id is None:
            return None, "truncation of an image sample without a known image token id"
        if num_image_tokens(sample, image_token_id) != int((sample["input_ids"][:max_tokens] == image_token_id).sum()):
            return None, "truncation would cut an image"
    out = dict(sample)
    out["input_ids"] = sample["input_ids"][:max_tokens]
    out["labels"] = sample["labels"][:max_tokens]
    if not bool((out["labels"][1:] != -100).any()):
        return None, "no supervised token left after truncation"
    return out, "truncated"


@dataclass
class Pack:
    """Whole samples that share one packed sequence."""

    samples: list[Sample] = field(default_factory=list)
    num_tokens: int = 0
    num_tiles: int = 0

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.num_tokens += num_tokens(sample)
        self.num_tiles += num_tiles(sample)

    def sample_keys(self) -> list[Any]:
        return [s.get("key") for s in self.samples]


class GreedyPacker:
    """Buffers open packs sorted by tile count (descending) and puts each sample into the first that fits.

    A pack leaves the buffer when it hits either budget exactly or when more than ``max_buffer_size`` packs
    are open; then the fullest one (largest fraction of either budget) leaves. The official code evicts the
    one with most tiles; the fullest-first rule keeps the same bound on memory and wastes fewer tokens.
    """

    def __init__(self, config: PackingConfig | None = None, image_token_id: int | None = None) -> None:
        self.config = (config or PackingConfig()).validate()
        self.image_token_id = image_token_id
        self.buffers: list[Pack] = []
        self.stats = PackingStats()

    def fit(self, sample: Sample) -> Sample | None:
        """Apply the over-long rule to one sample; ``None`` (counted in stats) when it cannot be packed."""
        cfg = self.config
        tiles = num_tiles(sample)
        if tiles > cfg.max_packed_tiles:
            self.stats.reject(f"more than {cfg.max_packed_tiles} tiles")
            return None
        if num_tokens(sample) > cfg.max_packed_tokens:
            if cfg.overlong == "reject":
                self.stats.reject(f"longer than {cfg.max_packed_tokens} tokens")
                return None
            fitted, status = truncate_sample(sample, cfg.max_packed_tokens, self.image_token_id)
            if fitted is None:
                self.stats.reject(status)
                return None
            self.stats.truncated += 1
            return fitted
        return sample

    def _insert(self, pack: Pack) -> None:
        pos = len(self.buffers)
        for i, other in enumerate(self.buffers):
            if other.num_tiles < pack.num_tiles:
                pos = i
                break
        self.buffers.insert(pos, pack)

    def _is_full(self, pack: Pack) -> bool:
        cfg = self.config
        return pack.num_tokens >= cfg.max_packed_tokens or (
            cfg.max_packed_tiles > 0 and pack.num_tiles >= cfg.max_packed_tiles
        )

    def _fill(self, pack: Pack) -> float:
        cfg = self.config
        tiles = pack.num_tiles / cfg.max_packed_tiles if cfg.max_packed_tiles else 0.0
        return max(pack.num_tokens / cfg.max_packed_tokens, tiles)

    def _emit(self, pack: Pack) -> Pack:
        self.stats.packs += 1
        self.stats.tokens += pack.num_tokens
        self.stats.tiles += pack.num_tiles
        return pack

    def place(self, sample: Sample) -> list[Pack]:
        """Put an already fitted sample into a buffer; return the packs that became complete."""
        cfg = self.config
        tokens, tiles = num_tokens(sample), num_tiles(sample)
        if tokens > cfg.max_packed_tokens or tiles > cfg.max_packed_tiles:
            raise DataError(f"sample {sample.get('key')!r} ({tokens} tokens, {tiles} tiles) exceeds the pack budget")
        self.stats.samples += 1
        target = None
        for i, pack in enumerate(self.buffers):
            if pack.num_tokens + tokens <= cfg.max_packed_tokens and pack.num_tiles + tiles <= cfg.max_packed_tiles:
                target = self.buffers.pop(i)
                break
        if target is None:
            target = Pack()
        target.add(sample)
        if self._is_full(target):
            return [self._emit(target)]
        self._insert(target)
        out = []
        while len(self.buffers) > cfg.max_buffer_size:
            fullest = max(range(len(self.buffers)), key=lambda i: self._fill(self.buffers[i]))
            out.append(self._emit(self.buffers.pop(fullest)))
        return out

    def add(self, sample: Sample) -> list[Pack]:
        """Fit and place one sample; return the packs completed by it (possibly none)."""
        fitted = self.fit(sample)
        return [] if fitted is None else self.place(fitted)

    def flush(self) -> list[Pack]:
        """Emit every open pack (end of data)."""
        out = [self._emit(p) for p in self.buffers]
        self.buffers = []
        return out


class KeySampler(Protocol):
    """What ``PackedStream`` needs from a sampler (``ivl.data.mixture.MixtureSampler`` is one)."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackedStream:
    """Iterator of packs: sample keys → ``fetch`` → packer, with an exact, resumable position.

    ``fetch(key)`` must be deterministic (augmentation seeded by the key) and may return ``None`` for a
    skipped record. The checkpoint holds the sampler state plus the keys of samples sitting in open
    buffers and of packs completed but not yet handed out; resuming re-fetches those samples.
    """

    def __init__(self, sampler: KeySampler, fetch: Callable[[Any], Sample | None], packer: GreedyPacker) -> None:
        self.sampler = sampler
        self.fetch = fetch
        self.packer = packer
        self.pending: list[Pack] = []
        self.skipped = 0
        self._done = False

    def __iter__(self) -> Iterator[Pack]:
        return self

    def __next__(self) -> Pack:
        while not self.pending:
            if self._done:
                raise StopIteration
            try:
                key = next(self.sampler)
            except StopIteration:
                self._done = True
                self.pending.extend(self.packer.flush())
                continue
            sample = self.fetch(key)
            if sample is None:
                self.skipped += 1
                continue
            sample["key"] = key
            self.pending.extend(self.packer.add(sample))
        return self.pending.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "buffers": [pack.sample_keys() for pack in self.packer.buffers],
            "pending": [pack.sample_keys() for pack in self.pending],
            "stats": asdict(self.packer.stats),
            "skipped": self.skipped,
            "done": self._done,
        }

    def _rebuild(self, keys: list[Any]) -> Pack:
        pack = Pack()
        for key in keys:
            sample = self.fetch(key)
            if sample is None:
                raise DataError(f"resuming: buffered sample {key!r} can no longer be read")
            sample["key"] = key
            fitted = self.packer.fit(sample)
            if fitted is None:
                raise DataError(f"resuming: buffered sample {key!r} no longer fits the pack budget")
            pack.add(fitted)
        return pack

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.packer.buffers = [self._rebuild(keys) for keys in state["buffers"]]
        self.pending = [self._rebuild(keys) for keys in state["pending"]]
        self.packer.stats = PackingStats(**{**state["stats"], "reject_reasons": dict(state["stats"]["reject_reasons"])})
        self.skipped = state["skipped"]
        self._done = state["done"]


def packing_efficiency(packs: list[Pack], max_packed_tokens: int) -> float:
    """Fraction of a fixed-length (``max_packed_tokens``) pack that holds real tokens, over all packs."""
    if not packs:
        return 0.0
    return sum(p.num_tokens for p in packs) / (len(packs) * max_packed_tokens)


def position_ids_for(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Positions restarting at 0 for each sub-sample."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def cu_seqlens_for(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``[0, len₀, len₀+len₁, …]`` as int32, the layout varlen attention kernels expect."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)
