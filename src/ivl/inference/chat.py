"""The Python chat API, shaped like the official model card's ``model.chat`` / ``model.batch_chat``.

Differences from the remote code, on purpose: no ``trust_remote_code``; images/videos are passed as files,
PIL images or arrays (the processor tiles them) instead of pre-built ``pixel_values``; ``generation`` may be
a `GenerationConfig` or the official dict. As in the official code, ``history`` is a list of
``(question, answer)`` pairs whose questions keep their ``<image>`` placeholders, and the images passed to a
call fill every placeholder of the whole conversation, in order (pass them again on later turns).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ivl.errors import GenerationError, IvlError
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest

History = list[tuple[str, str]]

_ENGINES: weakref.WeakKeyDictionary[Any, tuple[Any, Engine]] = weakref.WeakKeyDictionary()


def engine_for(model: Any, processor: Any) -> Engine:
    """One Engine per (model, processor) pair, reused across calls."""
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] is processor:
        return cached[1]
    engine = Engine(model, processor)
    _ENGINES[model] = (processor, engine)
    return engine


def encode_messages(processor: Any, messages: Any, *, images: Any = None, videos: Any = None, **kwargs: Any) -> Any:
    """Messages (+ separately passed media) → processor inputs for one sample."""
    return processor(messages, images=images, videos=videos, **kwargs)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def build_messages(question: str, history: History | None, *, system_message: str | None = None) -> list[dict]:
    """Official turn order: system, replayed (question, answer) pairs, then the new question."""
    messages: list[dict[str, Any]] = []
    if system_message is not None:
        messages.append({"role": "system", "content": system_message})
    for old_q, old_a in history or []:
        messages.append({"role": "user", "content": old_q})
        messages.append({"role": "assistant", "content": old_a})
    messages.append({"role": "user", "content": question})
    return messages


def with_media_prefix(question: str, num_images: int, has_video: bool, history: History | None) -> str:
    """Official rule (spec §5.2, §10.11): prefix placeholders only on a first turn that has none."""
    from ivl.processing.template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, media_prefix

    if history is not None or IMAGE_PLACEHOLDER in question or VIDEO_PLACEHOLDER in question:
        return question
    if not num_images and not has_video:
        return question
    return media_prefix(num_images, int(has_video)) + question


def _request(
    processor: Any,
    question: str,
    images: Any = None,
    video: Any = None,
    history: History | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    max_num: int | None = None,
    num_segments: int | None = None,
    system_message: str | None = None,
) -> tuple[str, GenerationRequest]:
    """One question (with its media, history and settings) → (question as stored in history, engine request)."""
    if not isinstance(question, str):
        raise GenerationError(f"question must be a string, got {type(question).__name__}")
    images = _as_list(images)
    question = with_media_prefix(question, len(images), video is not None, history)
    messages = build_messages(question, history, system_message=system_message)
    kwargs: dict[str, Any] = {}
    if max_num is not None:
        kwargs["max_num"] = max_num
    if num_segments is not None:
        kwargs["num_segments"] = num_segments
    inputs = encode_messages(
        processor, messages, images=images or None, videos=[video] if video is not None else None, **kwargs
    )
    return question, GenerationRequest.from_inputs(inputs, GenerationConfig.from_any(generation))


def chat(
    model: Any,
    processor: Any,
    question: str,
    images: Any = None,
    video: Any = None,
    history: History | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    return_history: bool = False,
    *,
    max_num: int | None = None,
    num_segments: int | None = None,
    system_message: str | None = None,
) -> str | tuple[str, History]:
    """Answer ``question`` about ``images`` (a file, PIL image, array, or a list of them) and/or ``video``.

    Text only when neither is given; multi-turn with ``history``. Returns the answer, or
    ``(answer, history + [(question, answer)])`` with ``return_history=True`` (question with placeholders).
    """
    question, request = _request(
        processor, question, images, video, history, generation,
        max_num=max_num, num_segments=num_segments, system_message=system_message,
    )  # fmt: skip
    result = engine_for(model, processor).generate([request])[0]
    answer = result.text.strip()
    if return_history:
        return answer, [*(history or []), (question, answer)]
    return answer


def stream_chat(
    model: Any,
    processor: Any,
    question: str,
    images: Any = None,
    video: Any = None,
    history: History | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    max_num: int | None = None,
    num_segments: int | None = None,
    system_message: str | None = None,
) -> Iterator[str]:
    """Like :func:`chat`, but yields text deltas as they are generated (never half a character).

    The full answer is ``"".join(deltas).strip()``; the history entry's question is ``chat``'s (same prefix rule).
    """
    _, request = _request(
        processor, question, images, video, history, generation,
        max_num=max_num, num_segments=num_segments, system_message=system_message,
    )  # fmt: skip
    yield from engine_for(model, processor).stream(request)


def batch_chat(
    model: Any,
    processor: Any,
    questions: Sequence[str],
    images: Sequence[Any] | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    max_num: int | None = None,
    system_message: str | None = None,
) -> list[str]:
    """Answer many independent questions at once (batched decoding); ``images[i]`` belongs to ``questions[i]``
    (None, one image, or a list of images)."""
    questions = list(questions)
    per_question = [None] * len(questions) if images is None else list(images)
    if len(per_question) != len(questions):
        raise GenerationError(f"batch_chat got {len(questions)} questions but {len(per_question)} image entries")
    gen = GenerationConfig.from_any(generation)
    requests = [
        _request(processor, q, imgs, generation=gen, max_num=max_num, system_message=system_message)[1]
        for q, imgs in zip(questions, per_question, strict=True)
    ]
    results = engine_for(model, processor).generate(requests)
    return [r.text.strip() for r in results]


def load_for_inference(
    model_dir: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[Any, Any]:
    """Model + processor from a checkpoint directory (weights, config.json and tokenizer files), offline."""
    from ivl.models.internvl import InternVL
    from ivl.processing.processor import CONFIG_NAME, Processor
    from ivl.processing.tokenizer import load_tokenizer

    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    model = InternVL.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    path = Path(model_dir)
    if (path / CONFIG_NAME).exists():
        processor = Processor.from_pretrained(path)
    else:
        processor = Processor.from_config(load_tokenizer(path), model.config)
    return model, processor


class ChatSession:
    """A multi-turn conversation for the command line: images can be added between turns (``/image``)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        generation: GenerationConfig | Mapping[str, Any] | None = None,
        *,
        max_num: int | None = None,
        system_message: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.generation = GenerationConfig.from_any(generation)
        self.max_num = max_num
        self.system_message = system_message
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and its video."""
        self.history: History = []
        self.images: list[Any] = []
        self.video: Any = None
        self._new_images = 0
        self._new_video = False

    def add_image(self, source: Any) -> Any:
        """Load an image now (errors surface at once); the next question refers to it."""
        from ivl.processing.images import load_image

        image = load_image(source)
        self.images.append(image)
        self._new_images += 1
        return image

    def set_video(self, source: Any) -> None:
        if self.video is not None:
            raise GenerationError("this session already has a video; /reset first")
        self.video = source
        self._new_video = True

    def _prefix(self) -> str:
        from ivl.processing.template import IMAGE_LABEL, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

        total = len(self.images)
        first_new = total - self._new_images + 1
        if total == 1:
            lines = f"{IMAGE_PLACEHOLDER}\n" if self._new_images else ""
        else:
            lines = "".join(f"{IMAGE_LABEL.format(k=k)}{IMAGE_PLACEHOLDER}\n" for k in range(first_new, total + 1))
        return lines + (f"{VIDEO_PLACEHOLDER}\n" if self._new_video else "")

    def ask(self, question: str) -> Iterator[str]:
        """Yield the answer's text deltas; the turn is recorded in ``history`` once the answer is complete."""
        from ivl.processing.template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

        has_placeholder = IMAGE_PLACEHOLDER in question or VIDEO_PLACEHOLDER in question
        full_question = question if has_placeholder else self._prefix() + question
        deltas: list[str] = []
        for delta in stream_chat(
            self.model,
            self.processor,
            full_question,
            images=self.images or None,
            video=self.video,
            history=self.history,  # a list, never None: placeholders are managed here
            generation=self.generation,
            max_num=self.max_num,
            system_message=self.system_message,
        ):
            deltas.append(delta)
            yield delta
        self.history.append((full_question, "".join(deltas).strip()))
        self._new_images = 0
        self._new_video = False


