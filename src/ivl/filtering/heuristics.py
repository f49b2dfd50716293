"""Heuristic anomaly rules: lengths, zero runs, encodings, conversation shape, placeholders, media.

Each rule is named, parameterised and switchable from the filter config; the pure helpers beside them
are what the unit tests pin down.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ivl.errors import ConfigError
from ivl.filtering.rules import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    Flag,
    Rule,
    Sample,
    TextFields,
    check_fields_param,
    check_positive,
    register_rule,
)

# --------------------------------------------------------------------------------------------------------
# text helpers

_SENTENCE_END = re.compile(r"[.!?。！？;；\n]+")
_CODE_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# What a cp1252/latin-1 decoder shows for UTF-8 continuation bytes 0x80-0xBF.
_CONT = "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
_MOJIBAKE = re.compile(rf"[\u00c2-\u00f4][{_CONT}]{{1,3}}")


def longest_sentence(text: str, skip_code: bool = True) -> tuple[int, int]:
    """(most words, most characters) in one sentence; fenced code blocks are skipped when asked."""
    if skip_code:
        text = _CODE_FENCE.sub("\n", text)
    words = chars = 0
    for part in _SENTENCE_END.split(text):
        words = max(words, len(part.split()))
        chars = max(chars, len(part.strip()))
    return words, chars


def longest_zero_run(text: str, max_gap: int = 3) -> int:
    """Most zeros in one run of zeros separated only by up to ``max_gap`` spaces/commas/dots/colons."""
    pattern = re.compile(rf"0(?:[\s,.;:]{{0,{max_gap}}}0)+")
    return max((m.group().count("0") for m in pattern.finditer(text)), default=1 if "0" in text else 0)


def _cp1252_byte(ch: str) -> int | None:
    try:
        return ch.encode("cp1252")[0]
    except UnicodeEncodeError:
        return ord(ch) if ord(ch) < 256 else None


def count_mojibake(text: str) -> int:
    """Number of character sequences that are UTF-8 bytes mis-decoded as cp1252/latin-1 ("Ã©", "â€™")."""
    count = 0
    for m in _MOJIBAKE.finditer(text):
        lead = ord(m.group()[0])
        need = 1 if lead < 0xE0 else 2 if lead < 0xF0 else 3
        seq = m.group()[: need + 1]
        if len(seq) != need + 1:
            continue
        data = [_cp1252_byte(ch) for ch in seq]
        if None in data:
            continue
        try:
            bytes(data).decode("utf-8")  # type: ignore[arg-type]
        except UnicodeDecodeError:
            continue
        count += 1
    return count


def encoding_problems(text: str, max_mojibake: int = 0) -> list[str]:
    """Human-readable list of encoding defects: replacement chars, control chars, surrogates, mojibake."""
    problems = []
    if "\ufffd" in text:
        problems.append(f"{text.count(chr(0xFFFD))} U+FFFD replacement character(s)")
    controls = _CONTROL.findall(text)
    if controls:
        problems.append(f"{len(controls)} control character(s) (first {controls[0]!r})")
    if _SURROGATE.search(text):
        problems.append("unpaired UTF-16 surrogate(s)")
    mojibake = count_mojibake(text)
    if mojibake > max_mojibake:
        problems.append(f"{mojibake} mojibake sequence(s) (UTF-8 read as cp1252)")
    return problems


# --------------------------------------------------------------------------------------------------------
# text rules


@register_rule
@dataclass(kw_only=True)
class AnswerLength(Rule):
    """Empty or extreme assistant answers."""

    name = "answer_length"
    min_chars: int = 1
    max_chars: int = 32768

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_chars=self.max_chars)
        if self.min_chars < 0 or self.min_chars > self.max_chars:
            raise ConfigError(f"rule {self.name}: need 0 <= min_chars <= max_chars, got {self.min_chars}")

    def check(self, sample: Sample) -> Flag | None:
        answers = sample.texts("answers")
        if not answers:
            return self.flag("no assistant answer", 0)
        for turn, text in answers:
            n = len(text.strip())
            if n < self.min_chars:
                return self.flag(f"turn {turn}: answer has {n} characters (< {self.min_chars})", n)
            if n > self.max_chars:
                return self.flag(f"turn {turn}: answer has {n} characters (> {self.max_chars})", n)
        return None


@register_rule
@dataclass(kw_only=True)
class SentenceLength(Rule):
    """Sentence-length outliers: run-on word salad or punctuation-free dumps (code blocks skipped)."""

    name = "sentence_length"
    max_words: int = 200
    max_chars: int = 1500
    skip_code: bool = True
    fields: TextFields = "answers"

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_words=self.max_words, max_chars=self.max_chars)
        check_fields_param(self, self.fields)

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            words, chars = longest_sentence(text, self.skip_code)
            if words > self.max_words:
                return self.flag(f"turn {turn}: a sentence of {words} words (> {self.max_words})", words)
            if chars > self.max_chars:
                return self.flag(f"turn {turn}: a sentence of {chars} characters (> {self.max_chars})", chars)
        return None


@register_rule
@dataclass(kw_only=True)
class ZeroRun(Rule):
    """Long runs of zeros ("0000…", "0, 0, 0, …", "0.000000…"), a known sign of broken numeric data."""

    name = "zero_run"
    max_zeros: int = 30
    max_gap: int = 3
    fields: TextFields = "all"

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_zeros=self.max_zeros, max_gap=self.max_gap)
        check_fields_param(self, self.fields)

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            zeros = longest_zero_run(text, self.max_gap)
            if zeros > self.max_zeros:
                return self.flag(f"turn {turn}: a run of {zeros} zeros (> {self.max_zeros})", zeros)
        return None


@register_rule
@dataclass(kw_only=True)
class Encoding(Rule):
    """Broken encodings: U+FFFD, control characters, lone surrogates, mojibake."""

    name = "encoding"
    max_mojibake: int = 0
    fields: TextFields = "all"

    def validate(self) -> None:
        super().validate()
        check_fields_param(self, self.fields)
        if self.max_mojibake < 0:
            raise ConfigError(f"rule {self.name}: max_mojibake must be >= 0, got {self.max_mojibake}")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            problems = encoding_problems(text, self.max_mojibake)
            if problems:
                return self.flag(f"turn {turn}: " + "; ".join(problems), len(problems))
        return None


# --------------------------------------------------------------------------------------------------------
# structure rules


@register_rule
@dataclass(kw_only=True)
class TurnOrder(Rule):
    """Roles must alternate human/gpt after an optional system turn and end with gpt (official loader)."""

    name = "turn_order"

    def check(self, sample: Sample) -> Flag | None:
        roles = [t["from"] for t in sample.turns]
        body = roles[1:] if roles[0] == "system" else roles
        if not body:
            return self.flag("only a system turn")
        for i, role in enumerate(body):
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                return self.flag(f"turn {i + len(roles) - len(body)} is {role!r}, expected {expected!r}")
        if body[-1] != "gpt":
            return self.flag("the last turn is not an assistant answer")
        return None


@register_rule
@dataclass(kw_only=True)
class ImagePlaceholders(Rule):
    """``<image>``/``<video>`` placeholders must match the media, and only appear in human turns.

    With ``allow_implicit`` (official behaviour) a single-image or video record may omit its placeholder;
    the loader prepends it.
    """

    name = "image_placeholders"
    allow_implicit: bool = True

    def check(self, sample: Sample) -> Flag | None:
        n_img = n_vid = 0
        for i, turn in enumerate(sample.turns):
            k_img, k_vid = turn["value"].count(IMAGE_PLACEHOLDER), turn["value"].count(VIDEO_PLACEHOLDER)
            if (k_img or k_vid) and turn["from"] != "human":
                return self.flag(f"turn {i} ({turn['from']}) contains a media placeholder")
            n_img, n_vid = n_img + k_img, n_vid + k_vid
        images = len(sample.images)
        if sample.video is not None:
            if n_img:
                return self.flag(f"video record holds {n_img} '<image>' placeholder(s)", n_img)
            if n_vid > 1 or (n_vid == 0 and not self.allow_implicit):
                return self.flag(f"video record holds {n_vid} '<video>' placeholders (expected 1)", n_vid)
            return None
        if n_vid:
            return self.flag(f"{n_vid} '<video>' placeholder(s) but no video", n_vid)
        if images == 1 and n_img == 0 and self.allow_implicit:
            return None
        if n_img != images:
            return self.flag(f"{n_img} '<image>' placeholder(s) for {images} image(s)", n_img - images)
        return None


# --------------------------------------------------------------------------------------------------------
# media rules


@dataclass(frozen=True)
class ImageStats:
    """What the degenerate-image rule needs, computed once per image and cached on the sample."""

    width: int
    height: int
    std: float  # largest per-channel standard deviation: colour-only contrast counts too


def read_image_stats(path: str, thumb: int = 128) -> ImageStats:
    """Fully decode an image (truncation raises) and measure its size and pixel spread (max over RGB channels).

    JPEGs are decoded at reduced DCT scale (``draft``), which still reads every entropy-coded block, so a
    truncated file fails while a 20-megapixel photo costs a fraction of a full decode.
    """
    import numpy as np
    from PIL import Image, ImageFile

    with Image.open(path) as img:
        width, height = img.size
        if getattr(img, "format", None) == "JPEG":
            img.draft("RGB", (thumb, thumb))
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # another module may relax it; a filter must not
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        # Not grayscale: a yellow shape on a grey of equal luminance would look blank.
        rgb = img.convert("RGB")
        factor = max(rgb.size) // thumb
        if factor > 1:
            rgb = rgb.reduce(factor)  # box average in C: cheap, and keeps any real contrast visible
        std = np.asarray(rgb, dtype=np.float32).reshape(-1, 3).std(axis=0).max()
    return ImageStats(width, height, float(std))


def image_stats(sample: Sample, path: str) -> ImageStats | str:
    """Cached stats of one of the sample's images, or the error text when it cannot be read."""
    cache: dict[str, ImageStats | str] = sample.cache.setdefault("image_stats", {})
    if path not in cache:
        resolved = sample.resolve(path)
        if "://" in resolved:
            cache[path] = f"remote image {resolved!r} is not checked"
        elif not os.path.exists(resolved):
            cache[path] = f"missing image {path!r} (looked for {resolved})"
        else:
            try:
                cache[path] = read_image_stats(resolved)
            except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, bomb errors)
                cache[path] = f"unreadable image {path!r}: {type(exc).__name__}: {exc}"
    return cache[path]


