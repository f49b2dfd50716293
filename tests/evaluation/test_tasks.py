"""Benchmark readers (VLMEvalKit TSV, official JSONL, synthetic world), circular expansion and prompts."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from ivl.errors import DataError
from ivl.evaluation.tasks import (
    COT_MC,
    MC_SUFFIX,
    SHORT_SUFFIX,
    TASKS,
    build_prompt,
    get_task,
    image_dimensions,
    item_images,
    load_benchmark,
    open_image,
    task_for_file,
)


def _png_b64(size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def test_settings_table_matches_official_tile_budgets() -> None:
    assert TASKS["mmbench"].max_tiles == 6 and TASKS["mmbench"].circular
    assert TASKS["chartqa"].max_tiles == 12 and TASKS["mmmu"].max_tiles == 12 and TASKS["mmmu"].upscale == 2.0
    assert TASKS["docvqa"].max_tiles == 18 and TASKS["infovqa"].max_tiles == 24
    assert TASKS["mmbench"].prompt_suffix == MC_SUFFIX and TASKS["textvqa"].prompt_suffix == SHORT_SUFFIX
    assert task_for_file("data/MMBench_DEV_EN.tsv") == "mmbench"
    assert task_for_file("textvqa_val.jsonl") == "textvqa"
    assert task_for_file("something.tsv") is None
    with pytest.raises(DataError, match="known tasks"):
        get_task("nope")


def test_tsv_mmbench_with_circular_expansion(tmp_path: Path) -> None:
    img = _png_b64()
    rows = [
        {"index": "0", "image": img, "question": "What animal?", "hint": "A zoo photo.", "A": "dog", "B": "cat",
         "C": "bird", "D": "", "answer": "B", "category": "animals"},
        {"index": "1", "image": "0", "question": "What colour?", "hint": "nan", "A": "red", "B": "blue",
         "C": "green", "D": "pink", "answer": "A", "category": "colours"},
    ]  # fmt: skip
    path = tmp_path / "MMBench_DEV_EN.tsv"
    _write_tsv(path, rows)
    items = load_benchmark(str(path))
    # 3 + 4 rotations; the empty option D of row 0 is dropped
    assert [it.id for it in items] == ["0", "0@r1", "0@r2", "1", "1@r1", "1@r2", "1@r3"]
    first, rotated = items[0], items[1]
    assert first.choices == {"A": "dog", "B": "cat", "C": "bird"} and first.answers == ["B"]
    assert rotated.choices == {"A": "cat", "B": "bird", "C": "dog"} and rotated.answers == ["A"]
    assert rotated.group == "0" and rotated.rotation == 1
    assert items[3].images == items[0].images  # row 1 refers to row 0's image
    assert open_image(items[3].images[0]).size == (8, 6)
    assert build_prompt(first) == "<image>\nA zoo photo.\nWhat animal?\nA. dog\nB. cat\nC. bird\n" + MC_SUFFIX
    assert build_prompt(first, chain_of_thought=True).endswith("C. bird\n" + COT_MC)
    assert items[3].hint is None


def test_tsv_with_circular_copies_is_not_expanded_again(tmp_path: Path) -> None:
    img = _png_b64()
    base = {"image": img, "question": "q", "category": "c"}
    rows = [
        {**base, "index": "5", "A": "x", "B": "y", "answer": "A"},
        {**base, "index": "1000005", "A": "y", "B": "x", "answer": "B"},
    ]
    path = tmp_path / "mmbench_circular.tsv"
    _write_tsv(path, rows)
    items = load_benchmark(f"mmbench={path}")
    assert [(it.id, it.group, it.rotation) for it in items] == [("5", "5", 0), ("1000005", "5", 1)]


def test_jsonl_vqa_grounding_pope(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    lines = [{"question_id": 7, "image": "a.png", "question": "What is written?", "answers": ["stop"] * 10}]
    (tmp_path / "textvqa_val.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    [vqa] = load_benchmark(str(tmp_path / "textvqa_val.jsonl"))
    assert vqa.id == "7" and vqa.answers == ["stop"] * 10 and vqa.images == [str(tmp_path / "a.png")]
    assert build_prompt(vqa) == "<image>\nWhat is written?\n" + SHORT_SUFFIX
    # RefCOCO: pixel bbox, image size read from the file when width/height are absent
    (tmp_path / "ref.jsonl").write_text(
        json.dumps({"image": "a.png", "sent": "the dog", "bbox": [10, 20, 50, 60]}) + "\n"
    )
    [ref] = load_benchmark(f"refcoco={tmp_path / 'ref.jsonl'}")
    assert ref.box == [10, 20, 50, 60] and ref.image_size == (200, 100)
    assert build_prompt(ref).endswith("describes: <ref>the dog</ref>")
    # 0-1000 box with width/height → pixels
    (tmp_path / "g.jsonl").write_text(
        json.dumps({"image": "a.png", "sent": "x", "box": [100, 500, 200, 1000], "width": 200, "height": 100}) + "\n"
    )
    [g] = load_benchmark(f"refcoco={tmp_path / 'g.jsonl'}")
    assert g.box == pytest.approx([20, 50, 40, 100])
    (tmp_path / "pope.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "no", "category": "random"})
        + "\n"
    )
    [pope] = load_benchmark(str(tmp_path / "pope.jsonl"))
    assert pope.answers == ["no"] and pope.category == "random" and pope.settings.metric == "pope"


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_benchmark(f"vqa={path}")
    path.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no answer"):
        load_benchmark(f"vqa={path}")
    path.write_text('{"id": 1, "question": "q", "answer": "a"}\n{"id": 1, "question": "r", "answer": "b"}\n')
    with pytest.raises(DataError, match="duplicate item id '1'"):
        load_benchmark(f"vqa={path}")
    with pytest.raises(DataError, match="cannot tell the task"):
        load_benchmark(str(path))
    with pytest.raises(DataError, match="no such benchmark file"):
        load_benchmark(str(tmp_path / "missing.jsonl"))


def test_multiple_choice_answers_as_text_or_index(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    rows = [
        {"id": "t", "question": "q", "choices": ["red", "blue"], "answer": "Blue"},
        {"id": "i", "question": "q", "choices": ["red", "blue"], "answer": 0},
        {"id": "l", "question": "q", "choices": {"A": "red", "B": "blue"}, "answer": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [it.answers for it in load_benchmark(f"multiple_choice={path}")] == [["B"], ["A"], ["B"]]
    path.write_text(json.dumps({"question": "q", "choices": ["red"], "answer": "green"}) + "\n")
    with pytest.raises(DataError, match=r"mc\.jsonl:1: answer 'green' is neither"):
        load_benchmark(f"multiple_choice={path}")
    path.write_text(json.dumps({"question": "q", "answer": "A"}) + "\n")
    with pytest.raises(DataError, match="needs options"):
        load_benchmark(f"multiple_choice={path}")


def test_multi_image_prompt_and_upscale(tmp_path: Path) -> None:
    Image.new("RGB", (10, 6)).save(tmp_path / "x.png")
    rec = {"id": "m", "images": ["x.png", "x.png"], "question": "Same?", "options": ["yes", "no"], "answer": "A"}
    (tmp_path / "mmmu_val.jsonl").write_text(json.dumps(rec) + "\n")
    [item] = load_benchmark(str(tmp_path / "mmmu_val.jsonl"))
    assert build_prompt(item).startswith("Image-1: <image>\nImage-2: <image>\nSame?\nA. yes\nB. no\n")
    first, second = item_images(item)
    assert first.size == (20, 12) and second.size == (10, 6)  # MMMU: first image upscaled 2x
    assert image_dimensions(item.images[0]) == (10, 6)


def test_synthetic_world_directory(tmp_path: Path) -> None:
    from ivl.data.synthetic import generate_world

    world = tmp_path / "world"
    generate_world(world, seed=1, n_train=0, n_val=0, n_test=2, tasks=["colour", "grounding", "multi_image"])
    items = load_benchmark(str(world))
    assert sorted({it.task for it in items}) == ["colour", "grounding", "multi_image"] and len(items) == 6
    colour = next(it for it in items if it.task == "colour")
    assert colour.max_tiles == 4 and colour.settings.name == "synthetic" and colour.choices == {}
    assert build_prompt(colour) == colour.raw["conversations"][0]["value"]  # the world's own prompt
    ground = next(it for it in items if it.task == "grounding")
    w, h = ground.image_size
    assert ground.box == pytest.approx([v / 1000 * s for v, s in zip(ground.raw["box"], (w, h, w, h), strict=True)])
    multi = next(it for it in items if it.task == "multi_image")
    assert len(multi.images) == 2 and build_prompt(multi).count("<image>") == 2
