"""The LM warm-up's generated multi-image lookups: right answers, balanced, seeded, in the world's wording."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ivl.data.synthetic_draw import COLOURS
from ivl.data.synthetic_drills import CAPTION_FILLER, multi_image_drills, object_caption, padded_caption
from ivl.data.synthetic_tasks import MULTI_IMAGE_QUESTIONS

PROMPT = re.compile(r"^Image-1: <img>~*a (\w+) (\w+)~*</img>\nImage-2: <img>~*a (\w+) (\w+)~*</img>\n(.+)$", re.S)


def _asked_colour(question: str) -> str:
    """The one palette colour the question names, after checking it is in the world's wording."""
    named = [c for c in COLOURS if re.search(rf"\b{c}\b", question)]
    assert len(named) == 1, question
    assert any(question.startswith(t.format(colour=named[0])) for t in MULTI_IMAGE_QUESTIONS), question
    return named[0]


def test_drill_answers_name_the_image_with_the_asked_colour():
    records = multi_image_drills(200, seed=0)
    assert len(records) == 200 and len({r["id"] for r in records}) == 200
    answers = []
    for record in records:
        human, gpt = record["conversations"]
        match = PROMPT.match(human["value"])
        assert match, human["value"]
        first, second, question = match.group(1), match.group(3), match.group(5)
        assert first != second and {first, second} <= set(COLOURS)
        asked = _asked_colour(question)
        assert question.endswith("Answer Image-1 or Image-2.")
        assert gpt["value"] == ("Image-1" if asked == first else "Image-2")
        answers.append(gpt["value"])
    assert answers.count("Image-1") == answers.count("Image-2") == 100


def test_padded_caption_moves_the_words_within_the_image_slots():
    rng = random.Random(0)
    padded = [padded_caption("a red circle", rng) for _ in range(200)]
    assert all(p.strip(CAPTION_FILLER) == "a red circle" and p.count(CAPTION_FILLER) == 3 for p in padded)
    assert {len(p) - len(p.lstrip(CAPTION_FILLER)) for p in padded} == {0, 1, 2, 3}  # every offset occurs
    assert padded_caption("x", random.Random(0), slots=1) == "x"
    assert [padded_caption("x", random.Random(5)) for _ in range(3)] == [padded_caption("x", random.Random(5))] * 3
    with pytest.raises(ValueError, match="slots must be >= 1"):
        padded_caption("a red circle", rng, slots=0)


def test_every_drill_caption_is_padded():
    for record in multi_image_drills(50, seed=1):
        spans = re.findall(r"<img>(.*?)</img>", record["conversations"][0]["value"])
        assert len(spans) == 2 and all(span.count(CAPTION_FILLER) == 3 for span in spans)


def test_drills_are_seeded():
    assert multi_image_drills(20, seed=3) == multi_image_drills(20, seed=3)
    assert multi_image_drills(20, seed=3) != multi_image_drills(20, seed=4)
    assert multi_image_drills(0, seed=0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        multi_image_drills(-1, seed=0)


def test_caption_is_what_the_warm_up_describes_an_image_with():
    from ivl.demo import captioned_question, describe

    record = {"task": "colour", "objects": [{"colour": "red", "shape": "circle", "box": [0, 0, 10, 10]}]}
    assert describe(record) == [object_caption("red", "circle")] == ["a red circle"]
    record.update(id="train/colour/000007", conversations=[{"from": "human", "value": "<image>\nWhat colour?"}])
    question = captioned_question(record)
    assert re.fullmatch(r"<img>~*a red circle~*</img>\nWhat colour\?", question) and question.count(CAPTION_FILLER) == 3
    assert captioned_question(record) == question  # the same record gets the same padding every time


def test_warmup_meta_lists_world_text_and_drills(tmp_path):
    from ivl.data.synthetic import generate_world
    from ivl.demo import write_warmup_data

    world = tmp_path / "world"
    generate_world(world, seed=0, n_train=4, n_val=0, n_test=1, tasks=("colour", "multi_image"), overwrite=True)
    meta = json.loads(write_warmup_data(world, tmp_path / "data", drills=10, seed=0).read_text())
    assert set(meta) == {"world_text", "multi_image_drills"}
    assert meta["multi_image_drills"]["length"] == 10
    for entry in meta.values():
        lines = Path(entry["annotation"]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == entry["length"]
    world_lines = Path(meta["world_text"]["annotation"]).read_text(encoding="utf-8").splitlines()
    assert all("<image>" not in line for line in world_lines) and any(re.search("<img>~*a ", ln) for ln in world_lines)
    only_world = json.loads(write_warmup_data(world, tmp_path / "data2").read_text())
    assert set(only_world) == {"world_text"}


def test_a_filler_stays_one_token_of_its_own_in_the_demo_tokenizer(tmp_path):
    """The demo's BPE is trained on the world's text, where no filler occurs, so no merge holds one: the words
    move by whole tokens, which is the padding's point. (Trained on padded captions, BPE merges ``~~``.)"""
    from ivl.data.synthetic import generate_world
    from ivl.demo import tokenizer_corpus
    from ivl.processing.tokenizer import build_tokenizer

    world = tmp_path / "world"
    generate_world(world, seed=0, n_train=6, n_val=0, n_test=1, overwrite=True)
    corpus = tokenizer_corpus(world, 48)
    assert not any(CAPTION_FILLER in text for text in corpus)
    tokenizer = build_tokenizer(corpus, vocab_size=1024)
    plain = tokenizer.tokenize("<img>a red circle</img>")
    for before in range(4):
        padded = "<img>" + CAPTION_FILLER * before + "a red circle" + CAPTION_FILLER * (3 - before) + "</img>"
        tokens = tokenizer.tokenize(padded)
        assert tokens.count(CAPTION_FILLER) == 3 and [t for t in tokens if t != CAPTION_FILLER] == plain
