"""``ivl synth``: a seeded synthetic visual world in the official InternVL data format.

No pretrained weights or datasets can be downloaded, so the demo trains and evaluates on images drawn
here, whose answers are known by construction. Layout of a world directory::

    world.json                      seed, settings, per-split counts, chance levels
    {split}_meta.json               official meta: {"synth_<task>": {root, annotation, data_augment, ...}}
    {split}/{task}.jsonl            official records + ground truth keys (task, answer, choices, box, ...)
    {split}/{task}/000000.png       media (multi-image: 000000_1.png, 000000_2.png; video: 000000.mp4)

Paths in the meta files are relative to the meta file's folder unless ``absolute_paths=True`` (the official
loader resolves them against the working directory). Every record draws from its own RNG seeded by
(seed, split, task, index), so the same seed gives byte-identical files (PNG via Pillow; MP4 via PyAV's
libx264 with one thread and bit-exact muxing: identical for the same PyAV/FFmpeg build).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ivl.data.synthetic_scoring import TASKS, VISION_TASKS, TaskInfo, box_iou, chance_level, parse_box, score
from ivl.data.synthetic_tasks import GENERATORS, Options, Sample, box_answer, text_facts
from ivl.errors import ConfigError, DataError

__all__ = [
    "SPLITS",
    "TASKS",
    "VISION_TASKS",
    "TaskInfo",
    "WorldSummary",
    "box_answer",
    "box_iou",
    "chance_level",
    "corpus_texts",
    "generate_world",
    "parse_box",
    "read_records",
    "score",
    "text_facts",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1
VIDEO_FPS = 4


@dataclass
class WorldSummary:
    """What ``generate_world`` wrote: counts per split and task, meta files, and blind-guess accuracy."""

    out_dir: Path
    seed: int
    counts: dict[str, dict[str, int]]
    meta_files: dict[str, Path]
    chance: dict[str, float] = field(default_factory=dict)
    n_files: int = 0

    @property
    def n_records(self) -> int:
        return sum(n for per_task in self.counts.values() for n in per_task.values())


def _balanced(classes: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """n labels, each class ⌊n/k⌋ or ⌈n/k⌉ times (the remainder drawn at random), in random order."""
    labels = [classes[i % len(classes)] for i in range(n - n % len(classes))]
    labels += rng.sample(list(classes), n % len(classes))
    rng.shuffle(labels)
    return labels


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False)


def _save_mp4(frames: list[Image.Image], path: Path, fps: int = VIDEO_FPS) -> None:
    """H.264 (yuv420p, near-lossless) with one encoder thread and bit-exact muxing, so reruns give equal bytes."""
    import av

    w, h = frames[0].size
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={"threads": "1", "crf": "12", "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def _record(
    split: str, task: str, index: int, sample: Sample, media_dir: Path, follow_ups: int = 0
) -> tuple[dict[str, Any], int]:
    """Write the sample's media under ``media_dir`` and return its JSONL record and the number of files.

    Up to ``follow_ups`` of the sample's follow-up questions become further turns of the conversation; the
    record's ``answer`` (what evaluation scores) stays the first turn's.
    """
    stem = f"{index:06d}"
    record: dict[str, Any] = {"id": f"{split}/{task}/{stem}"}
    n_files = 0
    if sample.frames:
        _save_mp4(sample.frames, media_dir / f"{stem}.mp4")
        record["video"] = f"{stem}.mp4"
        record["width"], record["height"] = sample.frames[0].size
        n_files = 1
    elif len(sample.images) == 1:
        _save_png(sample.images[0], media_dir / f"{stem}.png")
        record["image"] = f"{stem}.png"
        record["width"], record["height"] = sample.images[0].size
        n_files = 1
    elif sample.images:
        names = [f"{stem}_{k + 1}.png" for k in range(len(sample.images))]
        for img, name in zip(sample.images, names, strict=True):
            _save_png(img, media_dir / name)
        record["image"] = names
        n_files = len(names)
    record["conversations"] = [{"from": "human", "value": sample.prompt}, {"from": "gpt", "value": sample.answer}]
    for question, answer in sample.follow_ups[:follow_ups]:
        record["conversations"] += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record["task"] = task
    record["answer"] = sample.answer
    if sample.choices is not None:
        record["choices"] = sample.choices
    record.update(sample.extra)
    return record, n_files


def _check_args(
    counts: dict[str, int], size_range: tuple[int, int], video_frames: tuple[int, int], tasks: Iterable[str] | None
) -> list[str]:
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{split} must be a non-negative integer, got {n!r}")
    lo, hi = size_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 16 <= lo <= hi):
        raise ConfigError(f"image_size_range must be two integers 16 <= lo <= hi (long side in px), got {size_range!r}")
    if not (isinstance(video_frames[0], int) and 2 <= video_frames[0] <= video_frames[1]):
        raise ConfigError(f"video_frames must be two integers 2 <= lo <= hi, got {video_frames!r}")
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown synthetic task(s) {unknown or names!r}; known: {', '.join(TASKS)}")
    return [t for t in TASKS if t in names]  # canonical order, duplicates dropped


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise DataError(f"{out_dir}: output directory exists and is not empty (pass overwrite=True / --overwrite)")
        if not (out_dir / "world.json").is_file():
            raise DataError(
                f"{out_dir}: refusing to overwrite a directory that is not a synthetic world (no world.json)"
            )


def generate_world(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 200,
    image_size_range: tuple[int, int] = (56, 224),
    video_frames: tuple[int, int] = (4, 8),
    tasks: Iterable[str] | None = None,
    follow_ups: int = 0,
    absolute_paths: bool = False,
    overwrite: bool = False,
) -> WorldSummary:
    """Generate train/val/test splits with ``n_*`` records **per task** (text-only warm-up task: train only).

    ``image_size_range`` bounds the long side in pixels; images are square, 2:1 or 1:2. ``follow_ups``: at most
    this many further question turns about the same media per **train** record (val/test keep one question,
    so evaluation is unchanged); the media and first turn are the same whatever its value. Files are written
    to a temporary sibling directory and moved into place at the end, so a crash never leaves half a world.
    """
    out_dir = Path(out_dir)
    counts_in = {"train": n_train, "val": n_val, "test": n_test}
    names = _check_args(counts_in, tuple(image_size_range), tuple(video_frames), tasks)
    if isinstance(follow_ups, bool) or not isinstance(follow_ups, int) or follow_ups < 0:
        raise ConfigError(f"follow_ups must be a non-negative integer, got {follow_ups!r}")
    _prepare_out_dir(out_dir, overwrite)
    opts = Options(size_range=tuple(image_size_range), video_frames=tuple(video_frames))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    base = out_dir.resolve()
    counts: dict[str, dict[str, int]] = {}
    chance: dict[str, float] = {}
    n_files = 0
    try:
        for split, n in counts_in.items():
            meta: dict[str, dict[str, Any]] = {}
            counts[split] = {}
            for task in names:
                if n == 0 or (task == "text" and split != "train"):
                    continue
                info, (generate, classes) = TASKS[task], GENERATORS[task]
                media_dir = tmp / split / task
                media_dir.mkdir(parents=True, exist_ok=True)
                labels = _balanced(classes, n, random.Random(f"ivl-synth/{seed}/{split}/{task}/labels"))
                lines, records = [], []
                for i, label in enumerate(labels):
                    sample = generate(random.Random(f"ivl-synth/{seed}/{split}/{task}/{i}"), label, opts)
                    turns = follow_ups if split == "train" else 0
                    record, files = _record(split, task, i, sample, media_dir, turns)
                    n_files += files
                    records.append(record)
                    lines.append(json.dumps(record, ensure_ascii=False))
                (tmp / split / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
                n_files += 1
                if task == "text":
                    media_dir.rmdir()
                chance[task] = chance_level(task, records)  # splits run train, val, test: the last one wins
                root = "" if task == "text" else f"{split}/{task}"
                annotation = f"{split}/{task}.jsonl"
                if absolute_paths:
                    root = str(base / root) if root else ""
                    annotation = str(base / annotation)
                meta[f"synth_{task}"] = {
                    "root": root,
                    "annotation": annotation,
                    "data_augment": info.data_augment and split == "train",
                    "max_dynamic_patch": info.max_dynamic_patch,
                    "repeat_time": 1,
                    "length": n,
                }
                counts[split][task] = n
            if meta:
                (tmp / f"{split}_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                n_files += 1
        world = {
            "generator": "ivl synth",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "image_size_range": list(image_size_range),
            "video_frames": list(video_frames),
            "follow_ups": follow_ups,
            "tasks": names,
            "counts": counts,
            "chance": chance,
        }
        (tmp / "world.json").write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
        n_files += 1
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta_files = {split: out_dir / f"{split}_meta.json" for split in SPLITS if counts.get(split)}
    return WorldSummary(out_dir, seed, counts, meta_files, chance, n_files)


def read_records(out_dir: str | os.PathLike[str], split: str, task: str | None = None) -> list[dict[str, Any]]:
    """The raw JSONL records (with ground truth) of one split, optionally of one task, in file order."""
    split_dir = Path(out_dir) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such split in the synthetic world {out_dir}")
    paths = [split_dir / f"{task}.jsonl"] if task else sorted(split_dir.glob("*.jsonl"))
    records = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no annotation file for task {task!r}")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
    return records


def corpus_texts(out_dir: str | os.PathLike[str], splits: str | Sequence[str] = ("train",)) -> list[str]:
    """Every question and answer of a world's ``splits``, media placeholders removed: the corpus to train a
    tokenizer on. Only the train split by default: a tokenizer fitted on held-out text carries its statistics.

    ``Image-k:`` labels, ``<ref>``/``<box>`` markup and the text-only facts stay in, since the model must
    read and write them.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ConfigError(f"corpus_texts: unknown splits {unknown}; the world's splits are {list(SPLITS)}")
    out_dir = Path(out_dir)
    texts = []
    for split in splits:
        if not (out_dir / split).is_dir():
            continue
        for record in read_records(out_dir, split):
            for turn in record["conversations"]:
                text = turn["value"].replace("<image>", "").replace("<video>", "").strip()
                if text:
                    texts.append(text)
    return texts
