"""Grounding: ``<ref>..</ref><box>[[x1, y1, x2, y2], ...]</box>`` (and ``<quad>``) <-> pixel boxes, and drawing.

Coordinates in text are integers normalised to 0-1000 over the *original* image (spec §5.4): x_text = x / W * 1000.
Like the official RefCOCO evaluation, a box whose four numbers sum to less than 4 is read as already
normalised to 0-1 (set ``unit_box_heuristic=False`` to disable).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from ivl.errors import ImageError

SCALE = 1000
_NUMBER = r"-?\d+(?:\.\d+)?"
_LIST = re.compile(r"\[([^\[\]]*)\]")
_REGION = re.compile(
    r"(?:<ref>(?P<label>(?:(?!<ref>).)*?)</ref>\s*)?<(?P<kind>box|quad)>(?P<body>.*?)</(?P=kind)>",
    re.DOTALL,
)
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


@dataclass
class Region:
    """One referred region: its label (``None`` for a bare box) and shapes in pixels of the original image.

    ``kind="box"``: each shape is (x1, y1, x2, y2); ``kind="quad"``: (x1, y1, ..., x4, y4).
    """

    label: str | None
    shapes: list[tuple[float, ...]] = field(default_factory=list)
    kind: Literal["box", "quad"] = "box"


def parse_grounding(text: str, image_size: tuple[int, int], *, unit_box_heuristic: bool = True) -> list[Region]:
    """All ``<box>``/``<quad>`` groups in model output, converted to pixels of a ``(width, height)`` image.

    A ``<ref>`` immediately before a group labels it; malformed number lists are skipped, not guessed.
    """
    width, height = image_size
    regions = []
    for match in _REGION.finditer(text):
        kind = match.group("kind")
        arity = 4 if kind == "box" else 8
        shapes = []
        for group in _LIST.findall(match.group("body")):
            numbers = [float(n) for n in re.findall(_NUMBER, group)]
            if len(numbers) != arity:
                continue
            scale = 1.0 if unit_box_heuristic and kind == "box" and sum(numbers) < 4 else SCALE
            shapes.append(tuple(v / scale * (width if i % 2 == 0 else height) for i, v in enumerate(numbers)))
        if shapes:
            label = match.group("label")
            regions.append(Region(label.strip() if label is not None else None, shapes, kind))  # type: ignore[arg-type]
    return regions


def _normalise(value: float, extent: int) -> int:
    return int(min(SCALE, max(0, round(value / extent * SCALE))))


def format_box(boxes: Sequence[Sequence[float]], image_size: tuple[int, int], *, kind: str = "box") -> str:
    """Pixel boxes (or quads) -> ``<box>[[x1, y1, x2, y2], ...]</box>`` with 0-1000 integer coordinates."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ImageError(f"image size {image_size} must be positive to normalise boxes")
    arity = 4 if kind == "box" else 8
    lists = []
    for box in boxes:
        if len(box) != arity:
            raise ImageError(f"a {kind} needs {arity} coordinates, got {len(box)}: {list(box)}")
        coords = [_normalise(v, width if i % 2 == 0 else height) for i, v in enumerate(box)]
        lists.append("[" + ", ".join(str(c) for c in coords) + "]")
    return f"<{kind}>[" + ", ".join(lists) + f"]</{kind}>"


def format_region(label: str, boxes: Sequence[Sequence[float]], image_size: tuple[int, int]) -> str:
    """``<ref>label</ref><box>[[...]]</box>``, the form used in grounding prompts and answers."""
    return f"<ref>{label}</ref>" + format_box(boxes, image_size)


def grounding_prompt(expression: str) -> str:
    """The official RefCOCO grounding question for a referring expression."""
    return f"Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>"


def draw_grounding(
    image: Image.Image,
    regions: Sequence[Region],
    *,
    path: str | os.PathLike | None = None,
    width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each region outlined and labelled; saved as PNG when ``path`` is given."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    line = width or max(2, round(min(canvas.size) / 200))
    font = ImageFont.load_default()
    for index, region in enumerate(regions):
        colour = _PALETTE[index % len(_PALETTE)]
        for shape in region.shapes:
            if region.kind == "box":
                x1, y1, x2, y2 = shape
                draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=line)
            else:
                points = list(zip(shape[0::2], shape[1::2], strict=True))
                draw.line([*points, points[0]], fill=colour, width=line)
            if region.label:
                x, y = min(shape[0::2]), min(shape[1::2])
                left, top, right, bottom = draw.textbbox((x, y), region.label, font=font)
                offset = bottom - top + 2 * line
                box_top = y - offset if y - offset >= 0 else y
                draw.rectangle([x, box_top, x + right - left + 2 * line, box_top + offset], fill=colour)
                draw.text((x + line, box_top + line), region.label, fill=(255, 255, 255), font=font)
    if path is not None:
        canvas.save(os.fspath(path), format="PNG")
    return canvas
