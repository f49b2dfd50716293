"""Text drills for the demo's LM warm-up: fresh "which image shows colour X?" questions over captions.

Why: the world's 1,000 multi-image records, with each image described in words, do not teach a 2-layer LLM
to look an image up by its colour (0.40-0.75 on the captioned test questions after 400-1,500 warm-up
steps): it memorises them instead. Text is cheap, so the warm-up also reads thousands of procedurally
generated ones, each new, which leaves only the lookup to learn (docs/benchmarks.md, "Demo"). The image
stages then have the image tokens stand where the captions stood.
"""

from __future__ import annotations

import random
from typing import Any

from ivl.data.synthetic_draw import COLOURS, SHAPES
from ivl.data.synthetic_tasks import IMAGE_CHOICES, MULTI_IMAGE_QUESTIONS, MULTI_IMAGE_SUFFIX
from ivl.errors import ConfigError


def object_caption(colour: str, shape: str) -> str:
    """The words that stand in for an image of one object (the LM warm-up's caption)."""
    return f"a {colour} {shape}"


#: what pads a caption: one token of its own in the demo's BPE (trained on the world's text, where it never
#: occurs, so no merge holds it; BPE trained on padded captions would merge ``~~``)
CAPTION_FILLER = "~"
#: tokens an image takes in the demo (one 56 px tile, 4 x 4 pixel unshuffle): the caption's slack
IMAGE_TOKENS = 4


def padded_caption(caption: str, rng: random.Random, slots: int = IMAGE_TOKENS) -> str:
    """A caption with ``slots - 1`` fillers split at random before and after it.

    Why: an object shows up in whichever of an image's tokens covers it, but a caption puts its colour word at
    the same place every time; the warm-up LLM then reads colour by place (with three fillers after the words,
    colour answers fell from 1.00 to 0.45) and no image token can say it there. Moving the words around makes
    the LLM find them by what they are."""
    if slots < 1:
        raise ConfigError(f"padded_caption: slots must be >= 1 (the image's tokens), got {slots} for {caption!r}")
    before = rng.randrange(slots)
    return CAPTION_FILLER * before + caption + CAPTION_FILLER * (slots - 1 - before)


def multi_image_drills(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` text-only records in the world's conversation format, answers balanced over Image-1 / Image-2."""
    if n < 0:
        raise ConfigError(f"multi_image_drills: n must be >= 0, got {n}")
    rng = random.Random(f"multi_image_drills/{seed}")
    records = []
    for i in range(n):
        colours = rng.sample(tuple(COLOURS), 2)
        captions = [padded_caption(object_caption(colour, rng.choice(SHAPES)), rng) for colour in colours]
        answer = i % 2  # balanced classes; which colour is asked is what varies
        question = rng.choice(MULTI_IMAGE_QUESTIONS).format(colour=colours[answer]) + " " + MULTI_IMAGE_SUFFIX
        media = "".join(
            f"{label}: <img>{caption}</img>\n" for label, caption in zip(IMAGE_CHOICES, captions, strict=True)
        )
        records.append(
            {
                "id": f"drill/multi_image/{i:06d}",
                "conversations": [
                    {"from": "human", "value": media + question},
                    {"from": "gpt", "value": IMAGE_CHOICES[answer]},
                ],
            }
        )
    return records
