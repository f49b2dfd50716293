"""Schemas of the official training-data description: the meta JSON and the JSONL conversation records.

Parsing validates everything that can be checked without touching image files, so a broken annotation
fails at load time with ``file:line: what is wrong``; image files are checked lazily when a sample is read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivl.errors import DataError

ROLES = ("system", "human", "gpt")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


@dataclass
class MetaEntry:
    """One dataset of the meta JSON: where its files live and how it enters the mixture."""

    name: str
    annotation: str
    root: str = ""
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    repeat_time: float = 1.0
    length: int | None = None

    def resolve(self, path: str) -> str:
        """Absolute path of an image/video named by a record (absolute paths and URLs are kept)."""
        if os.path.isabs(path) or "://" in path or not self.root:
            return path
        if "://" in self.root:  # s3:// style roots are concatenated, as the official loader does
            return self.root.rstrip("/") + "/" + path
        return os.path.join(self.root, path)


@dataclass
class Turn:
    """One conversation message in the official vocabulary (``from`` ∈ system/human/gpt)."""

    role: str
    value: str


@dataclass
class Record:
    """One JSONL line, validated; ``source`` and ``line`` point back to it for error messages."""

    conversations: list[Turn]
    images: list[str] = field(default_factory=list)
    video: str | None = None
    clip: tuple[float, float] | None = None
    width: int | None = None
    height: int | None = None
    id: Any = None
    source: str = "<memory>"
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def kind(self) -> str:
        """``text``, ``image``, ``multi_image`` or ``video``."""
        if self.video is not None:
            return "video"
        if not self.images:
            return "text"
        return "image" if len(self.images) == 1 else "multi_image"

    def as_messages(self) -> list[dict[str, str]]:
        """Conversations in the official ``{"from", "value"}`` form, after the placeholder rules."""
        return [{"from": t.role, "value": t.value} for t in self.conversations]


# --------------------------------------------------------------------------------------------------------
# meta JSON

_META_FIELDS = {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}


def parse_meta(meta: dict[str, Any], source: str = "<meta>") -> list[MetaEntry]:
    """Validate a meta mapping ``{name: {root, annotation, ...}}`` and return its entries in file order."""
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{source}: meta must be a non-empty JSON object mapping dataset names to entries")
    entries = []
    for name, spec in meta.items():
        where = f"{source}: dataset {name!r}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: entry must be an object, got {type(spec).__name__}")
        unknown = set(spec) - _META_FIELDS
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_META_FIELDS)}")
        annotation = spec.get("annotation")
        if not isinstance(annotation, str) or not annotation:
            raise DataError(f"{where}: 'annotation' (path to a .jsonl file) is required")
        root = spec.get("root", "")
        if not isinstance(root, str):
            raise DataError(f"{where}: 'root' must be a string, got {root!r}")
        augment = spec.get("data_augment", False)
        if not isinstance(augment, bool):
            raise DataError(f"{where}: 'data_augment' must be true or false, got {augment!r}")
        n_max = spec.get("max_dynamic_patch")
        if n_max is not None and (isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1):
            raise DataError(f"{where}: 'max_dynamic_patch' must be a positive integer, got {n_max!r}")
        repeat = spec.get("repeat_time", 1.0)
        if isinstance(repeat, bool) or not isinstance(repeat, int | float) or not math.isfinite(repeat) or repeat <= 0:
            raise DataError(f"{where}: 'repeat_time' must be a positive number, got {repeat!r}")
        length = spec.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
            raise DataError(f"{where}: 'length' must be a non-negative integer, got {length!r}")
        entries.append(MetaEntry(str(name), annotation, root, augment, n_max, float(repeat), length))
    return entries


def load_meta(path: str | os.PathLike[str]) -> list[MetaEntry]:
    """Read a meta JSON file.

    Relative ``annotation`` and ``root`` paths are taken relative to the meta file's folder when they
    exist there and not relative to the working directory (the official scripts use the working
    directory; this keeps both layouts working).
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: meta file not found") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    entries = parse_meta(meta, str(path))
    for entry in entries:
        entry.annotation = _near(path.parent, entry.annotation)
        if entry.root:
            entry.root = _near(path.parent, entry.root)
    return entries


def _near(folder: Path, name: str) -> str:
    if os.path.isabs(name) or "://" in name or Path(name).exists():
        return name
    candidate = folder / name
    return str(candidate) if candidate.exists() else name


# --------------------------------------------------------------------------------------------------------
# records


