"""`Processor`: chat messages + images/videos -> model inputs, for inference and for training.

Flow: messages -> `Conversation` (template.py) -> media loaded (images.py, video.py) -> tiles (tiling.py) ->
per-turn token ids where each ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles)
+ ``</img>`` (spliced as ids, never as a long string) -> labels on assistant content and its stop token only.

Token ids equal transformers' ``InternVLProcessor`` on the same prompt (tested), and the labels follow the
official ``preprocess_internvl2_5`` (spec §6.6). Padding never relies on the pad id: the attention mask comes
from the true lengths, so a real token whose id equals the pad id is never masked (spec §10.12).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ivl.config import InternVLConfig
from ivl.errors import ConfigError, DataError, ImageError, TemplateError
from ivl.processing.images import DEFAULT_MAX_PIXELS, load_image, load_images, to_rgb
from ivl.processing.template import (
    FRAME_LABEL,
    IMAGE_LABEL,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    Conversation,
    MediaSlot,
    expand_videos,
    get_template,
    media_prefix,
    parse_messages,
)
from ivl.processing.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilePlan,
    check_tile_range,
    plan_tiles,
    tiles_to_pixel_values,
)
from ivl.processing.token_cache import TokenCache
from ivl.processing.video import VideoClip, read_video

IGNORE_INDEX = -100
CONFIG_NAME = "ivl_processor_config.json"
_IMAGE_SPLIT = re.compile(re.escape(IMAGE_PLACEHOLDER))
_PLACEHOLDER = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")


class ProcessedInputs(dict):
    """Model inputs as a dict with attribute access.

    Keys: ``input_ids`` / ``attention_mask`` LongTensor ``[B, T]`` (left-padded), ``pixel_values``
    ``[sum N, 3, S, S]`` or ``None`` for text-only input, ``num_patches_list`` (tiles per image or video
    frame, in prompt order over the whole batch), ``num_patches_per_sample``, ``image_flags`` LongTensor
    ``[sum N]`` of ones (or ``None``), ``prompts`` (rendered text before image expansion) and, when asked,
    ``labels`` ``[B, T]`` with -100 outside assistant content.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ProcessedInputs:
        """Move tensors to ``device``; ``dtype`` applies to floating tensors (pixel_values) only."""
        moved = ProcessedInputs()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(
                    device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None
                )
            moved[key] = value
        return moved


