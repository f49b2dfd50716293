"""Vocabulary shared by every filter: the parsed view of one record, a flag, and the rule registry.

Rules are small keyword-only dataclasses (their fields are their YAML parameters), so a config typo fails
loudly, and a built chain pickles cleanly into worker processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from ivl.errors import ConfigError, DataError

Action = Literal["reject", "review"]
Stage = Literal["rule", "llm"]
TextFields = Literal["answers", "prompts", "all"]

ROLES = ("system", "human", "gpt")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


@dataclass(frozen=True)
class Flag:
    """One rule's verdict on one record: which rule, why, its measured value, and what to do."""

    filter: str
    reason: str
    score: float | None = None
    action: Action = "reject"

    def to_dict(self) -> dict[str, Any]:
        return {"filter": self.filter, "score": self.score, "reason": self.reason, "action": self.action}


class RecordParseError(DataError):
    """A line is not a usable record; ``filter`` is ``parse`` (bytes/JSON) or ``schema`` (structure)."""

    def __init__(self, filter_name: str, message: str) -> None:
        super().__init__(message)
        self.filter = filter_name


@dataclass
class Sample:
    """A structurally valid record plus where it came from; rules read it, never modify it."""

    data: dict[str, Any]
    source: str = "<memory>"
    line: int = 0
    root: str = ""
    domain: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def turns(self) -> list[dict[str, str]]:
        return self.data["conversations"]

    def texts(self, which: TextFields = "answers") -> list[tuple[int, str]]:
        """(turn index, text) of the assistant answers, the human prompts, or every turn."""
        roles = {"answers": ("gpt",), "prompts": ("human",), "all": ROLES}[which]
        return [(i, t["value"]) for i, t in enumerate(self.turns) if t["from"] in roles]

    @property
    def images(self) -> list[str]:
        image = self.data.get("image")
        if image is None:
            return []
        return [image] if isinstance(image, str) else list(image)

    @property
    def video(self) -> str | None:
        return self.data.get("video")

    @property
    def kind(self) -> str:
        """``text``, ``image``, ``multi_image`` or ``video`` (the official four sample kinds)."""
        if self.video is not None:
            return "video"
        n = len(self.images)
        return "text" if n == 0 else "image" if n == 1 else "multi_image"

    def resolve(self, path: str) -> str:
        """Media path as the official loader builds it: absolute kept, otherwise joined to the dataset root."""
        if os.path.isabs(path) or "://" in path or not self.root:
            return path
        if "://" in self.root:
            return self.root.rstrip("/") + "/" + path
        return os.path.join(self.root, path)


def parse_line(
    raw: bytes, source: str = "<memory>", line: int = 0, root: str = "", domain: str | None = None
) -> Sample:
    """Decode one JSONL line into a :class:`Sample`, or raise :class:`RecordParseError` saying why not.

    Only the structure every rule relies on is checked here (object, conversations of ``{from, value}``
    strings, image/video types); content anomalies (role order, placeholders) are named rules instead.
    """
    where = f"{source}:{line}"
    if not raw.strip():
        raise RecordParseError("parse", f"{where}: blank line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordParseError("parse", f"{where}: invalid UTF-8 at byte {exc.start}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordParseError("parse", f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError as exc:
        raise RecordParseError("parse", f"{where}: JSON nested too deeply") from exc
    if not isinstance(obj, dict):
        raise RecordParseError("schema", f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordParseError("schema", f"{where}: 'conversations' must be a non-empty list")
    for i, msg in enumerate(convs):
        if not isinstance(msg, dict):
            raise RecordParseError("schema", f"{where}: conversations[{i}] must be an object")
        if msg.get("from") not in ROLES:
            raise RecordParseError(
                "schema", f"{where}: conversations[{i}].from must be human/gpt/system, got {msg.get('from')!r}"
            )
        if not isinstance(msg.get("value"), str):
            raise RecordParseError("schema", f"{where}: conversations[{i}].value must be a string")
    image = obj.get("image")
    if image is not None and not (
        (isinstance(image, str) and image) or (isinstance(image, list) and all(isinstance(p, str) and p for p in image))
    ):
        raise RecordParseError("schema", f"{where}: 'image' must be a non-empty path or a list of them, got {image!r}")
    video = obj.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise RecordParseError("schema", f"{where}: 'video' must be a non-empty path, got {video!r}")
    if video is not None and image is not None:
        raise RecordParseError("schema", f"{where}: a record holds either 'image' or 'video', not both")
    return Sample(obj, source=source, line=line, root=root, domain=domain)


@dataclass(kw_only=True)
class Rule:
    """Base of every named filter. Subclasses set ``name`` and implement :meth:`check`."""

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = "rule"
    enabled: bool = True
    action: Action = "reject"

    def check(self, sample: Sample) -> Flag | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def flag(self, reason: str, score: float | None = None) -> Flag:
        return Flag(self.name, reason, None if score is None else float(score), self.action)

    def validate(self) -> None:
        """Raise ConfigError for out-of-range parameters; subclasses extend it."""
        if self.action not in ("reject", "review"):
            raise ConfigError(f"rule {self.name}: action must be 'reject' or 'review', got {self.action!r}")


RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule available by its ``name`` in configs."""
    if not cls.name or cls.name in RULES:
        raise ConfigError(f"rule class {cls.__name__} needs a unique name, got {cls.name!r}")
    RULES[cls.name] = cls
    return cls


def known_rules() -> dict[str, type[Rule]]:
    """Every registered rule, importing the built-in rule modules first (they register on import)."""
    import ivl.filtering.heuristics
    import ivl.filtering.repetition
    import ivl.filtering.scoring  # noqa: F401

    return RULES


def build_rule(name: str, params: dict[str, Any] | None = None) -> Rule:
    """Instantiate a registered rule from its YAML parameters, naming unknown rules and parameters."""
    cls = known_rules().get(name)
    if cls is None:
        raise ConfigError(f"unknown filter rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    params = dict(params or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"rule {name}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    rule = cls(**params)
    rule.validate()
    return rule


def check_fields_param(rule: Rule, which: str) -> None:
    if which not in ("answers", "prompts", "all"):
        raise ConfigError(f"rule {rule.name}: fields must be answers, prompts or all, got {which!r}")


def check_positive(rule: Rule, **values: float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"rule {rule.name}: {key} must be a positive number, got {value!r}")