@register_rule
@dataclass(kw_only=True)
class Media(Rule):
    """Missing or undecodable images and videos; optionally declared width/height that do not match."""

    name = "media"
    decode_video: bool = True
    check_declared_size: bool = True
    skip_remote: bool = True

    def check(self, sample: Sample) -> Flag | None:
        for path in sample.images:
            stats = image_stats(sample, path)
            if isinstance(stats, str):
                if stats.startswith("remote") and self.skip_remote:
                    continue
                return self.flag(stats)
        if self.check_declared_size and len(sample.images) == 1:
            stats = image_stats(sample, sample.images[0])
            w, h = sample.data.get("width"), sample.data.get("height")
            if (
                isinstance(stats, ImageStats)
                and isinstance(w, int)
                and isinstance(h, int)
                and (w, h)
                != (
                    stats.width,
                    stats.height,
                )
            ):
                return self.flag(f"declared size {w}x{h} but the image is {stats.width}x{stats.height}")
        if sample.video is not None:
            return self._check_video(sample)
        return None

    def _check_video(self, sample: Sample) -> Flag | None:
        resolved = sample.resolve(sample.video or "")
        if "://" in resolved:
            return None if self.skip_remote else self.flag(f"remote video {resolved!r} is not checked")
        if not os.path.exists(resolved):
            return self.flag(f"missing video {sample.video!r} (looked for {resolved})")
        if not self.decode_video:
            return None
        try:
            import av

            with av.open(resolved) as container:
                next(container.decode(video=0))
        except Exception as exc:  # PyAV raises its own error family, StopIteration for streams without frames
            return self.flag(f"unreadable video {sample.video!r}: {type(exc).__name__}: {exc}")
        return None


