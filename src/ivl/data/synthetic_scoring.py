"""Task metadata and answer scoring for the synthetic world.

Classification answers are compared after light normalisation (case, surrounding punctuation, a trailing
explanation); grounding answers are parsed from ``<box>[[x1, y1, x2, y2]]</box>`` and count when IoU ≥ 0.5.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ivl.data.synthetic_draw import COLOURS, SHAPES, WORDS
from ivl.data.synthetic_tasks import COUNTS, DIRECTIONS_2D, IMAGE_CHOICES, MOTIONS
from ivl.errors import DataError


@dataclass(frozen=True)
class TaskInfo:
    """What a task asks, how its answers are scored and what a blind guesser gets."""

    name: str
    kind: str  # image | multi_image | video | text
    choices: tuple[str, ...]  # closed answer vocabulary; empty for grounding (the answer is a box)
    chance: float  # 1/#classes (classes are balanced); grounding: nominal 0, see chance_level()
    vision: bool  # False for the text-only warm-up set, which evaluation should leave out of the mean
    max_dynamic_patch: int
    data_augment: bool  # JPEG augmentation in the train split (never in val/test)
    description: str


def _classes(name: str, kind: str, choices: tuple[str, ...], n_max: int, augment: bool, text: str) -> TaskInfo:
    return TaskInfo(name, kind, choices, 1.0 / len(choices), True, n_max, augment, text)


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        _classes("colour", "image", tuple(COLOURS), 4, False, "colour of the single shape"),
        _classes("shape", "image", SHAPES, 6, True, "shape of the single object"),
        _classes("count", "image", COUNTS, 6, True, "number (1-6) of identical shapes"),
        _classes("position", "image", DIRECTIONS_2D, 6, False, "where one shape is relative to another"),
        TaskInfo("grounding", "image", (), 0.0, True, 6, False, "box of the referred shape, IoU >= 0.5"),
        _classes("ocr", "image", WORDS, 6, True, "the rendered word"),
        _classes("multi_image", "multi_image", IMAGE_CHOICES, 4, False, "which of two images shows a colour"),
        _classes("video", "video", MOTIONS, 1, False, "which way the shape moves across the frames"),
        TaskInfo(
            "text", "text", (), 0.0, False, 1, False, "text-only vocabulary facts, train split only; chance per record"
        ),
    )
}

VISION_TASKS: tuple[str, ...] = tuple(name for name, info in TASKS.items() if info.vision)

_BOX = re.compile(
    r"\[\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def parse_box(text: str) -> list[float] | None:
    """The first ``[[x1, y1, x2, y2]]`` in ``text`` (0-1000 coordinates), or None when there is none."""
    match = _BOX.search(text)
    return [float(v) for v in match.groups()] if match else None


def box_iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; degenerate boxes give 0."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise_answer(text: str) -> str:
    """Lower case, without surrounding whitespace, quotes and final punctuation; number words become digits."""
    text = text.strip().strip("\"'`").strip().rstrip(".!?,;:").strip().lower()
    return _NUMBER_WORDS.get(text, text)


def score(task: str, prediction: str, record: Mapping[str, Any]) -> bool:
    """True when ``prediction`` answers ``record`` correctly (a record written by ``generate_world``)."""
    if task == "grounding":
        box = parse_box(prediction)
        if "box" not in record:
            raise DataError(f"grounding record {record.get('id')!r} has no 'box' ground truth")
        return box is not None and box_iou(box, record["box"]) >= 0.5
    answer = record.get("answer")
    if not isinstance(answer, str):
        raise DataError(f"{task} record {record.get('id')!r} has no string 'answer' ground truth")
    got, want = normalise_answer(prediction), normalise_answer(answer)
    if got == want:
        return True
    # accept the answer followed by an explanation ("left, because ..."), not a prefix of a longer word
    first = re.split(r"[\s,.;:!?]+", got, maxsplit=1)[0]
    return normalise_answer(first) == want


def chance_level(task: str, records: Iterable[Mapping[str, Any]] | None = None) -> float:
    """Accuracy of a blind guesser: 1/#classes, or for grounding the hit rate of one centre box.

    The centre box has the median width and height of the target boxes of ``records`` (needed for grounding).
    """
    if task not in TASKS:
        raise DataError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if task == "text" and records is not None:
        per_record = [1.0 / len(r["choices"]) for r in records]
        return sum(per_record) / len(per_record) if per_record else 0.0
    if task != "grounding":
        return TASKS[task].chance
    boxes = [r["box"] for r in records or ()]
    if not boxes:
        return 0.0
    w = statistics.median(b[2] - b[0] for b in boxes)
    h = statistics.median(b[3] - b[1] for b in boxes)
    centre = [500 - w / 2, 500 - h / 2, 500 + w / 2, 500 + h / 2]
    return sum(box_iou(centre, b) >= 0.5 for b in boxes) / len(boxes)
