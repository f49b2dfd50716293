"""Per-task evaluation settings, in one visible table, and the readers that turn benchmark files into items.

Every number that changes a score (prompt suffix, tiles per image, image upscaling, circular evaluation,
token budget) lives in ``TASKS`` and is printed next to the results, so a score can be reproduced from its
report alone. Sources: VLMEvalKit's InternVL wrapper (prompts, ``set_max_num``: 12 tiles for ChartQA and
MMMU, 18 for DocVQA, 24 for InfoVQA/OCRBench, 6 otherwise; MMMU upscales the first image 2× bilinear) and
the InternVL repository's own scripts (POPE, RefCOCO); spec internvl-2.5.md §7 and §10 item 20.

Benchmark files:

* **TSV, VLMEvalKit layout**: ``index``, ``image`` (base64; a short all-digit value refers to the row with
  that index) or ``image_path``, ``question``, optional ``hint``, options ``A``–``Z``, ``answer`` (a list
  literal such as ``['a', 'b']`` for VQA), ``category``. Rows with ``index`` ≥ 1e6 are MMBench's circular
  copies (group = index mod 1e6).
* **JSONL, official layouts**: one object per line. Recognised keys (first present wins): id ``id`` /
  ``question_id`` / ``index``; image ``image`` / ``images`` / ``image_path`` (path relative to the file,
  list for several images, or base64); question ``question`` / ``text`` / ``sent`` / the first human turn of
  ``conversations``; answers ``answers`` / ``answer`` / ``label`` / the first gpt turn; options ``choices``
  or ``options`` (list → letters A, B, …; or a letter → text mapping); ``category`` / ``type``; grounding
  ``bbox`` (pixels, as in RefCOCO) or ``box`` (0–1000, the InternVL convention) with ``width``/``height``.
* **A synthetic world** (``ivl synth``): its directory, or one of its ``{split}/{task}.jsonl`` files.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import csv
import dataclasses
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivl.errors import DataError
from ivl.evaluation.answers import AnswerKind
from ivl.evaluation.metrics import get_metric, rotate_choices

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
GROUNDING_TEMPLATE = (
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>{question}</ref>"
)
COT_MC = (
    "Answer the preceding multiple choice question. Think step by step, then write the final answer on the "
    "last line in the form 'Answer: X', where X is the option's letter."
)
COT_OPEN = (
    "Answer the preceding question. Think step by step, then write the final answer on the last line in the "
    "form 'Answer: X', where X is a single word, phrase or number."
)


@dataclass(frozen=True)
class TaskSettings:
    """Everything about a benchmark that changes its score, besides the model."""

    name: str
    metric: str
    prompt_suffix: str = SHORT_SUFFIX  # appended on a new line to the question (direct answering)
    prompt_template: str = "{question}"  # wraps the question before options and suffix are added
    max_tiles: int = 6  # dynamic tiles per image (a thumbnail is added when > 1)
    upscale: float = 1.0  # factor applied (bilinear) to the first image before tiling
    circular: bool = False  # MMBench CircularEval: every rotation of the options must be right
    answer_kind: AnswerKind = "phrase"  # how answers are read for chain-of-thought and voting
    max_new_tokens: int = 32  # direct answering; chain of thought uses ``COT_MAX_NEW_TOKENS``
    source: str = ""

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COT_MAX_NEW_TOKENS = 1024
_VLMEVALKIT = "VLMEvalKit InternVLChat (build_prompt, set_max_num)"

#: The settings table. Keys are what ``--task NAME`` accepts.
TASKS: dict[str, TaskSettings] = {
    s.name: s
    for s in (
        TaskSettings("mmbench", "multiple_choice_circular", MC_SUFFIX, circular=True, answer_kind="letter",
                     source=_VLMEVALKIT + "; CircularEval as in MMBench"),
        TaskSettings("mmmu", "multiple_choice", MC_SUFFIX, max_tiles=12, upscale=2.0, answer_kind="letter",
                     source=_VLMEVALKIT + "; first image upscaled 2x as in spec §7"),
        TaskSettings("ai2d", "multiple_choice", MC_SUFFIX, answer_kind="letter", source=_VLMEVALKIT),
        TaskSettings("multiple_choice", "multiple_choice", MC_SUFFIX, answer_kind="letter",
                     source=_VLMEVALKIT + " (generic MCQ)"),
        TaskSettings("textvqa", "vqa_accuracy", source=_VLMEVALKIT),
        TaskSettings("vqa", "vqa_accuracy", source=_VLMEVALKIT + " (generic VQA)"),
        TaskSettings("docvqa", "anls", max_tiles=18, max_new_tokens=64, source=_VLMEVALKIT),
        TaskSettings("infovqa", "anls", max_tiles=24, max_new_tokens=64, source=_VLMEVALKIT),
        TaskSettings("chartqa", "relaxed_accuracy", max_tiles=12, max_new_tokens=64, answer_kind="number",
                     source=_VLMEVALKIT),
        TaskSettings("pope", "pope", answer_kind="yesno", source="InternVL eval/pope (short-answer prompt)"),
        TaskSettings("refcoco", "grounding", "", GROUNDING_TEMPLATE, answer_kind="box", max_new_tokens=64,
                     source="InternVL eval/refcoco (prompt, Acc@IoU>=0.5)"),
        TaskSettings("exact_match", "exact_match", source="generic short-answer task"),
        TaskSettings("synthetic", "synthetic", "", source="ivl synth world: prompts carry their own suffix; "
                     "tiles from the world's per-task max_dynamic_patch"),
    )
}  # fmt: skip

#: Filename fragments that select a settings row when ``--task`` is a file (checked in this order).
_NAME_HINTS = (
    ("mmbench", "mmbench"), ("mmmu", "mmmu"), ("ai2d", "ai2d"), ("textvqa", "textvqa"), ("docvqa", "docvqa"),
    ("infovqa", "infovqa"), ("infographic", "infovqa"), ("chartqa", "chartqa"), ("pope", "pope"),
    ("refcoco", "refcoco"),
)  # fmt: skip


def get_task(name: str) -> TaskSettings:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def task_for_file(path: str | Path) -> str | None:
    """Settings row suggested by a benchmark file name (``MMBench_DEV_EN.tsv`` → mmbench), or None."""
    stem = Path(path).name.lower()
    return next((task for hint, task in _NAME_HINTS if hint in stem), None)


# --------------------------------------------------------------------------------------------------------
# items


@dataclass
class EvalItem:
    """One question to ask, with its reference. Images are file paths or base64 payloads (decoded lazily)."""

    id: str
    task: str  # reporting group (a settings name, or a synthetic task name)
    settings: TaskSettings
    question: str
    answers: list[str]
    images: list[str] = field(default_factory=list)
    video: str | None = None
    choices: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str = ""
    box: list[float] | None = None  # pixels, x1 y1 x2 y2
    image_size: tuple[int, int] | None = None  # (width, height) of the image the box refers to
    group: str = ""  # circular group: the id of the unrotated question
    rotation: int = 0
    max_tiles: int | None = None  # per-item override (synthetic world)
    raw: dict[str, Any] = field(default_factory=dict)  # the original record, for scorers that need it

    def reference(self) -> dict[str, Any]:
        """What a metric sees: the ground truth, never the model's input."""
        return {
            "id": self.id,
            "task": self.task,
            "answers": self.answers,
            "choices": self.choices,
            "box": self.box,
            "image_size": list(self.image_size) if self.image_size else None,
            "group": self.group or self.id,
            "rotation": self.rotation,
            "category": self.category,
            "record": self.raw,
        }