@register_rule
@dataclass(kw_only=True)
class DegenerateImage(Rule):
    """Blank (near-uniform), tiny, or extreme-aspect-ratio images. Unreadable ones are left to ``media``."""

    name = "degenerate_image"
    min_side: int = 10
    max_aspect: float = 20.0
    min_std: float = 2.0

    def validate(self) -> None:
        super().validate()
        check_positive(self, min_side=self.min_side, max_aspect=self.max_aspect)
        if self.min_std < 0:
            raise ConfigError(f"rule {self.name}: min_std must be >= 0, got {self.min_std}")

    def check(self, sample: Sample) -> Flag | None:
        for path in sample.images:
            stats = image_stats(sample, path)
            if isinstance(stats, str):
                continue
            side = min(stats.width, stats.height)
            if side < self.min_side:
                return self.flag(f"image {path!r} is {stats.width}x{stats.height} (side < {self.min_side})", side)
            aspect = max(stats.width, stats.height) / side
            if aspect > self.max_aspect:
                return self.flag(f"image {path!r} has aspect ratio {aspect:.1f} (> {self.max_aspect})", aspect)
            if stats.std < self.min_std:
                return self.flag(f"image {path!r} is blank (pixel std {stats.std:.2f} < {self.min_std})", stats.std)
        return None
