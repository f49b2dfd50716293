"""The tasks of the synthetic world: each draws one sample whose answer is known by construction.

A task generator receives a private RNG and the class it must produce (classes are balanced by the caller),
and returns the media, the question and the closed-vocabulary answer. Question wording varies a little but
never depends on the answer, so a model that ignores the pixels stays at chance.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ivl.data.synthetic_draw import (
    COLOURS,
    INK,
    PLURALS,
    SHAPES,
    WORDS,
    Drawn,
    background,
    blank,
    cell_layout,
    draw_shape,
    draw_word,
    free_position,
    image_size,
    norm_box,
)

DIRECTIONS_2D = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "up": "down", "down": "up"}
MOTIONS = ("left", "right", "up", "down")
COUNTS = tuple(str(n) for n in range(1, 7))
IMAGE_CHOICES = ("Image-1", "Image-2")


@dataclass
class Options:
    """World-wide generation settings shared by every task."""

    size_range: tuple[int, int] = (56, 224)
    video_frames: tuple[int, int] = (4, 8)


@dataclass
class Sample:
    """One generated sample before it is written: media, question (with placeholders) and answer."""

    prompt: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)
    choices: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: further (question, answer) turns about the same media whose answers the earlier turns do not give away:
    #: one image (one ViT pass) then supervises several answers; the world writes them into train records only
    follow_ups: list[tuple[str, str]] = field(default_factory=list)


def _objects(drawn: list[Drawn], size: tuple[int, int]) -> list[dict[str, Any]]:
    return [{"colour": d.colour, "shape": d.shape, "box": norm_box(d.box, size)} for d in drawn]


def _ask(rng: random.Random, templates: tuple[str, ...], suffix: str, **names: str) -> str:
    return _ask_with(rng, templates, suffix, **names)[0]


def _ask_with(rng: random.Random, templates: tuple[str, ...], suffix: str, **names: str) -> tuple[str, str]:
    """The question and the template it came from (a follow-up may only ask what the template did not name)."""
    template = rng.choice(templates)
    return template.format(**names) + " " + suffix, template


COLOUR_QUESTIONS = ("What colour is the {shape}?", "What is the colour of the {shape}?", "Which colour is the shape?")
SHAPE_QUESTIONS = ("What shape is shown?", "What is the shape of the {colour} object?", "Which shape is in the image?")
ONE_WORD = "Answer with one word."


# ---- single image ------------------------------------------------------------------------------------------


def colour_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, opts.size_range)
    img = blank(size, background(rng))
    shape = rng.choice(SHAPES)
    s = max(4, int(min(size) * rng.uniform(0.35, 0.7)))
    drawn = draw_shape(img, label, shape, *free_position(rng, size, s), s)
    question, template = _ask_with(rng, COLOUR_QUESTIONS, ONE_WORD, shape=shape)
    follow_ups = [] if "{shape}" in template else [(_ask(rng, SHAPE_QUESTIONS, ONE_WORD, colour=label), shape)]
    extra = {"objects": _objects([drawn], size)}
    return Sample("<image>\n" + question, label, [img], choices=list(COLOURS), extra=extra, follow_ups=follow_ups)


def shape_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, opts.size_range)
    img = blank(size, background(rng))
    colour = rng.choice(tuple(COLOURS))
    s = max(6, int(min(size) * rng.uniform(0.35, 0.7)))
    drawn = draw_shape(img, colour, label, *free_position(rng, size, s), s)
    question, template = _ask_with(rng, SHAPE_QUESTIONS, ONE_WORD, colour=colour)
    follow_ups = [] if "{colour}" in template else [(_ask(rng, COLOUR_QUESTIONS, ONE_WORD, shape=label), colour)]
    extra = {"objects": _objects([drawn], size)}
    return Sample("<image>\n" + question, label, [img], choices=list(SHAPES), extra=extra, follow_ups=follow_ups)


def count_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, opts.size_range)
    img = blank(size, background(rng))
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    drawn = [draw_shape(img, colour, shape, x, y, s) for x, y, s in cell_layout(rng, size, int(label), same_size=True)]
    templates = ("How many {plural} are there?", "How many {colour} {plural} are in the image?", "Count the shapes.")
    question, template = _ask_with(rng, templates, "Answer with a number.", colour=colour, plural=PLURALS[shape])
    follow_ups = []
    if "{plural}" not in template:
        follow_ups.append(("Which shape is in the image? " + ONE_WORD, shape))
    if "{colour}" not in template:
        follow_ups.append(("Which colour is the shape? " + ONE_WORD, colour))
    extra = {"objects": _objects(drawn, size)}
    return Sample("<image>\n" + question, label, [img], choices=list(COUNTS), extra=extra, follow_ups=follow_ups)


def _two_along_axis(rng: random.Random, length: int, across: int, s: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Positions (along, across) of a first and a second square of side s, the second clearly further along."""
    gap = max(2, length // 10)
    free = max(0, length - 2 * s - gap)
    u1, u2 = sorted((rng.randint(0, free), rng.randint(0, free)))
    a_first, a_second = u1, u2 + s + gap
    # keep the across-offset below half the along-distance, so the direction is never ambiguous
    max_off = (a_second - a_first) // 2
    p_first = rng.randint(0, max(0, across - s))
    p_second = rng.randint(max(0, p_first - max_off), max(0, min(across - s, p_first + max_off)))
    return (a_first, p_first), (a_second, p_second)


def position_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, opts.size_range)
    img = blank(size, background(rng))
    w, h = size
    horizontal = label in ("left", "right")
    length, across = (w, h) if horizontal else (h, w)
    s = max(4, int(min(min(size) * rng.uniform(0.25, 0.4), (length - max(2, length // 10)) / 2)))
    first, second = _two_along_axis(rng, length, across, s)
    # the queried object A comes first along the axis for left/above, second for right/below
    a_pos, b_pos = (first, second) if label in ("left", "above") else (second, first)
    ca, cb = rng.sample(tuple(COLOURS), 2)
    sa, sb = rng.choice(SHAPES), rng.choice(SHAPES)

    def xy(p: tuple[int, int]) -> tuple[int, int]:
        return p if horizontal else (p[1], p[0])

    a = draw_shape(img, ca, sa, *xy(a_pos), s)
    b = draw_shape(img, cb, sb, *xy(b_pos), s)
    templates = (
        "Where is the {ca} {sa} relative to the {cb} {sb}?",
        "Is the {ca} {sa} left of, right of, above or below the {cb} {sb}?",
    )
    suffix = "Answer left, right, above or below."
    prompt = "<image>\n" + _ask(rng, templates, suffix, ca=ca, sa=sa, cb=cb, sb=sb)
    # the converse question: the same two objects, the other way round
    converse = (_ask(rng, templates, suffix, ca=cb, sa=sb, cb=ca, sb=sa), OPPOSITE[label])
    extra = {"objects": _objects([a, b], size)}
    return Sample(prompt, label, [img], choices=list(DIRECTIONS_2D), extra=extra, follow_ups=[converse])


def box_answer(ref: str, box: list[int]) -> str:
    """The InternVL grounding answer: ``<ref>…</ref><box>[[x1, y1, x2, y2]]</box>`` in 0-1000 coordinates."""
    return f"<ref>{ref}</ref><box>[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]</box>"


def grounding_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, opts.size_range)
    img = blank(size, background(rng))
    n = rng.randint(1, 3)
    colours = [label, *rng.sample([c for c in COLOURS if c != label], n - 1)]
    layout = cell_layout(rng, size, n, fill=(0.6, 0.9), min_cells=4)
    drawn = [draw_shape(img, c, rng.choice(SHAPES), x, y, s) for c, (x, y, s) in zip(colours, layout, strict=True)]
    target = drawn[0]
    ref = f"the {target.colour} {target.shape}"
    box = norm_box(target.box, size)
    templates = (
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>{ref}</ref>",
        "Where is <ref>{ref}</ref>? Answer with a bounding box.",
    )
    prompt = "<image>\n" + rng.choice(templates).format(ref=ref)
    follow_ups = []
    for other in drawn[1:]:  # the other objects have other colours, so each reference is unambiguous
        other_ref = f"the {other.colour} {other.shape}"
        other_box = box_answer(other_ref, norm_box(other.box, size))
        follow_ups.append((rng.choice(templates).format(ref=other_ref), other_box))
    extra = {"ref": ref, "box": box, "objects": _objects(drawn, size)}
    return Sample(prompt, box_answer(ref, box), [img], extra=extra, follow_ups=follow_ups)


def ocr_task(rng: random.Random, label: str, opts: Options) -> Sample:
    # no 1:2 images: a horizontal word across a narrow image would be a few pixels tall in a 56 px tile
    size = image_size(rng, opts.size_range, aspect=rng.choice(("square", "wide")))
    img = blank(size, background(rng))
    text_box = draw_word(img, rng, label, rng.choice(INK))
    templates = ("What word is written in the image?", "Read the word in the image.", "What does the text say?")
    prompt = "<image>\n" + _ask(rng, templates, "Answer with one word.")
    return Sample(prompt, label, [img], choices=list(WORDS), extra={"text_box": norm_box(text_box, size)})


# ---- two images, video, text --------------------------------------------------------------------------------


MULTI_IMAGE_QUESTIONS = ("Which image shows a {colour} shape?", "In which image is the shape {colour}?")
MULTI_IMAGE_SUFFIX = "Answer Image-1 or Image-2."


def multi_image_task(rng: random.Random, label: str, opts: Options) -> Sample:
    colours = rng.sample(tuple(COLOURS), 2)  # colours[0] is the one asked about
    order = colours if label == "Image-1" else colours[::-1]
    images, objects, sizes = [], [], []
    for colour in order:
        size = image_size(rng, opts.size_range)
        img = blank(size, background(rng))
        s = max(4, int(min(size) * rng.uniform(0.35, 0.7)))
        objects.append(_objects([draw_shape(img, colour, rng.choice(SHAPES), *free_position(rng, size, s), s)], size))
        images.append(img)
        sizes.append(list(size))
    question = _ask(rng, MULTI_IMAGE_QUESTIONS, MULTI_IMAGE_SUFFIX, colour=colours[0])
    prompt = "Image-1: <image>\nImage-2: <image>\n" + question
    other = IMAGE_CHOICES[1 - IMAGE_CHOICES.index(label)]
    follow_ups = [(_ask(rng, MULTI_IMAGE_QUESTIONS, MULTI_IMAGE_SUFFIX, colour=colours[1]), other)]
    extra = {"objects": objects, "sizes": sizes}
    return Sample(prompt, label, images, choices=list(IMAGE_CHOICES), extra=extra, follow_ups=follow_ups)


def video_task(rng: random.Random, label: str, opts: Options) -> Sample:
    size = image_size(rng, (max(16, opts.size_range[0]), opts.size_range[1]), even=True)
    w, h = size
    bg = background(rng)
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    s = max(4, int(min(size) * rng.uniform(0.25, 0.4)))
    n = rng.randint(*opts.video_frames)
    horizontal = label in ("left", "right")
    room = (w if horizontal else h) - s
    travel = int(room * rng.uniform(0.5, 1.0))
    start = rng.randint(0, room - travel)
    along = [start + round(travel * i / (n - 1)) for i in range(n)]
    if label in ("left", "up"):
        along = along[::-1]
    across = rng.randint(0, (h if horizontal else w) - s)
    frames, boxes = [], []
    for a in along:
        frame = blank(size, bg)
        x, y = (a, across) if horizontal else (across, a)
        boxes.append(norm_box(draw_shape(frame, colour, shape, x, y, s).box, size))
        frames.append(frame)
    templates = ("Which way does the {colour} {shape} move?", "In which direction is the {shape} moving?")
    question, template = _ask_with(rng, templates, "Answer left, right, up or down.", colour=colour, shape=shape)
    follow_ups = [] if "{colour}" in template else [(_ask(rng, COLOUR_QUESTIONS, ONE_WORD, shape=shape), colour)]
    extra = {"num_frames": n, "boxes": boxes, "colour": colour, "shape": shape}
    return Sample(
        "<video>\n" + question, label, frames=frames, choices=list(MOTIONS), extra=extra, follow_ups=follow_ups
    )


def text_facts() -> list[tuple[str, str, tuple[str, ...]]]:
    """Every (question, answer, choices) of the text-only warm-up set: the world's vocabulary in words."""
    kinds = ("colour", "shape")
    facts = [(f"Is {c} a colour or a shape?", "colour", kinds) for c in COLOURS]
    facts += [(f"Is {s} a colour or a shape?", "shape", kinds) for s in SHAPES]
    facts += [(f"What number comes after {n}?", str(n + 1), COUNTS) for n in range(1, 6)]
    facts += [(f"What is the opposite of {a}?", b, tuple(OPPOSITE)) for a, b in OPPOSITE.items()]
    facts += [(f"What is the plural of {s}?", PLURALS[s], tuple(PLURALS.values())) for s in SHAPES]
    facts += [(f"Repeat the word {w}.", w, WORDS) for w in WORDS]
    return facts


def text_task(rng: random.Random, label: str, opts: Options) -> Sample:
    question, answer, choices = text_facts()[int(label)]
    return Sample(question + " Answer with one word.", answer, choices=list(choices))


Generator = Callable[[random.Random, str, Options], Sample]

#: task name → (generator, the classes the caller balances over)
GENERATORS: dict[str, tuple[Generator, tuple[str, ...]]] = {
    "colour": (colour_task, tuple(COLOURS)),
    "shape": (shape_task, SHAPES),
    "count": (count_task, COUNTS),
    "position": (position_task, DIRECTIONS_2D),
    "grounding": (grounding_task, tuple(COLOURS)),
    "ocr": (ocr_task, WORDS),
    "multi_image": (multi_image_task, IMAGE_CHOICES),
    "video": (video_task, MOTIONS),
    "text": (text_task, tuple(str(i) for i in range(len(text_facts())))),
}
