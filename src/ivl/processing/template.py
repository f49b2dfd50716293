"""Conversation templates as data (one source of truth) and OpenAI-style messages rendered to them.

A template is the MPT-style format of the official ``conversation.py``: a system block, then per message
``role header + text + separator``, and a bare assistant header where generation starts (spec §5.1, §5.3;
Mono-InternVL §11). Prompts keep ``<image>`` / ``<video>`` placeholders here; the processor expands them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ivl.config import DEFAULT_SYSTEM_MESSAGE
from ivl.errors import TemplateError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
#: Label put before each image when a multi-image prompt has no placeholders (official README form).
IMAGE_LABEL = "Image-{k}: "
#: Label put before each video frame. The sources disagree (spec §10.1): we use the hyphenated form of the
#: official training data and main README; pass ``"Frame{k}: "`` to match MVBench / transformers' processor.
FRAME_LABEL = "Frame-{k}: "

#: System prompt of InternVL 1.5/2 and Mono-InternVL (``internlm2-chat`` and ``Hermes-2`` templates).
LEGACY_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

Role = Literal["system", "user", "assistant"]
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format. ``sep`` follows every finished message; its first token is the stop token."""

    name: str
    system_template: str
    system_message: str
    user_header: str
    assistant_header: str
    sep: str
    stop_words: tuple[str, ...]

    def system_block(self, system_message: str | None = None) -> str:
        """The system turn, always present (an empty system message still gives an empty block)."""
        message = self.system_message if system_message is None else system_message
        return self.system_template.format(system_message=message) + self.sep

    def header(self, role: Role) -> str:
        if role == "user":
            return self.user_header
        if role == "assistant":
            return self.assistant_header
        raise TemplateError(f"template {self.name!r} has no role {role!r} (use 'user' or 'assistant')")

    def message(self, role: Role, text: str | None, *, empty_as_header: bool = True) -> str:
        """One finished message; like the official code, empty text gives a bare header unless told otherwise."""
        if not text and empty_as_header:
            return self.header(role)
        return self.header(role) + (text or "") + self.sep

    def render(
        self,
        turns: Sequence[tuple[Role, str | None]],
        *,
        system_message: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The whole prompt string for ``turns`` (role, text), ending with the assistant header if asked."""
        parts = [self.system_block(system_message)]
        parts += [self.message(role, text) for role, text in turns]
        if add_generation_prompt:
            parts.append(self.assistant_header)
        return "".join(parts)


def _chatml(name: str, sep: str, system_message: str, stop_words: tuple[str, ...]) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system_template="<|im_start|>system\n{system_message}",
        system_message=system_message,
        user_header="<|im_start|>user\n",
        assistant_header="<|im_start|>assistant\n",
        sep=sep,
        stop_words=stop_words,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    # InternVL-2.5: a newline after every <|im_end|>.
    "internvl2_5": _chatml("internvl2_5", "<|im_end|>\n", DEFAULT_SYSTEM_MESSAGE, ("<|im_end|>", "<|endoftext|>")),
    # Mono-InternVL / InternVL2 InternLM2 models: no newline between turns; BOS comes from the tokenizer.
    "internlm2-chat": _chatml(
        "internlm2-chat", "<|im_end|>", LEGACY_SYSTEM_MESSAGE, ("<|im_end|>", "</s>", "<|im_start|>")
    ),
    "Hermes-2": _chatml("Hermes-2", "<|im_end|>", LEGACY_SYSTEM_MESSAGE, ("<|im_end|>", "<|endoftext|>")),
}


def get_template(name: str) -> ChatTemplate:
    """Look a template up by its official name (``internvl2_5``, ``internlm2-chat``, ``Hermes-2``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


# ---------------------------------------------------------------------------------------------------------
# messages -> turns


@dataclass
class MediaSlot:
    """One ``<image>`` / ``<video>`` placeholder and, if the message carried it, its payload and options."""

    kind: Literal["image", "video"]
    source: Any = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conversation:
    """A chat reduced to plain data: optional system text, (role, text) turns, media slots in prompt order."""

    turns: list[tuple[Role, str]]
    system: str | None = None
    slots: list[MediaSlot] = field(default_factory=list)

    def placeholder_count(self) -> int:
        return len(self.slots)


_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_OPTION_KEYS = ("max_num", "min_num", "max_dynamic_patch", "min_dynamic_patch", "num_segments", "bound")


def _role(message: Mapping[str, Any], index: int) -> Role:
    raw = message.get("role", message.get("from"))
    role = _ROLE_ALIASES.get(str(raw))
    if role is None:
        raise TemplateError(f"message {index} has unknown role {raw!r} (expected system, user or assistant)")
    return role  # type: ignore[return-value]


def _payload(part: Mapping[str, Any], kind: str) -> Any:
    """The media payload of an OpenAI / transformers style content part, or None if it only marks a slot."""
    for key in (kind, "url", "path", "data"):
        if part.get(key) is not None:
            return part[key]
    nested = part.get(f"{kind}_url")
    if nested is not None:
        return nested.get("url") if isinstance(nested, Mapping) else nested
    return None


def _slot_options(part: Mapping[str, Any]) -> dict[str, Any]:
    options = {k: part[k] for k in _OPTION_KEYS if part.get(k) is not None}
    if "max_dynamic_patch" in options:
        options.setdefault("max_num", options.pop("max_dynamic_patch"))
    if "min_dynamic_patch" in options:
        options.setdefault("min_num", options.pop("min_dynamic_patch"))
    return options


def parse_messages(messages: Iterable[Mapping[str, Any]], *, image_label: str = IMAGE_LABEL) -> Conversation:
    """Reduce OpenAI-style chat messages to a `Conversation`.

    ``content`` is a string (``<image>``/``<video>`` placeholders in user turns refer to the images/videos
    passed separately, in order) or a list of parts ``{"type": "text"|"image"|"image_url"|"video"|"video_url"}``.
    Each image part becomes ``<image>\\n`` at its position; when the conversation has several image parts each
    is labelled ``Image-k: `` (the official multi-image prompt). Video parts become ``<video>\\n``.
    """
    messages = list(messages)
    total_image_parts = sum(
        1
        for m in messages
        if isinstance(m, Mapping) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, Mapping) and p.get("type") in ("image", "image_url")
    )
    label_images = total_image_parts > 1
    conversation = Conversation(turns=[])
    image_number = 0
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(
                f"message {index} must be a mapping with 'role' and 'content', got {type(message).__name__}"
            )
        role = _role(message, index)
        content = message.get("content", message.get("value"))
        if content is None:
            content = ""
        if role == "system":
            if index != 0:
                raise TemplateError(f"message {index}: a system message is only allowed first")
            conversation.system = _text_only(content, index)
            continue
        if isinstance(content, str):
            if role == "user":
                conversation.slots += [MediaSlot(_kind(m)) for m in _PLACEHOLDER_RE.findall(content)]
            conversation.turns.append((role, content))
            continue
        if not isinstance(content, list):
            raise TemplateError(
                f"message {index}: content must be a string or a list of parts, got {type(content).__name__}"
            )
        pieces: list[str] = []
        for part_index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                text = str(part.get("text", ""))
                if role == "user":
                    conversation.slots += [MediaSlot(_kind(m)) for m in _PLACEHOLDER_RE.findall(text)]
                pieces.append(text)
            elif kind in ("image", "image_url", "video", "video_url"):
                if role != "user":
                    raise TemplateError(f"message {index} part {part_index}: media is only allowed in user messages")
                base = "image" if kind.startswith("image") else "video"
                conversation.slots.append(MediaSlot(base, _payload(part, base), _slot_options(part)))  # type: ignore[arg-type]
                if base == "image":
                    image_number += 1
                    label = image_label.format(k=image_number) if label_images else ""
                    pieces.append(f"{label}{IMAGE_PLACEHOLDER}\n")
                else:
                    pieces.append(f"{VIDEO_PLACEHOLDER}\n")
            else:
                raise TemplateError(f"message {index} part {part_index}: unknown content type {kind!r}")
        conversation.turns.append((role, "".join(pieces)))
    return conversation


def _kind(placeholder: str) -> Literal["image", "video"]:
    return "image" if placeholder == IMAGE_PLACEHOLDER else "video"


def _text_only(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise TemplateError(f"message {index}: a system message may only contain text")


def media_prefix(num_images: int, num_videos: int, *, image_label: str = IMAGE_LABEL) -> str:
    """Placeholders to prepend to a prompt that has none: ``<image>\\n`` for one image, labelled lines for
    several (``Image-1: <image>\\nImage-2: <image>\\n``), then ``<video>\\n`` per video."""
    if num_images == 1:
        prefix = f"{IMAGE_PLACEHOLDER}\n"
    else:
        prefix = "".join(f"{image_label.format(k=k)}{IMAGE_PLACEHOLDER}\n" for k in range(1, num_images + 1))
    return prefix + f"{VIDEO_PLACEHOLDER}\n" * num_videos


def frame_lines(num_frames: int, *, frame_label: str = FRAME_LABEL) -> str:
    """``Frame-1: <image>\\nFrame-2: <image>\\n...``: one line per sampled frame, each ending in a newline."""
    return "".join(f"{frame_label.format(k=k)}{IMAGE_PLACEHOLDER}\n" for k in range(1, num_frames + 1))


def expand_videos(text: str, frames_per_video: Sequence[int], *, frame_label: str = FRAME_LABEL) -> str:
    """Replace the i-th ``<video>`` by its frame lines (a following newline is absorbed, as in training)."""
    pieces = re.split(f"({re.escape(VIDEO_PLACEHOLDER)}\n?)", text)
    found = (len(pieces) - 1) // 2
    if found != len(frames_per_video):
        raise TemplateError(f"prompt has {found} {VIDEO_PLACEHOLDER} placeholders but {len(frames_per_video)} videos")
    out, video = [], 0
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            out.append(piece)
            continue
        lines = frame_lines(frames_per_video[video], frame_label=frame_label)
        out.append(lines if piece.endswith("\n") else lines[:-1])
        video += 1
    return "".join(out)