def draw_answer_boxes(answer: str, image: Any, path: str | Path) -> int:
    """Draw the ``<ref>/<box>`` regions of ``answer`` on ``image`` into a PNG; returns how many were found."""
    from ivl.processing.grounding import draw_grounding, parse_grounding

    regions = parse_grounding(answer, image.size)
    if regions:
        draw_grounding(image, regions, path=path)
    return len(regions)


def run_cli_chat(
    model_dir: str | Path,
    question: str | None,
    *,
    images: Sequence[str] = (),
    video: str | None = None,
    max_tiles: int | None = None,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    draw_boxes: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    system_message: str | None = None,
    read: Any = input,
    write: Any = None,
) -> None:
    """``ivl chat``: answer one question, or run an interactive session (``/image PATH``, ``/reset``, ``/exit``)."""
    import sys

    def out(text: str, end: str = "") -> None:
        if write is not None:
            write(text + end)
        else:
            sys.stdout.write(text + end)
            sys.stdout.flush()

    model, processor = load_for_inference(model_dir, dtype=dtype, device=device)
    session = ChatSession(model, processor, generation, max_num=max_tiles, system_message=system_message)

    def start() -> None:
        for path in images:
            session.add_image(path)
        if video is not None:
            session.set_video(video)

    def answer(q: str) -> None:
        parts: list[str] = []
        for delta in session.ask(q):
            out(delta)
            parts.append(delta)
        text = "".join(parts)
        out("", end="\n")
        if draw_boxes is not None:
            if not session.images:
                out("(--draw-boxes needs an image)", end="\n")
            elif draw_answer_boxes(text, session.images[-1], draw_boxes):
                out(f"(boxes drawn to {draw_boxes})", end="\n")
            else:
                out("(no boxes in the answer)", end="\n")

    start()
    if question is not None:
        answer(question)
        return
    out("ivl chat: /image PATH adds an image, /reset starts over, /exit quits.", end="\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            out("(conversation cleared)", end="\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.add_image(path)
                out(f"(image {len(session.images)} added: {path})", end="\n")
            except Exception as exc:  # a bad path must not end the session
                out(f"error: {exc}", end="\n")
            continue
        if line.startswith("/"):
            out(f"unknown command {line.split()[0]!r} (use /image PATH, /reset, /exit)", end="\n")
            continue
        try:
            answer(line)
        except IvlError as exc:  # e.g. a prompt that no longer fits: report it and keep the session
            out(f"error: {exc}", end="\n")
