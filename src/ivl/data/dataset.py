"""Training datasets: one map-style dataset per meta entry, and the resumable packed stream over all of them.

``RecordDataset.get(i, epoch)`` turns JSONL line ``i`` into a sample dict through the shared `Processor`
(template, label masking, tiling with the dataset's n_max), applying random JPEG compression per tile when
the dataset has ``data_augment``. A record whose media is missing or unreadable fails fast by default; with
``skip_bad_records=True`` it is skipped, written to the rejects file with the reason, and counted.

``PackedIterable`` runs sampler → fetch → packer → collate inside DataLoader workers and stamps every
batch with its worker's stream state; ``ResumableLoader`` keeps the latest state per worker, so its
``state_dict()`` resumes the exact batch sequence (worker interleaving included).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ivl.data.augment import RandomJpeg, augment_rng
from ivl.data.collate import packed_collate
from ivl.data.media_cache import MediaCache, shared_media_cache
from ivl.data.mixture import MixtureSampler
from ivl.data.packing import GreedyPacker, OverlongRule, PackedStream, PackingConfig, Sample, truncate_sample
from ivl.data.records import MetaEntry, Record, decode_line, index_jsonl, load_meta
from ivl.errors import ConfigError, DataError, ImageError, TemplateError
from ivl.processing.images import DEFAULT_MAX_PIXELS
from ivl.processing.tiling import TiledImage, normalize_tiled
from ivl.processing.video import read_video

_FRAMES_STREAM = 0xF4A3_E500


class RejectLog:
    """Skipped records: counted, and appended as JSON lines ``{dataset, where, reason}`` to ``path``."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.count = 0
        self.reasons: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, dataset: str, where: str, reason: str, kind: str) -> None:
        with self._lock:
            self.count += 1
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(
                        json.dumps({"dataset": dataset, "where": where, "reason": reason}, ensure_ascii=False) + "\n"
                    )