def _positive_int(value: Any, name: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{where}: '{name}' must be a positive integer, got {value!r}")
    return value


def parse_record(obj: Any, source: str = "<memory>", line: int = 0) -> Record:
    """Validate one decoded JSONL object and apply the placeholder rules of the official loader.

    Rules: roles are system?/human/gpt alternating, starting with human and ending with gpt; a
    single-image record without any ``<image>`` gets ``<image>\\n`` prepended to its first human turn;
    afterwards the number of ``<image>`` placeholders (human turns only) must equal the number of images.
    A video record uses at most one ``<video>`` (prepended when missing) and no ``<image>``.
    """
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for i, msg in enumerate(convs):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object, got {type(msg).__name__}")
        role, value = msg.get("from"), msg.get("value")
        if role not in ROLES:
            raise DataError(f"{where}: conversations[{i}].from must be human/gpt/system, got {role!r}")
        if not isinstance(value, str):
            raise DataError(f"{where}: conversations[{i}].value must be a string, got {type(value).__name__}")
        turns.append(Turn(role, value))
    start = 1 if turns[0].role == "system" else 0
    body = turns[start:]
    if not body:
        raise DataError(f"{where}: conversations hold only a system turn")
    for i, turn in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.role != expected:
            raise DataError(
                f"{where}: conversations[{i + start}].from must be {expected!r} (roles alternate human/gpt "
                f"after an optional leading system turn), got {turn.role!r}"
            )
    if body[-1].role != "gpt":
        raise DataError(f"{where}: the last turn must be 'gpt' (a trailing human turn has no answer to learn)")

    image = obj.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = list(image)
    else:
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {image!r}")
    if any(not p for p in images):
        raise DataError(f"{where}: 'image' contains an empty path")
    video = obj.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        raise DataError(f"{where}: 'video' must be a non-empty path, got {video!r}")
    if video is not None and images:
        raise DataError(f"{where}: a record holds either 'image' or 'video', not both")
    clip = obj.get("clip")
    if clip is not None:
        if (
            not isinstance(clip, list | tuple)
            or len(clip) != 2
            or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in clip)
            or not 0 <= clip[0] < clip[1]
        ):
            raise DataError(f"{where}: 'clip' must be [start_s, end_s] with 0 <= start < end, got {clip!r}")
        clip = (float(clip[0]), float(clip[1]))

    for i, turn in enumerate(turns):
        if turn.role != "human" and (IMAGE_PLACEHOLDER in turn.value or VIDEO_PLACEHOLDER in turn.value):
            raise DataError(f"{where}: conversations[{i}] ({turn.role}) contains a media placeholder")
    first = turns[start]
    n_image_tags = sum(t.value.count(IMAGE_PLACEHOLDER) for t in turns)
    n_video_tags = sum(t.value.count(VIDEO_PLACEHOLDER) for t in turns)
    if video is not None:
        if n_image_tags:
            raise DataError(f"{where}: a video record must not contain '<image>' (found {n_image_tags})")
        if n_video_tags > 1 or (n_video_tags == 1 and VIDEO_PLACEHOLDER not in first.value):
            raise DataError(f"{where}: a video record takes one '<video>' in its first human turn")
        if n_video_tags == 0:
            first.value = VIDEO_PLACEHOLDER + "\n" + first.value
    else:
        if n_video_tags:
            raise DataError(f"{where}: '<video>' found but the record has no 'video' field")
        if len(images) == 1 and n_image_tags == 0:
            first.value = IMAGE_PLACEHOLDER + "\n" + first.value
            n_image_tags = 1
        if n_image_tags != len(images):
            raise DataError(
                f"{where}: {n_image_tags} '<image>' placeholder(s) for {len(images)} image(s); they must match"
            )
    return Record(
        conversations=turns,
        images=images,
        video=video,
        clip=clip,
        width=_positive_int(obj.get("width"), "width", where),
        height=_positive_int(obj.get("height"), "height", where),
        id=obj.get("id"),
        source=source,
        line=line,
    )


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a JSONL file with their 1-based line numbers."""
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, text in enumerate(fh, start=1):
                if text.strip():
                    yield lineno, text
    except FileNotFoundError as exc:
        raise DataError(f"{path}: annotation file not found") from exc


def decode_line(text: str, source: str, line: int) -> Record:
    """Decode and validate one JSONL line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}:{line}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    return parse_record(obj, source, line)


def load_records(path: str | os.PathLike[str]) -> list[Record]:
    """Parse and validate a whole JSONL annotation file (fails on the first bad line, naming it)."""
    return [decode_line(text, str(path), lineno) for lineno, text in iter_jsonl(path)]


def index_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(byte offset, line number) of every non-blank line, so huge files are parsed lazily per sample."""
    offsets = []
    try:
        with open(path, "rb") as fh:
            offset = 0
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    offsets.append((offset, lineno))
                offset += len(raw)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: annotation file not found") from exc
    return offsets