def expand_circular(items: list[EvalItem]) -> list[EvalItem]:
    """Add the rotated copies of every multiple-choice item whose settings ask for circular evaluation.

    Files that already hold MMBench's circular copies (their items carry a group) are left as they are.
    """
    if any(it.group and it.group != it.id for it in items):
        return items
    out: list[EvalItem] = []
    for item in items:
        if not (item.settings.circular and len(item.choices) > 1):
            out.append(item)
            continue
        for shift in range(len(item.choices)):
            choices, answer = rotate_choices(item.choices, item.answers[0], shift)
            rid = item.id if shift == 0 else f"{item.id}@r{shift}"
            out.append(
                dataclasses.replace(item, id=rid, choices=choices, answers=[answer], group=item.id, rotation=shift)
            )
    return out


# --------------------------------------------------------------------------------------------------------
# readers


def _letters(options: Any, where: str) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, dict):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        if len(options) > 26:
            raise DataError(f"{where}: {len(options)} options; at most 26 (A-Z) are supported")
        return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}
    raise DataError(f"{where}: options must be a list or a letter->text mapping, got {type(options).__name__}")


def _answer_letter(answer: str, choices: dict[str, str], where: str) -> str:
    """The reference option letter, also when a file gives the option's text or its 0-based index."""
    if not choices:
        raise DataError(f"{where}: a multiple-choice item needs options ('choices', 'options' or columns A-Z)")
    text = answer.strip()
    if text.upper() in choices:
        return text.upper()
    by_text = [k for k, v in choices.items() if v.strip().lower() == text.lower()]
    if len(by_text) == 1:
        return by_text[0]
    if text.isdigit() and int(text) < len(choices):
        return list(choices)[int(text)]
    raise DataError(f"{where}: answer {answer!r} is neither an option letter nor an option of {list(choices)}")