def denormalize_tiles(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 tiles ``[N, S, S, 3]`` back from float32 normalised ones (exact: the error is ≪ half a level)."""
    if pixel_values.dtype != torch.float32:
        raise ConfigError(
            f"JPEG augmentation needs float32 pixel values to recover the exact tiles, got {pixel_values.dtype}"
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    levels = ((pixel_values * s + m) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return levels.permute(0, 2, 3, 1).contiguous().numpy()


def jpeg_augment_pixels(
    pixel_values: torch.Tensor, rng: np.random.Generator, mean: Sequence[float], std: Sequence[float], jpeg: RandomJpeg
) -> torch.Tensor:
    """Re-encode every tile (thumbnail included) as JPEG at its own random quality, then normalise again.

    Equals JPEG on the uint8 tile before ToTensor/Normalize, as the official transform does (spec §6.3).
    """
    from PIL import Image

    tiles = denormalize_tiles(pixel_values, mean, std)
    out = [np.asarray(t) for t in jpeg([Image.fromarray(tile, "RGB") for tile in tiles], rng)]
    n, size = len(out), tiles.shape[1]
    strip = np.concatenate(out, axis=1) if n else np.zeros((size, 0, 3), np.uint8)  # tiles side by side: grid (n, 1)
    return normalize_tiled([TiledImage(strip, None, (n, 1), size)], mean, std)


@dataclass
class DatasetOptions:
    """Per-run settings shared by all datasets of a mixture."""

    seed: int = 0
    skip_bad_records: bool = False
    rejects_path: str | None = None
    max_length: int | None = None
    overlong: OverlongRule = "reject"
    min_num_frames: int = 8
    max_num_frames: int = 32
    default_max_dynamic_patch: int | None = None
    media_cache_bytes: int = 0  # decoded media kept between epochs (one cache per process: `shared_media_cache`)

    def validate(self) -> DatasetOptions:
        if not 1 <= self.min_num_frames <= self.max_num_frames:
            raise ConfigError(
                f"video frame range must satisfy 1 <= min <= max, got [{self.min_num_frames}, {self.max_num_frames}]"
            )
        if self.overlong not in ("truncate", "reject"):
            raise ConfigError(f"overlong must be 'truncate' or 'reject', got {self.overlong!r}")
        if self.media_cache_bytes < 0:
            raise ConfigError(f"media_cache_bytes must be >= 0, got {self.media_cache_bytes}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        return self


class RecordDataset(torch.utils.data.Dataset):
    """The records of one meta entry; lines are indexed at construction and parsed when read."""

    def __init__(
        self,
        entry: MetaEntry,
        processor: Any,
        *,
        index: int = 0,
        options: DatasetOptions | None = None,
        rejects: RejectLog | None = None,
    ) -> None:
        self.entry = entry
        self.processor = processor
        self.index = index
        self.options = (options or DatasetOptions()).validate()
        self.rejects = rejects if rejects is not None else RejectLog(self.options.rejects_path)
        bound = self.options.media_cache_bytes
        self.media_cache: MediaCache | None = shared_media_cache(bound) if bound else None
        self.lines = index_jsonl(entry.annotation)
        self.jpeg = RandomJpeg() if entry.data_augment else None
        if self.jpeg is not None and getattr(processor, "dtype", torch.float32) != torch.float32:
            raise ConfigError(f"dataset {entry.name!r}: data_augment needs a float32 processor (got {processor.dtype})")

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def max_num(self) -> int | None:
        return self.entry.max_dynamic_patch or self.options.default_max_dynamic_patch

    def record(self, i: int) -> Record:
        """Parse and validate line ``i`` (raises `DataError` naming file and line)."""
        if not 0 <= i < len(self.lines):
            raise DataError(f"dataset {self.entry.name!r}: record index {i} out of range (0..{len(self.lines) - 1})")
        offset, lineno = self.lines[i]
        with open(self.entry.annotation, "rb") as fh:
            fh.seek(offset)
            raw = fh.readline().decode("utf-8")
        return decode_line(raw, self.entry.annotation, lineno)

    def __getitem__(self, i: int) -> Sample:
        sample = self.get(i)
        if sample is None:
            raise DataError(f"dataset {self.entry.name!r}: record {i} was rejected (see the rejects log)")
        return sample

    def get(self, i: int, epoch: int = 0) -> Sample | None:
        """The sample of record ``i`` in ``epoch`` (epoch seeds augmentation); None if skipped."""
        where = f"{self.entry.annotation}:{self.lines[i][1] if 0 <= i < len(self.lines) else '?'}"
        try:
            record = self.record(i)
            sample = self._encode(record, self._rng(i, epoch))
            sample["index"] = i
        except (DataError, ImageError, TemplateError) as exc:
            message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
            if not self.options.skip_bad_records:
                raise DataError(message) from exc
            self.rejects.add(self.entry.name, where, message, type(exc).__name__)
            return None
        if self.options.max_length is not None:
            sample = self._fit_length(sample, where)
        return sample

    def _rng(self, i: int, epoch: int) -> np.random.Generator:
        return augment_rng(self.options.seed, (self.index, i, epoch))

    def _fit_length(self, sample: Sample, where: str) -> Sample | None:
        limit = self.options.max_length
        assert limit is not None
        if sample["input_ids"].numel() <= limit:
            return sample
        if self.options.overlong == "reject":
            fitted, reason = None, f"longer than max_length={limit} ({sample['input_ids'].numel()} tokens)"
        else:
            fitted, reason = truncate_sample(sample, limit, self.processor.image_token_id)
        if fitted is None:
            # an over-long sample is not a broken record: always skipped and reported, never fatal
            self.rejects.add(self.entry.name, where, f"{where}: {reason}", "overlong")
        return fitted

    def _encode(self, record: Record, rng: np.random.Generator) -> Sample:
        processor = self.processor
        cache = self.media_cache
        images: list[Any] = [self.entry.resolve(p) for p in record.images]
        if cache is not None:
            max_pixels = getattr(processor, "max_pixels", DEFAULT_MAX_PIXELS)
            images = [cache.image(path, max_pixels=max_pixels) for path in images]
        videos: list[Any] = []
        if record.video is not None:
            frames = int(rng.integers(self.options.min_num_frames, self.options.max_num_frames + 1))
            path = self.entry.resolve(record.video)
            if cache is not None:
                videos = [cache.video(path, num_segments=frames, bound=record.clip)]
            else:
                videos = [read_video(path, num_segments=frames, bound=record.clip)]
        encoded = processor.encode_conversation(
            record.as_messages(), images=images or None, videos=videos or None, max_num=self.max_num
        )
        pixel_values = encoded.pixel_values
        size = processor.image_size
        if pixel_values is None:
            pixel_values = torch.zeros(0, 3, size, size, dtype=getattr(processor, "dtype", torch.float32))
        elif self.jpeg is not None and record.video is None:  # the paper augments images, not video frames
            pixel_values = jpeg_augment_pixels(pixel_values, rng, processor.image_mean, processor.image_std, self.jpeg)
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixel_values,
            "image_flags": torch.ones(pixel_values.shape[0], dtype=torch.long),
            "num_patches_list": list(encoded.num_patches_list),
            "dataset": self.entry.name,
            "where": record.where,
        }


def build_datasets(
    meta: str | os.PathLike[str] | Sequence[MetaEntry], processor: Any, options: DatasetOptions | None = None
) -> list[RecordDataset]:
    """One `RecordDataset` per meta entry, in meta-file order (the order fixes dataset indices and seeds)."""
    entries = load_meta(meta) if isinstance(meta, str | os.PathLike) else list(meta)
    options = (options or DatasetOptions()).validate()
    rejects = RejectLog(options.rejects_path)
    return [RecordDataset(e, processor, index=d, options=options, rejects=rejects) for d, e in enumerate(entries)]


class MixtureFetcher:
    """``fetch(key)`` for `PackedStream`: key ``(dataset, record, epoch)`` → sample (or None if skipped)."""

    def __init__(self, datasets: Sequence[RecordDataset]) -> None:
        self.datasets = list(datasets)

    def __call__(self, key: Sequence[int]) -> Sample | None:
        d, i, epoch = (int(k) for k in key)
        return self.datasets[d].get(i, epoch)


# --------------------------------------------------------------------------------------------------------
# DataLoader glue


@dataclass
class PackedLoaderConfig:
    """Everything `PackedIterable` needs besides the datasets (kept picklable for worker processes)."""

    packing: PackingConfig = field(default_factory=PackingConfig)
    loss_mode: Literal["token", "sample", "square"] = "square"
    seed: int = 0
    weighting: Literal["length", "sqrt"] = "length"
    subsample: Literal["random", "prefix"] = "random"
    num_epochs: int | None = 1
    rank: int = 0
    world_size: int = 1
    dummy_tile_size: int | None = None
    pad_to: int | None = None
    pad_token_id: int = 0


class PackedIterable(torch.utils.data.IterableDataset):
    """Packed, collated batches for one rank; each DataLoader worker takes its own shard of every dataset.

    Every batch carries ``data_state = {"worker", "num_workers", "state"}``: that worker's stream state
    right after producing it. ``resume`` (from `ResumableLoader.state_dict`) restores each worker and makes
    workers that were one batch ahead emit a ``{"skip": True}`` placeholder first, so the DataLoader's
    round-robin order continues exactly where it stopped.
    """

    def __init__(
        self,
        datasets: Sequence[RecordDataset],
        config: PackedLoaderConfig,
        image_token_id: int | None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.datasets = list(datasets)
        self.config = config
        self.image_token_id = image_token_id
        self.resume = resume

    def stream(self, worker_id: int = 0, num_workers: int = 1) -> PackedStream:
        cfg = self.config
        sampler = MixtureSampler(
            [len(d) for d in self.datasets],
            [d.entry.repeat_time for d in self.datasets],
            seed=cfg.seed,
            weighting=cfg.weighting,
            subsample=cfg.subsample,
            num_epochs=cfg.num_epochs,
            rank=cfg.rank,
            world_size=cfg.world_size,
            worker_id=worker_id,
            num_workers=num_workers,
        )
        return PackedStream(sampler, MixtureFetcher(self.datasets), GreedyPacker(cfg.packing, self.image_token_id))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = self.stream(worker, workers)
        if self.resume is not None:
            if self.resume["num_workers"] != workers:
                raise ConfigError(
                    f"data state was saved with {self.resume['num_workers']} loader workers, now {workers}"
                )
            state = self.resume["workers"].get(str(worker))
            if state is not None:
                stream.load_state_dict(state)
            if worker < self.resume["consumed"] % workers:
                yield {"skip": True, "data_state": None}
        cfg = self.config
        for pack in stream:
            batch = packed_collate(
                pack,
                cfg.loss_mode,
                pad_to=cfg.pad_to,
                pad_token_id=cfg.pad_token_id,
                dummy_tile_size=cfg.dummy_tile_size,
            )
            batch["data_state"] = {"worker": worker, "num_workers": workers, "state": stream.state_dict()}
            yield batch


def reset_thread_pools(_worker_id: int = 0) -> None:
    """Drop thread pools inherited through fork: their threads do not exist in the worker, so the first
    submitted job would wait forever (the tiling module caches a resize pool)."""
    from ivl.processing import tiling

    cached = getattr(tiling, "_pool", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


class ResumableLoader:
    """Iterates a DataLoader over a `PackedIterable` (batch_size=None), dropping skip placeholders and
    remembering the latest state of every worker; ``state_dict()`` is plain JSON for the checkpoint."""

    def __init__(self, dataset: PackedIterable, num_workers: int = 0, **loader_kwargs: Any) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.loader_kwargs = loader_kwargs
        resume = dataset.resume or {}
        self.consumed = int(resume.get("consumed", 0))
        self.states: dict[str, Any] = dict(resume.get("workers", {}))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        kwargs = dict(self.loader_kwargs)
        if self.num_workers > 0:
            kwargs.setdefault("worker_init_fn", reset_thread_pools)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, **kwargs)
        for batch in loader:
            if batch.get("skip"):
                continue
            state = batch.pop("data_state")
            self.states[str(state["worker"])] = state["state"]
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "num_workers": max(1, self.num_workers), "workers": dict(self.states)}

    def summary(self) -> dict[str, int]:
        """Totals over workers (as of the last consumed batch): skipped records, truncated/rejected samples."""
        out = {"skipped_records": 0, "truncated": 0, "rejected_overlong": 0, "samples": 0, "packs": 0}
        for state in self.states.values():
            stats = state["stats"]
            out["skipped_records"] += state["skipped"]
            out["truncated"] += stats["truncated"]
            out["rejected_overlong"] += stats["rejected"]
            out["samples"] += stats["samples"]
            out["packs"] += stats["packs"]
        return out
