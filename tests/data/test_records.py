"""Meta JSON and JSONL record validation: errors name the file and line."""

from __future__ import annotations

import json

import pytest

from ivl.data.records import load_meta, load_records, parse_meta, parse_record
from ivl.errors import DataError


def conv(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


def test_single_image_gets_image_prefix():
    rec = parse_record({"image": "a.jpg", "conversations": conv(("human", "What?"), ("gpt", "A cat."))})
    assert rec.kind == "image" and rec.images == ["a.jpg"]
    assert rec.conversations[0].value == "<image>\nWhat?"


def test_system_turn_and_multi_image_counts():
    rec = parse_record(
        {
            "image": ["a.jpg", "b.jpg"],
            "conversations": conv(
                ("system", "Be brief."), ("human", "Image-1: <image>\nImage-2: <image>\nSame?"), ("gpt", "No.")
            ),
        }
    )
    assert rec.kind == "multi_image" and rec.conversations[0].role == "system"
    with pytest.raises(DataError, match=r"f.jsonl:4: 1 '<image>' placeholder\(s\) for 2 image"):
        parse_record({"image": ["a", "b"], "conversations": conv(("human", "<image> x"), ("gpt", "y"))}, "f.jsonl", 4)


def test_text_only_and_video_records():
    assert parse_record({"conversations": conv(("human", "hi"), ("gpt", "hello"))}).kind == "text"
    rec = parse_record(
        {"video": "v.mp4", "clip": [1, 3.5], "conversations": conv(("human", "Why?"), ("gpt", "Because."))}
    )
    assert rec.kind == "video" and rec.clip == (1.0, 3.5)
    assert rec.conversations[0].value == "<video>\nWhy?"
    with pytest.raises(DataError, match="no 'video' field"):
        parse_record({"conversations": conv(("human", "<video> x"), ("gpt", "y"))})


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"conversations": conv(("human", "a"), ("bot", "b"))},
            r"d.jsonl:17: conversations\[1\].from must be human/gpt/system, got 'bot'",
        ),
        ({"conversations": conv(("human", "a"), ("human", "b"))}, r"d.jsonl:17: conversations\[1\].from must be 'gpt'"),
        ({"conversations": conv(("gpt", "a"), ("human", "b"))}, r"conversations\[0\].from must be 'human'"),
        ({"conversations": conv(("human", "a"))}, "last turn must be 'gpt'"),
        ({"conversations": []}, "non-empty list"),
        ({"conversations": conv(("human", "a"), ("gpt", 3))}, r"conversations\[1\].value must be a string"),
        ({"conversations": conv(("human", "a"), ("gpt", "<image>"))}, "media placeholder"),
        ({"conversations": conv(("human", "<image>a"), ("gpt", "b"))}, r"1 '<image>' placeholder\(s\) for 0 image"),
        ({"image": 5, "conversations": conv(("human", "a"), ("gpt", "b"))}, "'image' must be a path"),
        ({"image": "a", "video": "v", "conversations": conv(("human", "a"), ("gpt", "b"))}, "not both"),
        (
            {"image": "a", "width": -3, "conversations": conv(("human", "a"), ("gpt", "b"))},
            "'width' must be a positive",
        ),
        ({"video": "v", "clip": [3, 1], "conversations": conv(("human", "a"), ("gpt", "b"))}, "'clip'"),
    ],
)
def test_bad_records_name_file_and_line(obj, message):
    with pytest.raises(DataError, match=message):
        parse_record(obj, "d.jsonl", 17)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"conversations": conv(("human", "a"), ("gpt", "b"))})
    path.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:4: invalid JSON"):
        load_records(path)
    path.write_text(good + "\n\n" + good + "\n")
    recs = load_records(path)
    assert [r.line for r in recs] == [1, 3] and recs[1].where == f"{path}:3"


def test_meta_parsing_and_errors(tmp_path):
    meta = {
        "coco": {
            "root": "imgs/",
            "annotation": "coco.jsonl",
            "data_augment": True,
            "max_dynamic_patch": 6,
            "repeat_time": 0.5,
            "length": 10,
        }
    }
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    (tmp_path / "coco.jsonl").write_text("")
    [entry] = load_meta(path)
    assert entry.name == "coco" and entry.annotation == str(tmp_path / "coco.jsonl")
    assert entry.data_augment and entry.max_dynamic_patch == 6 and entry.repeat_time == 0.5
    assert entry.root == "imgs/"  # not found next to the meta file: kept relative to the working directory
    assert entry.resolve("x/1.jpg") == "imgs/x/1.jpg" and entry.resolve("/abs.jpg") == "/abs.jpg"
    (tmp_path / "imgs").mkdir()
    [entry] = load_meta(path)
    assert entry.resolve("x/1.jpg") == str(tmp_path / "imgs" / "x" / "1.jpg")
    for bad, msg in [
        ({"a": {"root": ""}}, "'annotation'"),
        ({"a": {"annotation": "x", "repeat_time": 0}}, "'repeat_time' must be a positive"),
        ({"a": {"annotation": "x", "max_dynamic_patch": 0}}, "'max_dynamic_patch'"),
        ({"a": {"annotation": "x", "data_augment": "yes"}}, "'data_augment'"),
        ({"a": {"annotation": "x", "colour": 1}}, "unknown field"),
        ({}, "non-empty"),
    ]:
        with pytest.raises(DataError, match=msg):
            parse_meta(bad, "m.json")