def _answers(value: Any, where: str) -> list[str]:
    if value is None:
        raise DataError(f"{where}: no answer (expected 'answers', 'answer' or 'label')")
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        with contextlib.suppress(ValueError, SyntaxError):  # a text that merely looks like a list stays text
            value = ast.literal_eval(value.strip())
    if isinstance(value, (list, tuple)):
        flat = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in value]
        if flat and all(isinstance(v, (str, int, float)) for v in flat):
            return [str(v) for v in flat]
        return [json.dumps(value)]
    return [str(value)]


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def _looks_base64(value: str) -> bool:
    """A long string of base64 characters that is not a file name (JSONL records may embed images)."""
    return len(value) > 256 and "." not in value[-8:] and set(value[:512]) <= _B64_CHARS


def _image_ref(value: str, base: Path) -> str:
    if value.startswith("data:") or _looks_base64(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _first(record: dict[str, Any], *keys: str) -> Any:
    return next((record[k] for k in keys if k in record and record[k] is not None), None)


def _conversation_text(record: dict[str, Any], role: str) -> str | None:
    for turn in record.get("conversations") or ():
        if isinstance(turn, dict) and turn.get("from") == role:
            return str(turn.get("value", ""))
    return None


def item_from_record(record: dict[str, Any], settings: TaskSettings, base: Path, where: str, index: int) -> EvalItem:
    """One JSONL object (official layouts, see the module docstring) → an item of ``settings``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    rid = _first(record, "id", "question_id", "index")
    rid = str(rid) if rid is not None else str(index)
    question = _first(record, "question", "text", "sent", "prompt")
    if question is None:
        question = _conversation_text(record, "human")
    if question is None:
        raise DataError(f"{where}: no question (expected 'question', 'text', 'sent' or conversations)")
    answer = _first(record, "answers", "answer", "label")
    if answer is None:
        answer = _conversation_text(record, "gpt")
    if answer is None and settings.metric == "grounding":
        answer = ""
    images = _first(record, "images", "image", "image_path") or []
    images = [images] if isinstance(images, str) else list(images)
    width, height = record.get("width"), record.get("height")
    image_size = (int(width), int(height)) if width and height else None
    refs = [_image_ref(str(v), base) for v in images]
    if image_size is None and refs and (record.get("box") is not None or settings.metric == "grounding"):
        image_size = image_dimensions(refs[0])
    box = None
    if record.get("bbox") is not None:
        box = [float(v) for v in record["bbox"]]
    elif record.get("box") is not None:
        if image_size is None:
            raise DataError(f"{where}: a 0-1000 'box' needs 'width' and 'height' to be scored")
        w, h = image_size
        box = [float(v) / 1000.0 * s for v, s in zip(record["box"], (w, h, w, h), strict=True)]
    if settings.metric == "grounding" and box is None:
        raise DataError(f"{where}: grounding item has no 'bbox' or 'box'")
    answers = _answers(answer, where)
    choices = _letters(_first(record, "choices", "options"), where) if settings.answer_kind == "letter" else {}
    if settings.answer_kind == "letter":
        answers = [_answer_letter(answers[0], choices, where)]
    return EvalItem(
        id=rid,
        task=settings.name,
        settings=settings,
        question=str(question),
        answers=answers,
        images=refs,
        video=_image_ref(str(record["video"]), base) if record.get("video") else None,
        choices=choices,
        hint=record.get("hint") or None,
        category=str(_first(record, "category", "type", "l2-category") or ""),
        box=box,
        image_size=image_size,
        raw=record,
    )


def _synthetic_item(record: dict[str, Any], base: Path, where: str, index: int) -> EvalItem:
    from ivl.data.synthetic import TASKS as SYNTH_TASKS

    task = str(record["task"])
    info = SYNTH_TASKS[task]
    item = item_from_record(record, TASKS["synthetic"], base, where, index)
    item.task = task
    item.category = task
    item.max_tiles = info.max_dynamic_patch
    item.choices = {}
    return item


def _is_synthetic(record: dict[str, Any]) -> bool:
    from ivl.data.synthetic import TASKS as SYNTH_TASKS

    return isinstance(record, dict) and "conversations" in record and record.get("task") in SYNTH_TASKS


def read_jsonl(path: Path, settings: TaskSettings | None) -> list[EvalItem]:
    """Items of a JSONL benchmark (images relative to the file's folder; synthetic records: to ``{task}/``)."""
    items: list[EvalItem] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg}") from exc
            if settings is None or settings.name == "synthetic":
                if not _is_synthetic(record):
                    raise DataError(f"{where}: cannot tell the task; pass --task NAME=FILE (known: {', '.join(TASKS)})")
                items.append(_synthetic_item(record, path.parent / str(record["task"]), where, len(items)))
            else:
                items.append(item_from_record(record, settings, path.parent, where, len(items)))
    return items


def read_tsv(path: Path, settings: TaskSettings | None) -> list[EvalItem]:
    """Items of a VLMEvalKit TSV (see the module docstring)."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        raise DataError(f"{path}: empty TSV")
    columns = set(rows[0])
    missing = {"question", "answer"} - columns
    if missing or not ({"image", "image_path"} & columns):
        raise DataError(
            f"{path}: TSV needs columns index, image (or image_path), question, answer; missing {sorted(missing) or ['image']}"
        )
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in columns]
    if settings is None:
        settings = TASKS["multiple_choice" if letters else "vqa"]
    by_index = {row.get("index", str(i)): row.get("image", "") for i, row in enumerate(rows)}
    items = []
    for lineno, row in enumerate(rows, start=2):
        where = f"{path}:{lineno}"
        index = row.get("index") or str(lineno - 2)
        image = row.get("image") or ""
        if image and len(image) <= 64 and image.isdigit():  # VLMEvalKit: reuse another row's image
            image = by_index.get(image, "")
        refs = [f"data:image;base64,{image}"] if image else []  # VLMEvalKit's image column is always base64
        if not refs and row.get("image_path"):
            refs = [_image_ref(p, path.parent) for p in _answers(row["image_path"], where)]
        options = {k: row[k] for k in letters if row.get(k) not in (None, "", "nan")}
        record = {
            "id": index,
            "question": row["question"],
            "answer": row["answer"],
            "hint": row.get("hint") if row.get("hint") not in (None, "", "nan") else None,
            "category": row.get("category") or "",
            "choices": options or None,
        }
        item = item_from_record(record, settings, path.parent, where, lineno - 2)
        item.images = refs
        item.raw = {k: v for k, v in row.items() if k != "image"}
        if index.isdigit() and int(index) >= 1_000_000:
            item.group, item.rotation = str(int(index) % 1_000_000), int(index) // 1_000_000
        elif settings.circular:
            item.group = index
        items.append(item)
    return items


def load_benchmark(spec: str, split: str = "test") -> list[EvalItem]:
    """Items of a benchmark given as ``NAME=FILE``, ``FILE`` (settings from its name) or a synthetic world dir.

    Circular multiple choice is expanded into its rotations here, so every returned item is one prompt.
    """
    name, _, file = spec.partition("=") if "=" in spec else ("", "", spec)
    path = Path(file).expanduser()
    settings = get_task(name) if name else None
    if path.is_dir():
        if not (path / "world.json").is_file():
            raise DataError(f"{path}: a benchmark directory must be a synthetic world (no world.json)")
        files = sorted((path / split).glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: the synthetic world has no {split!r} split")
        return [it for f in files for it in read_jsonl(f, TASKS["synthetic"])]
    if not path.is_file():
        hint = f" (a task name needs a file: --task {spec}=FILE)" if spec.lower() in TASKS else ""
        raise DataError(f"{path}: no such benchmark file{hint}")
    if settings is None:
        guessed = task_for_file(path)
        settings = TASKS[guessed] if guessed else None
    if path.suffix.lower() == ".tsv":
        items = read_tsv(path, settings)
    elif path.suffix.lower() in (".jsonl", ".json"):
        items = read_jsonl(path, settings)
    else:
        raise DataError(f"{path}: unknown benchmark format {path.suffix!r} (expected .tsv or .jsonl)")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: duplicate item id {item.id!r}")
        seen.add(item.id)
        get_metric(item.settings.metric)
    return expand_circular(items)


# --------------------------------------------------------------------------------------------------------
# prompts and images


def build_prompt(item: EvalItem, chain_of_thought: bool = False) -> str:
    """The user turn for an item: image placeholders, hint, question, lettered options, instruction.

    Direct answering appends the task's suffix; chain of thought replaces it with a step-by-step
    instruction whose last line is ``Answer: X``. One image is prefixed ``<image>\\n``; several images are
    labelled ``Image-k: <image>``; a video gets ``<video>\\n`` (unless the question already places them).
    """
    settings = item.settings
    text = settings.prompt_template.format(question=item.question)
    if item.hint:
        text = f"{item.hint}\n{text}"
    for letter, option in item.choices.items():
        text += f"\n{letter}. {option}"
    if chain_of_thought:
        text += "\n" + (COT_MC if item.choices else COT_OPEN)
    elif settings.prompt_suffix:
        text += "\n" + settings.prompt_suffix
    if "<image>" not in text and item.images:
        if len(item.images) == 1:
            text = "<image>\n" + text
        else:
            text = "".join(f"Image-{k + 1}: <image>\n" for k in range(len(item.images))) + text
    if item.video and "<video>" not in text:
        text = "<video>\n" + text
    return text


def _source(ref: str) -> Any:
    """What to hand an image decoder: bytes for a bare base64 payload, else the path or data URL itself."""
    if not ref.startswith("data:") and _looks_base64(ref):
        from ivl.errors import ImageError

        try:
            return base64.b64decode(ref, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"cannot decode base64 image {ref[:60]!r}…: {exc}") from exc
    return ref


def open_image(ref: str) -> Any:
    """A decoded RGB image from a path, a ``data:`` URL or a bare base64 payload (VLMEvalKit TSVs)."""
    from ivl.processing.images import load_image

    source = _source(ref)
    return load_image(
        source, name=None if isinstance(source, str) and len(source) < 200 else f"image of {len(ref)} chars"
    )


def image_dimensions(ref: str) -> tuple[int, int]:
    """(width, height) of an image, read from its header without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    from ivl.errors import ImageError

    source = _source(ref)
    if isinstance(source, str) and source.startswith("data:"):
        return open_image(ref).size
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"cannot open image {ref[:120]!r}: {exc}") from exc


def item_images(item: EvalItem) -> list[Any]:
    """The item's images, opened, with the task's upscaling applied to the first one (MMMU: 2× bilinear)."""
    from PIL import Image

    images = [open_image(ref) for ref in item.images]
    factor = item.settings.upscale
    if images and factor != 1.0:
        first = images[0]
        size = (round(first.width * factor), round(first.height * factor))
        images[0] = first.resize(size, Image.Resampling.BILINEAR)
    return images
