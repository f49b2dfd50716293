"""Drawing primitives of the synthetic world: palette, shapes, words, layouts.

Everything is drawn aliased (no anti-aliasing) with integer coordinates, so every object has exactly one
colour and an exact pixel bounding box, and the same random draws give the same bytes on every run.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

#: Object colours: few, far apart in hue, so they survive JPEG augmentation and a downscale to 56 px tiles.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 82, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}

#: Shapes whose silhouettes differ even at a few pixels (a star would look like a circle at 14 px patches).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

#: OCR lexicon: short upper-case words (3-5 letters) rendered large.
WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "MOON", "TREE", "BIRD", "FISH", "BOOK", "LAMP", "CAKE", "BOAT", "HOUSE")

#: Dark text colours: always far from the light background.
INK: tuple[tuple[int, int, int], ...] = ((20, 20, 20), (25, 35, 90), (80, 20, 20))

ASPECTS: dict[str, tuple[int, int]] = {"square": (1, 1), "wide": (2, 1), "tall": (1, 2)}


@dataclass(frozen=True)
class Drawn:
    """One object drawn into an image: what it is and its exact pixel box (x1, y1, x2, y2), right/bottom exclusive."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]


def image_size(rng: random.Random, size_range: tuple[int, int], aspect: str | None = None, even: bool = False):
    """(W, H) with the long side uniform in ``size_range`` and a square, 2:1 or 1:2 aspect."""
    aspect = aspect or rng.choice(tuple(ASPECTS))
    aw, ah = ASPECTS[aspect]
    long_side = rng.randint(size_range[0], size_range[1])
    w, h = (long_side, long_side * ah // aw) if aw >= ah else (long_side * aw // ah, long_side)
    if even:  # yuv420p video needs even sides
        w, h = w - w % 2, h - h % 2
    return max(w, 2), max(h, 2)


def background(rng: random.Random) -> tuple[int, int, int]:
    """A light, nearly neutral grey: no palette colour is close to it."""
    base = rng.randint(200, 245)
    return tuple(min(255, max(0, base + rng.randint(-6, 6))) for _ in range(3))  # type: ignore[return-value]


def blank(size: tuple[int, int], bg: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, bg)


def shape_mask(size: tuple[int, int], shape: str, x: int, y: int, s: int) -> Image.Image:
    """A 0/255 mask of ``shape`` inscribed in the s×s square whose top-left corner is (x, y)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x2, y2 = x + s - 1, y + s - 1  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse([x, y, x2, y2], fill=255)
    elif shape == "square":
        inset = round(s * 0.08)
        draw.rectangle([x + inset, y + inset, x2 - inset, y2 - inset], fill=255)
    elif shape == "triangle":
        draw.polygon([(x + (s - 1) / 2, y), (x, y2), (x2, y2)], fill=255)
    elif shape == "cross":
        arm = max(1, round(s / 3))
        lo = x + (s - arm) // 2
        top = y + (s - arm) // 2
        draw.rectangle([lo, y, lo + arm - 1, y2], fill=255)
        draw.rectangle([x, top, x2, top + arm - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


def draw_shape(img: Image.Image, colour: str, shape: str, x: int, y: int, s: int) -> Drawn:
    """Paint one shape and return its exact pixel box (taken from the mask, not from the geometry)."""
    mask = shape_mask(img.size, shape, x, y, s)
    box = mask.getbbox()
    if box is None:
        raise ValueError(f"shape {shape!r} of size {s} at ({x}, {y}) is empty in a {img.size} image")
    img.paste(COLOURS[colour], (0, 0), mask)
    return Drawn(colour, shape, box)


def free_position(rng: random.Random, size: tuple[int, int], s: int) -> tuple[int, int]:
    """Top-left corner of an s×s square anywhere inside the image."""
    w, h = size
    return rng.randint(0, max(0, w - s)), rng.randint(0, max(0, h - s))


def cell_grid(size: tuple[int, int], min_cells: int = 6) -> tuple[int, int]:
    """(columns, rows) with at least ``min_cells`` cells whose shape is closest to square (fewest cells on ties)."""
    w, h = size
    best: tuple[float, int, int, int] | None = None
    for cols in range(1, min_cells + 1):
        for rows in range(math.ceil(min_cells / cols), min_cells + 1):
            key = (abs(math.log((w / cols) / (h / rows))), cols * rows, cols, rows)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[2], best[3]


def cell_layout(
    rng: random.Random,
    size: tuple[int, int],
    k: int,
    fill: tuple[float, float] = (0.55, 0.85),
    same_size: bool = False,
    min_cells: int = 6,
) -> list[tuple[int, int, int]]:
    """k non-overlapping squares (x, y, side), one per distinct cell of a near-square grid of ≥ min_cells cells.

    Cells guarantee separation without rejection sampling, so the layout always terminates.
    """
    cols, rows = cell_grid(size, max(min_cells, k))
    w, h = size
    cells = rng.sample(range(cols * rows), k)
    cw, ch = w / cols, h / rows
    side = max(3, int(min(cw, ch) * rng.uniform(*fill)))
    out = []
    for c in cells:
        s = side if same_size else max(3, int(min(cw, ch) * rng.uniform(*fill)))
        x0, y0 = math.ceil((c % cols) * cw), math.ceil((c // cols) * ch)
        x1, y1 = int((c % cols + 1) * cw), int((c // cols + 1) * ch)
        x = rng.randint(x0, max(x0, x1 - s))
        y = rng.randint(y0, max(y0, y1 - s))
        out.append((x, y, s))
    return out


@functools.lru_cache(maxsize=512)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px: available offline, identical on every machine with this Pillow."""
    return ImageFont.load_default(size=size)


def draw_word(img: Image.Image, rng: random.Random, word: str, ink: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Render ``word`` as large as fits (75-100 % of the largest size), at a random place; return its pixel box."""
    w, h = img.size

    def fits(size: int) -> bool:
        x1, y1, x2, y2 = font(size).getbbox(word)
        return x2 - x1 <= 0.9 * w and y2 - y1 <= 0.8 * h

    # glyph boxes grow almost linearly with the size: start from a proportional guess, then step to the edge
    x1, y1, x2, y2 = font(100).getbbox(word)
    largest = max(6, int(100 * min(0.9 * w / (x2 - x1), 0.8 * h / (y2 - y1))))
    while largest > 6 and not fits(largest):
        largest -= 1
    while fits(largest + 1):
        largest += 1
    size = max(6, int(largest * rng.uniform(0.75, 1.0)))
    fx1, fy1, fx2, fy2 = font(size).getbbox(word)
    tw, th = fx2 - fx1, fy2 - fy1
    x = rng.randint(0, max(0, w - tw)) - fx1
    y = rng.randint(0, max(0, h - th)) - fy1
    draw = ImageDraw.Draw(img)
    draw.text((x, y), word, fill=ink, font=font(size))
    return x + fx1, y + fy1, x + fx2, y + fy2


def norm_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> list[int]:
    """Pixel box (right/bottom exclusive) → integer 0-1000 box that still contains every pixel (floor/ceil)."""
    w, h = size
    x1, y1, x2, y2 = box
    return [
        math.floor(x1 * 1000 / w),
        math.floor(y1 * 1000 / h),
        min(1000, math.ceil(x2 * 1000 / w)),
        min(1000, math.ceil(y2 * 1000 / h)),
    ]