@dataclass
class EncodedSample:
    """One training sample, unpadded: 1-D ``input_ids``/``labels``; ``pixel_values`` None when text-only.

    Unpacks as ``input_ids, labels, pixel_values, num_patches_list = sample``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    num_patches_list: list[int]
    image_flags: torch.Tensor | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.input_ids, self.labels, self.pixel_values, self.num_patches_list))


@dataclass
class _Prepared:
    """A conversation with videos expanded to frame lines and every ``<image>`` matched to its image and
    tile plan (pixels are produced later, for the whole batch at once)."""

    system: str | None
    turns: list[tuple[str, str]]
    visuals: list[tuple[Image.Image, TilePlan]]

    @property
    def plans(self) -> list[TilePlan]:
        return [plan for _, plan in self.visuals]


class Processor:
    """Turns chat messages and media into InternVL / Mono-InternVL model inputs.

    Stand-alone: ``Processor(tokenizer, image_size=448, max_num=12, template="internvl2_5")``; from a model
    config: ``Processor.from_config(tokenizer, config)``. ``num_image_token`` defaults to
    ``(image_size // patch_size)**2 * downsample_ratio**2`` (256 for 448 px tiles).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int = 448,
        num_image_token: int | None = None,
        patch_size: int = 14,
        downsample_ratio: float = 0.5,
        template: str | ChatTemplate = "internvl2_5",
        system_message: str | None = None,
        min_num: int = 1,
        max_num: int = 12,
        use_thumbnail: bool = True,
        divide_tile_budget: bool = True,
        num_segments: int = 8,
        video_max_num: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        image_token_id: int | None = None,
        img_start_token: str = "<img>",
        img_end_token: str = "</img>",
        img_context_token: str = "<IMG_CONTEXT>",
        image_label: str = IMAGE_LABEL,
        frame_label: str = FRAME_LABEL,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_tile_range(min_num, max_num)
        check_tile_range(1, video_max_num)
        if image_size < 1 or image_size % patch_size:
            raise ConfigError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.num_image_token = (
            int(num_image_token)
            if num_image_token is not None
            else int((image_size // patch_size) ** 2 * downsample_ratio**2)
        )
        self.template = template if isinstance(template, ChatTemplate) else get_template(template)
        self.system_message = system_message
        self.min_num, self.max_num = min_num, max_num
        self.use_thumbnail = use_thumbnail
        self.divide_tile_budget = divide_tile_budget
        self.num_segments = num_segments
        self.video_max_num = video_max_num
        self.max_pixels = max_pixels
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.img_start_token, self.img_end_token, self.img_context_token = (
            img_start_token,
            img_end_token,
            img_context_token,
        )
        self.image_label, self.frame_label = image_label, frame_label
        self.dtype = dtype
        self.token_cache = TokenCache(tokenizer)

        self.img_start_id = self._token_id(img_start_token)
        self.img_end_id = self._token_id(img_end_token)
        self.image_token_id = self._token_id(img_context_token)
        if image_token_id is not None and image_token_id != self.image_token_id:
            raise ConfigError(
                f"config image_token_id {image_token_id} differs from the tokenizer's id {self.image_token_id} for "
                f"{img_context_token!r}"
            )
        self._prefix_ids = self._special_prefix()
        self._assistant_header_len = len(self._encode(self.template.assistant_header))
        sep_ids = self._encode(self.template.sep)
        if not sep_ids:
            raise ConfigError(f"template {self.template.name!r} separator {self.template.sep!r} encodes to no tokens")
        self._sep_tail_len = len(sep_ids) - 1  # the stop token (first of sep) carries loss, the rest does not

    # -----------------------------------------------------------------------------------------------------
    # construction and persistence

    @classmethod
    def from_config(cls, tokenizer: Any, config: InternVLConfig, **overrides: Any) -> Processor:
        """Settings from a model config: tile size, tokens per tile, template, system message, tile range."""
        settings: dict[str, Any] = {
            "image_size": config.image_size,
            "num_image_token": config.num_image_token,
            "patch_size": config.vision.patch_size,
            "downsample_ratio": config.downsample_ratio,
            "template": config.template,
            "system_message": config.system_message,
            "min_num": config.min_dynamic_patch,
            "max_num": config.max_dynamic_patch,
            "use_thumbnail": config.use_thumbnail,
            "image_token_id": config.image_token_id,
        }
        settings.update(overrides)
        return cls(tokenizer, **settings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (everything but the tokenizer)."""
        return {
            "image_size": self.image_size,
            "num_image_token": self.num_image_token,
            "patch_size": self.patch_size,
            "downsample_ratio": self.downsample_ratio,
            "template": self.template.name,
            "system_message": self.system_message,
            "min_num": self.min_num,
            "max_num": self.max_num,
            "use_thumbnail": self.use_thumbnail,
            "divide_tile_budget": self.divide_tile_budget,
            "num_segments": self.num_segments,
            "video_max_num": self.video_max_num,
            "max_pixels": self.max_pixels,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "img_start_token": self.img_start_token,
            "img_end_token": self.img_end_token,
            "img_context_token": self.img_context_token,
            "image_label": self.image_label,
            "frame_label": self.frame_label,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer and ``ivl_processor_config.json`` to ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        (path / CONFIG_NAME).write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, tokenizer: Any = None, **overrides: Any) -> Processor:
        """Load from a directory written by `save_pretrained`, or from a model directory (official
        ``internvl_chat`` or transformers ``internvl`` ``config.json``) with a tokenizer, offline."""
        path = Path(directory)
        if not path.is_dir():
            raise ConfigError(f"processor directory {path} does not exist")
        if tokenizer is None:
            from ivl.processing.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path)
        settings: dict[str, Any] = {}
        config_file = path / CONFIG_NAME
        if config_file.exists():
            settings = json.loads(config_file.read_text(encoding="utf-8"))
            if "dtype" in settings:
                settings["dtype"] = getattr(torch, settings["dtype"])
        elif (path / "config.json").exists():
            settings = _settings_from_model_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
        settings.update(overrides)
        return cls(tokenizer, **settings)

    # -----------------------------------------------------------------------------------------------------
    # public API

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids of the template's stop words present in the vocabulary; the first is the official eos."""
        ids = []
        for word in self.template.stop_words:
            token_id = self.tokenizer.convert_tokens_to_ids(word)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        return ids

    def __call__(
        self,
        messages: str | Sequence[Any],
        images: Any = None,
        videos: Any = None,
        *,
        max_num: int | None = None,
        min_num: int | None = None,
        num_segments: int | None = None,
        return_labels: bool = False,
        add_generation_prompt: bool | None = None,
        system_message: str | None = None,
    ) -> ProcessedInputs:
        """Build model inputs for one request or a batch.

        ``messages``: a prompt string, OpenAI-style messages (``[{"role", "content"}]``), or a list of either
        for a batch (then ``images``/``videos`` are per-sample lists). Images without placeholders in the prompt
        are prepended (``<image>\\n``, or ``Image-k: <image>\\n`` lines for several); ``<image>`` placeholders
        are matched in order. ``max_num``/``min_num`` override the tile range for this call (several images
        share ``max_num`` as ``max(1, max_num // n)`` when ``divide_tile_budget``). ``add_generation_prompt``
        defaults to "unless the last message is the assistant's".
        """
        samples, batch_images, batch_videos = _as_batch(messages, images, videos)
        rows: list[tuple[list[int], list[int]]] = []
        visuals: list[tuple[Image.Image, TilePlan]] = []
        per_sample: list[list[int]] = []
        prompts: list[str] = []
        for sample, sample_images, sample_videos in zip(samples, batch_images, batch_videos, strict=True):
            conversation = _to_conversation(sample)
            prepared = self._prepare(
                conversation, sample_images, sample_videos, max_num=max_num, min_num=min_num, num_segments=num_segments
            )
            generate = add_generation_prompt
            if generate is None:
                generate = not prepared.turns or prepared.turns[-1][0] != "assistant"
            segments = self._segments(
                prepared, system_message=system_message, add_generation_prompt=generate, empty_as_header=True
            )
            prompts.append("".join(text for _, text in segments))
            rows.append(self._tokenize(segments, prepared.plans))
            visuals += prepared.visuals
            per_sample.append([p.num_tiles for p in prepared.plans])
        return self._collate(rows, visuals, per_sample, prompts, return_labels)

    def encode_conversation(
        self,
        conversations: Sequence[Mapping[str, Any]],
        images: Any = None,
        videos: Any = None,
        *,
        max_num: int | None = None,
        min_num: int | None = None,
        num_segments: int | None = None,
        max_length: int | None = None,
    ) -> EncodedSample:
        """Encode one training record (official ``{"from": "system"|"human"|"gpt", "value"}`` turns).

        Follows the official data pipeline (spec §4.4, §4.5, §6.5, §6.6): a leading ``system`` turn overrides the
        system prompt, a leading ``gpt`` turn is dropped; one image without ``<image>`` gets ``<image>\\n``
        prepended to the first human turn; several images need exactly one ``<image>`` each and share the tile
        budget (``max(1, max_num // n)``, thumbnail each); a video's ``<video>\\n`` (prepended if missing) becomes
        ``Frame-k: <image>`` lines, one tile per frame. Labels: -100 except assistant content and its
        ``<|im_end|>``. Text-only records get no image tokens and ``pixel_values=None`` (the trainer adds the
        dummy tile). ``max_length`` truncates; a cut through an image raises `DataError`.
        """
        turns = list(conversations)
        system: str | None = None
        if turns and _record_role(turns[0], 0) == "system":
            system = str(turns[0].get("value", turns[0].get("content", "")))
            turns = turns[1:]
        if turns and _record_role(turns[0], 0) == "assistant":
            turns = turns[1:]
        conversation = Conversation(turns=[], system=system)
        for index, turn in enumerate(turns):
            role = _record_role(turn, index)
            if role == "system":
                raise DataError(f"record turn {index}: a system turn is only allowed first")
            conversation.turns.append((role, str(turn.get("value", turn.get("content", "")))))
        image_list = _as_list(images)
        video_list = _as_list(videos)
        user_turns = [i for i, (role, _) in enumerate(conversation.turns) if role == "user"]
        if (image_list or video_list) and not user_turns:
            raise DataError("record has media but no human turn")
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in conversation.turns if role == "user")
        first = user_turns[0] if user_turns else 0
        if len(image_list) == 1 and placeholders == 0:
            conversation.turns[first] = ("user", f"{IMAGE_PLACEHOLDER}\n" + conversation.turns[first][1])
        elif image_list and placeholders != len(image_list):
            raise DataError(f"record has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(image_list)} images")
        if video_list:
            if len(video_list) != 1:
                raise DataError(f"a training record takes one video, got {len(video_list)}")
            if f"{VIDEO_PLACEHOLDER}\n" not in conversation.turns[first][1]:
                conversation.turns[first] = ("user", f"{VIDEO_PLACEHOLDER}\n" + conversation.turns[first][1])
        if image_list or video_list:  # text-only records keep any placeholder as literal text, like the official path
            for i in user_turns:
                conversation.slots += [
                    MediaSlot(_placeholder_kind(m)) for m in _PLACEHOLDER.findall(conversation.turns[i][1])
                ]
        try:
            prepared = self._prepare(
                conversation,
                image_list,
                video_list,
                max_num=max_num,
                min_num=min_num,
                num_segments=num_segments,
                auto_prefix=False,
            )
        except TemplateError as exc:
            raise DataError(f"record cannot be encoded: {exc}") from exc
        segments = self._segments(prepared, system_message=None, add_generation_prompt=False, empty_as_header=False)
        ids, labels = self._tokenize(segments, prepared.plans, expand=bool(image_list or video_list))
        if max_length is not None and len(ids) > max_length:
            kept_ends = ids[:max_length].count(self.img_end_id)
            if kept_ends != ids.count(self.img_end_id) and prepared.visuals:
                raise DataError(f"truncating to max_length={max_length} cuts through an image ({len(ids)} tokens)")
            ids, labels = ids[:max_length], labels[:max_length]
        pixel_values, flags = self._pixels(prepared.visuals)
        return EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            num_patches_list=[p.num_tiles for p in prepared.plans],
            image_flags=flags,
        )

    def expand_image_tokens(self, num_tiles: int) -> str:
        """The text an ``<image>`` stands for: ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles) + ``</img>``."""
        return self.img_start_token + self.img_context_token * (self.num_image_token * num_tiles) + self.img_end_token

    # -----------------------------------------------------------------------------------------------------
    # internals

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if not isinstance(token_id, int) or (unk is not None and token_id == unk and token != self.tokenizer.unk_token):
            raise ConfigError(f"tokenizer has no token {token!r}; add the InternVL special tokens first")
        return token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _special_prefix(self) -> list[int]:
        """Tokens the tokenizer puts in front of every encoding (InternLM2's ``<s>``; nothing for Qwen)."""
        probe = "a"
        bare = self._encode(probe)
        full = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start]
        return []

    def _prepare(
        self,
        conversation: Conversation,
        images: list[Any],
        videos: list[Any],
        *,
        max_num: int | None,
        min_num: int | None,
        num_segments: int | None,
        auto_prefix: bool = True,
    ) -> _Prepared:
        turns = [(role, text) for role, text in conversation.turns]
        slots = list(conversation.slots)
        if auto_prefix and not slots and (images or videos):
            first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
            if first is None:
                turns.append(("user", ""))
                first = len(turns) - 1
            turns[first] = (
                "user",
                media_prefix(len(images), len(videos), image_label=self.image_label) + turns[first][1],
            )
            slots = [MediaSlot("image") for _ in images] + [MediaSlot("video") for _ in videos]
        _bind(slots, images, videos)

        lo = self.min_num if min_num is None else min_num
        hi = self.max_num if max_num is None else max_num
        check_tile_range(lo, hi)
        num_images = sum(slot.kind == "image" for slot in slots)
        shared_hi = max(1, hi // num_images) if self.divide_tile_budget and num_images > 1 else hi
        image_slots = [slot for slot in slots if slot.kind == "image"]
        loaded = self._load_images([slot.source for slot in image_slots])
        by_slot = dict(zip(map(id, image_slots), loaded, strict=True))

        entries: list[tuple[Any, int, int]] = []  # (image, min_num, max_num) in prompt order
        frame_counts: list[int] = []
        for slot in slots:
            if slot.kind == "image":
                slot_hi = int(slot.options.get("max_num", shared_hi))
                slot_lo = min(int(slot.options.get("min_num", lo)), slot_hi)
                entries.append((by_slot[id(slot)], slot_lo, slot_hi))
            else:
                clip = self._load_video(slot, num_segments)
                frame_counts.append(len(clip))
                entries += [(frame, 1, self.video_max_num) for frame in clip]
        if frame_counts:
            counts = iter(frame_counts)
            for i, (role, text) in enumerate(turns):
                found = text.count(VIDEO_PLACEHOLDER) if role == "user" else 0
                if found:
                    mine = [next(counts) for _ in range(found)]
                    turns[i] = (role, expand_videos(text, mine, frame_label=self.frame_label))
        visuals = []
        for image, slot_lo, slot_hi in entries:
            rgb = to_rgb(image)
            plan = plan_tiles(
                rgb.size,
                min_num=slot_lo,
                max_num=slot_hi,
                image_size=self.image_size,
                use_thumbnail=self.use_thumbnail,
            )
            visuals.append((rgb, plan))
        return _Prepared(conversation.system, turns, visuals)

    def _load_images(self, sources: list[Any]) -> list[Image.Image]:
        return load_images(sources, max_pixels=self.max_pixels)

    def _load_video(self, slot: MediaSlot, num_segments: int | None) -> list[Image.Image]:
        source = slot.source
        if isinstance(source, VideoClip):
            return source.frames
        if isinstance(source, (list, tuple)):  # frames already sampled by the caller
            if not source:
                raise ImageError("a video given as a list of frames is empty")
            return [load_image(frame, max_pixels=self.max_pixels) for frame in source]
        segments = int(slot.options.get("num_segments", num_segments or self.num_segments))
        bound = slot.options.get("bound")
        clip = read_video(
            source, num_segments=segments, bound=tuple(bound) if bound else None, max_pixels=self.max_pixels
        )
        return clip.frames

    def _segments(
        self, prepared: _Prepared, *, system_message: str | None, add_generation_prompt: bool, empty_as_header: bool
    ) -> list[tuple[str, str]]:
        """(kind, text) pieces in order: kind is system, user, assistant or generation."""
        system = prepared.system if prepared.system is not None else system_message
        if system is None:
            system = self.system_message
        segments = [("system", self.template.system_block(system))]
        for role, text in prepared.turns:
            segments.append((role, self.template.message(role, text, empty_as_header=empty_as_header)))  # type: ignore[arg-type]
        if add_generation_prompt:
            segments.append(("generation", self.template.assistant_header))
        return segments

    def _tokenize(
        self, segments: list[tuple[str, str]], plans: list[TilePlan], *, expand: bool = True
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels; ``<image>`` in user segments becomes the image token span of the next tiles
        (with ``expand=False`` it stays literal text, as in the official text-only training path)."""
        chunks: list[str] = []
        layout: list[tuple[int, int]] = []  # per segment: (first chunk index, chunk count)
        for kind, text in segments:
            pieces = _IMAGE_SPLIT.split(text) if kind == "user" and expand else [text]
            layout.append((len(chunks), len(pieces)))
            chunks += pieces
        if self.token_cache.tokenizer is not self.tokenizer:  # the tokenizer was swapped: its ids differ
            self.token_cache = TokenCache(self.tokenizer)
        encoded = self.token_cache.encode(chunks) if chunks else []
        ids: list[int] = list(self._prefix_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        image_index = 0
        for (kind, _), (start, count) in zip(segments, layout, strict=True):
            segment: list[int] = []
            for j in range(count):
                if j:
                    if image_index >= len(plans):
                        raise TemplateError(
                            f"prompt has more {IMAGE_PLACEHOLDER} placeholders than images ({len(plans)})"
                        )
                    n = plans[image_index].num_tiles * self.num_image_token
                    segment += [self.img_start_id, *([self.image_token_id] * n), self.img_end_id]
                    image_index += 1
                segment += encoded[start + j]
            ids += segment
            if kind == "assistant":
                target = list(segment)
                head = min(self._assistant_header_len, len(target))
                target[:head] = [IGNORE_INDEX] * head
                if self._sep_tail_len:  # the official rule: the separator's trailing tokens ("\n") carry no loss
                    target[-self._sep_tail_len :] = [IGNORE_INDEX] * min(self._sep_tail_len, len(target))
                labels += target
            else:
                labels += [IGNORE_INDEX] * len(segment)
        if image_index != len(plans):
            raise TemplateError(f"prompt has {image_index} {IMAGE_PLACEHOLDER} placeholders but {len(plans)} images")
        return ids, labels

    def _pixels(self, visuals: list[tuple[Image.Image, TilePlan]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not visuals:
            return None, None
        images, plans = zip(*visuals, strict=True)
        pixel_values = tiles_to_pixel_values(images, plans, self.image_mean, self.image_std, dtype=self.dtype)
        return pixel_values, torch.ones(pixel_values.shape[0], dtype=torch.long)

    def _collate(
        self,
        rows: list[tuple[list[int], list[int]]],
        visuals: list[tuple[Image.Image, TilePlan]],
        per_sample: list[list[int]],
        prompts: list[str],
        return_labels: bool,
    ) -> ProcessedInputs:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, target) in enumerate(rows):
            if ids:  # left padding: generation continues right after the last real token
                input_ids[b, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                labels[b, length - len(ids) :] = torch.tensor(target, dtype=torch.long)
                attention_mask[b, length - len(ids) :] = 1
        pixel_values, flags = self._pixels(visuals)
        out = ProcessedInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            num_patches_list=[p.num_tiles for _, p in visuals],
            num_patches_per_sample=per_sample,
            image_flags=flags,
            prompts=prompts,
        )
        if return_labels:
            out["labels"] = labels
        return out


# ---------------------------------------------------------------------------------------------------------
# helpers


def _settings_from_model_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Processor settings from an official (``internvl_chat``) or transformers (``internvl``) config.json."""
    settings: dict[str, Any] = {}
    vision = data.get("vision_config") or {}
    patch = vision.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    size = data.get("force_image_size") or vision.get("image_size", 448)
    size = size[0] if isinstance(size, (list, tuple)) else size
    settings.update(image_size=int(size), patch_size=int(patch))
    if "downsample_ratio" in data:
        settings["downsample_ratio"] = float(data["downsample_ratio"])
    if data.get("template"):
        settings["template"] = data["template"]
    if data.get("system_message"):
        settings["system_message"] = data["system_message"]
    for ours, theirs in (("min_num", "min_dynamic_patch"), ("max_num", "max_dynamic_patch")):
        if theirs in data:
            settings[ours] = int(data[theirs])
    if "use_thumbnail" in data:
        settings["use_thumbnail"] = bool(data["use_thumbnail"])
    if "image_seq_length" in data:
        settings["num_image_token"] = int(data["image_seq_length"])
    return settings


def _placeholder_kind(placeholder: str) -> Any:
    return "image" if placeholder == IMAGE_PLACEHOLDER else "video"


def _record_role(turn: Mapping[str, Any], index: int) -> str:
    raw = turn.get("from", turn.get("role"))
    role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}.get(
        str(raw)
    )
    if role is None:
        raise DataError(f"record turn {index} has unknown 'from' {raw!r} (expected system, human or gpt)")
    return role


def _is_media_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if _is_media_list(value) else [value]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value) and len(value) > 0


def _as_batch(messages: Any, images: Any, videos: Any) -> tuple[list[Any], list[list[Any]], list[list[Any]]]:
    """Normalise one request or a batch into per-sample (messages, images, videos)."""
    if isinstance(messages, str) or _is_conversation(messages):
        return [messages], [_as_list(images)], [_as_list(videos)]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a prompt string, a list of chat messages, or a non-empty batch of them")
    size = len(messages)

    def per_sample(value: Any, what: str) -> list[list[Any]]:
        if value is None:
            return [[] for _ in range(size)]
        if not _is_media_list(value) or len(value) != size:
            raise TemplateError(f"a batch of {size} samples needs {what} as a list of {size} entries (one per sample)")
        return [_as_list(v) for v in value]

    return list(messages), per_sample(images, "images"), per_sample(videos, "videos")


def _to_conversation(sample: Any) -> Conversation:
    if isinstance(sample, str):
        conversation = parse_messages([{"role": "user", "content": sample}])
        return conversation
    if _is_conversation(sample):
        return parse_messages(sample)
    raise TemplateError(
        f"a batch entry must be a prompt string or a list of chat messages, got {type(sample).__name__}"
    )


def _bind(slots: list[MediaSlot], images: list[Any], videos: list[Any]) -> None:
    """Give every slot without a payload the next image/video passed separately; counts must match."""
    pools = {"image": iter(images), "video": iter(videos)}
    wanted = {"image": 0, "video": 0}
    for slot in slots:
        if slot.source is None:
            wanted[slot.kind] += 1
            slot.source = next(pools[slot.kind], None)
            if slot.source is None:
                raise TemplateError(
                    f"prompt has more {slot.kind} placeholders than {slot.kind}s passed ({len(images if slot.kind == 'image' else videos)})"
                )
    for kind, given in (("image", images), ("video", videos)):
        if wanted[kind] != len(given):
            raise TemplateError(
                f"{len(given)} {kind}s passed but the prompt has {wanted[kind]} {kind} placeholders without a payload"
            )
