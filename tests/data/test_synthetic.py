"""The synthetic world: determinism, official format, ground truth that matches the pixels, balance, scoring."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from ivl.data.records import load_meta, parse_record
from ivl.data.synthetic import (
    TASKS,
    VISION_TASKS,
    box_answer,
    box_iou,
    chance_level,
    corpus_texts,
    generate_world,
    parse_box,
    read_records,
    score,
)
from ivl.data.synthetic import _balanced as balanced
from ivl.data.synthetic_draw import COLOURS, WORDS, cell_grid
from ivl.errors import ConfigError, DataError

N_TRAIN, N_VAL, N_TEST = 24, 6, 12  # multiples of every class count (except 12-word OCR at 6 val)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    generate_world(out, seed=3, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST)
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _to_px(box: list[int], w: int, h: int) -> tuple[float, float, float, float]:
    return box[0] * w / 1000, box[1] * h / 1000, box[2] * w / 1000, box[3] * h / 1000


def _colour_bbox(arr: np.ndarray, rgb: tuple[int, int, int], tol: int = 0) -> tuple[int, int, int, int] | None:
    mask = np.abs(arr.astype(int) - np.array(rgb)).max(-1) <= tol
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---- determinism -----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kw = {"n_train": 8, "n_val": 0, "n_test": 4}
    generate_world(tmp_path / "a", seed=7, **kw)
    generate_world(tmp_path / "b", seed=7, **kw)
    generate_world(tmp_path / "c", seed=8, **kw)
    a, b, c = (_digest(tmp_path / d) for d in "abc")
    assert a == b
    assert any(name.endswith(".mp4") for name in a)  # videos are covered by the byte comparison
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k] and k.endswith((".png", ".mp4"))]
    assert len(differing) > 0.9 * sum(k.endswith((".png", ".mp4")) for k in a)


# ---- official format --------------------------------------------------------------------------------------


def test_meta_and_records_are_valid_official_format(world: Path) -> None:
    for split in ("train", "val", "test"):
        entries = load_meta(world / f"{split}_meta.json")
        names = {e.name for e in entries}
        expected = {f"synth_{t}" for t in TASKS if t != "text" or split == "train"}
        assert names == expected
        for entry in entries:
            task = entry.name.removeprefix("synth_")
            assert entry.max_dynamic_patch == TASKS[task].max_dynamic_patch
            assert entry.data_augment == (TASKS[task].data_augment and split == "train")
            lines = Path(entry.annotation).read_text().splitlines()
            assert len(lines) == entry.length
            for lineno, line in enumerate(lines, 1):
                raw = json.loads(line)
                rec = parse_record(json.loads(line), entry.annotation, lineno)  # the project's own validator
                assert raw["task"] == task
                assert raw["conversations"][1]["value"] == raw["answer"]
                human = raw["conversations"][0]["value"]
                if rec.kind in ("image", "multi_image"):
                    assert human.count("<image>") == len(rec.images)  # explicit, not added by the loader
                root = world / entry.root
                for name in rec.images:
                    with Image.open(root / name) as img:
                        img.verify()
                if rec.kind == "image":
                    assert Image.open(root / rec.images[0]).size == (rec.width, rec.height)
                if rec.kind == "multi_image":
                    assert human.startswith("Image-1: <image>\nImage-2: <image>\n")
                    assert [list(Image.open(root / p).size) for p in rec.images] == raw["sizes"]
                if rec.kind == "video":
                    assert human.startswith("<video>\n")
                    with av.open(str(root / rec.video)) as container:
                        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
                    assert len(frames) == raw["num_frames"]
                    assert frames[0].shape == (rec.height, rec.width, 3)
                if rec.kind == "text":
                    assert task == "text" and entry.root == ""
                if "choices" in raw:
                    assert raw["answer"] in raw["choices"]


def test_image_sizes_vary_in_aspect_and_stay_in_range(world: Path) -> None:
    aspects = collections.Counter()
    for rec in read_records(world, "train"):
        if "width" not in rec:
            continue
        w, h = rec["width"], rec["height"]
        assert 28 <= max(w, h) <= 224 and min(w, h) >= 14
        aspects["wide" if w > 1.5 * h else "tall" if h > 1.5 * w else "square"] += 1
    assert set(aspects) == {"wide", "tall", "square"}
    assert min(aspects.values()) > 0.2 * sum(aspects.values())


def test_objects_stay_visible_at_the_demo_tile_size(world: Path) -> None:
    """With 56 px tiles and each dataset's max_dynamic_patch, every object/word keeps ≥ 6 px on its short side."""
    from ivl.processing.tiling import closest_grid

    smallest = {}
    for task in ("colour", "shape", "count", "position", "grounding", "ocr", "multi_image"):
        n_max = TASKS[task].max_dynamic_patch
        sides = []
        for rec in read_records(world, "train", task):
            if task == "multi_image":
                views = [
                    (w, h, objs, max(1, n_max // 2)) for (w, h), objs in zip(rec["sizes"], rec["objects"], strict=True)
                ]
            else:
                objs = [{"box": rec["text_box"]}] if task == "ocr" else rec["objects"]
                views = [(rec["width"], rec["height"], objs, n_max)]
            for w, h, objs, n in views:
                cols, rows = closest_grid(w, h, min_num=1, max_num=n, image_size=56)
                assert cols * rows <= n
                for obj in objs:
                    b = obj["box"]
                    sides.append(min((b[2] - b[0]) / 1000 * cols * 56, (b[3] - b[1]) / 1000 * rows * 56))
        smallest[task] = min(sides)
    assert min(smallest.values()) >= 6, smallest


def test_absolute_paths_resolve_from_any_directory(tmp_path: Path) -> None:
    out = tmp_path / "abs"
    generate_world(out, n_train=2, n_val=0, n_test=0, tasks=["shape"], absolute_paths=True)
    meta = json.loads((out / "train_meta.json").read_text())["synth_shape"]
    assert Path(meta["root"]).is_absolute() and Path(meta["annotation"]).is_file()
    rec = json.loads(Path(meta["annotation"]).read_text().splitlines()[0])
    assert (Path(meta["root"]) / rec["image"]).is_file()


# ---- ground truth agrees with the pixels ------------------------------------------------------------------


def test_object_boxes_are_tight_around_the_painted_pixels(world: Path) -> None:
    """Recompute every object's box from the image: it must contain all its pixels and be tight (≤ 1 px slack)."""
    checked = 0
    for task in ("colour", "shape", "count", "position", "grounding"):
        for rec in read_records(world, "test", task):
            arr = _pixels(world / "test" / task / rec["image"])
            h, w = arr.shape[:2]
            by_colour = collections.defaultdict(list)
            for obj in rec["objects"]:
                assert 0 <= obj["box"][0] < obj["box"][2] <= 1000 and 0 <= obj["box"][1] < obj["box"][3] <= 1000
                by_colour[obj["colour"]].append(obj["box"])
            for colour, boxes in by_colour.items():
                x1 = min(b[0] for b in boxes) * w / 1000
                y1 = min(b[1] for b in boxes) * h / 1000
                x2 = max(b[2] for b in boxes) * w / 1000
                y2 = max(b[3] for b in boxes) * h / 1000
                px = _colour_bbox(arr, COLOURS[colour])
                assert px is not None, rec["id"]
                assert x1 <= px[0] and y1 <= px[1] and px[2] <= x2 and px[3] <= y2, rec["id"]
                assert px[0] - x1 < 1 and px[1] - y1 < 1 and x2 - px[2] < 1 and y2 - px[3] < 1, rec["id"]
                for box in boxes:  # and each single box holds pixels of its colour
                    bx1, by1, bx2, by2 = _to_px(box, w, h)
                    patch = arr[math.ceil(by1) : int(by2), math.ceil(bx1) : int(bx2)]
                    assert _colour_bbox(patch, COLOURS[colour]) is not None, rec["id"]
            checked += 1
    assert checked == 5 * N_TEST


def test_answers_follow_from_the_geometry(world: Path) -> None:
    for rec in read_records(world, "test", "count"):
        boxes = [o["box"] for o in rec["objects"]]
        assert len(boxes) == int(rec["answer"])
        assert len({(o["colour"], o["shape"]) for o in rec["objects"]}) == 1  # identical objects
        for i, a in enumerate(boxes):
            assert all(box_iou(a, b) == 0 for b in boxes[i + 1 :])
    for rec in read_records(world, "test", "position"):
        a, b = (o["box"] for o in rec["objects"])
        w, h = rec["width"], rec["height"]
        ax1, ay1, ax2, ay2 = _to_px(a, w, h)
        bx1, by1, bx2, by2 = _to_px(b, w, h)
        dx, dy = (ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2
        expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert rec["answer"] == expected, rec["id"]
        gap_ok = {"left": ax2 <= bx1, "right": bx2 <= ax1, "above": ay2 <= by1, "below": by2 <= ay1}
        assert gap_ok[rec["answer"]], rec["id"]
        question = rec["conversations"][0]["value"]
        ca, cb = (o["colour"] for o in rec["objects"])
        assert ca != cb and question.index(ca) < question.index(cb)
    for rec in read_records(world, "test", "colour"):
        assert rec["objects"][0]["colour"] == rec["answer"]
    for rec in read_records(world, "test", "shape"):
        assert rec["objects"][0]["shape"] == rec["answer"]


def test_grounding_answers_are_well_formed_and_unique(world: Path) -> None:
    for rec in read_records(world, "test", "grounding"):
        assert rec["answer"] == box_answer(rec["ref"], rec["box"])
        assert rec["answer"] == f"<ref>{rec['ref']}</ref><box>[[{', '.join(map(str, rec['box']))}]]</box>"
        assert f"<ref>{rec['ref']}</ref>" in rec["conversations"][0]["value"]
        target = rec["objects"][0]
        assert rec["ref"] == f"the {target['colour']} {target['shape']}" and rec["box"] == target["box"]
        assert sum(o["colour"] == target["colour"] for o in rec["objects"]) == 1  # the reference is unambiguous
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in rec["box"])
        assert score("grounding", rec["answer"], rec)
    assert chance_level("grounding", read_records(world, "test", "grounding")) < 0.15


def test_ocr_ink_lies_inside_the_text_box(world: Path) -> None:
    for rec in read_records(world, "test", "ocr"):
        assert rec["answer"] in WORDS
        arr = _pixels(world / "test" / "ocr" / rec["image"])
        h, w = arr.shape[:2]
        dark = arr.astype(int).sum(-1) < 3 * 150
        ys, xs = np.nonzero(dark)
        assert len(xs) > 10, rec["id"]
        x1, y1, x2, y2 = _to_px(rec["text_box"], w, h)
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2, rec["id"]
        assert xs.max() - xs.min() > 0.3 * w  # large font: the word spans a good part of the width


def test_multi_image_answer_names_the_image_with_the_asked_colour(world: Path) -> None:
    for rec in read_records(world, "test", "multi_image"):
        question = rec["conversations"][0]["value"]
        asked = [c for c in COLOURS if c in question]
        assert len(asked) == 1
        present = [
            _colour_bbox(_pixels(world / "test" / "multi_image" / p), COLOURS[asked[0]]) is not None
            for p in rec["image"]
        ]
        assert present == [rec["answer"] == "Image-1", rec["answer"] == "Image-2"], rec["id"]


def test_video_object_moves_in_the_answered_direction(world: Path) -> None:
    for rec in read_records(world, "test", "video"):
        with av.open(str(world / "test" / "video" / rec["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        centres = []
        for arr in frames:  # lossy H.264: match the colour loosely and take the centroid
            mask = np.abs(arr.astype(int) - np.array(COLOURS[rec["colour"]])).max(-1) <= 60
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0, rec["id"]
            centres.append((xs.mean() / arr.shape[1], ys.mean() / arr.shape[0]))
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("up" if dy < 0 else "down")
        assert rec["answer"] == expected, rec["id"]
        assert max(abs(dx), abs(dy)) > 0.15
        steps = [c[0] if rec["answer"] in ("left", "right") else c[1] for c in centres]
        sign = 1 if rec["answer"] in ("right", "down") else -1
        assert all(sign * (b - a) >= -0.01 for a, b in itertools.pairwise(steps))  # monotone motion


# ---- balance and blindness --------------------------------------------------------------------------------


def test_balanced_labels_are_uniform_up_to_one() -> None:
    import random

    for n in (0, 5, 12, 100):
        labels = balanced(("a", "b", "c", "d", "e", "f"), n, random.Random(0))
        counts = collections.Counter(labels)
        assert len(labels) == n and (not counts or max(counts.values()) - min(counts.values()) <= 1)


def test_classes_are_balanced_in_every_split(world: Path) -> None:
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for task in VISION_TASKS:
            records = read_records(world, split, task)
            key = [r["objects"][0]["colour"] if task == "grounding" else r["answer"] for r in records]
            counts = collections.Counter(key)
            k = len(TASKS[task].choices) or len(COLOURS)
            assert len(records) == n
            assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(k, n), (split, task)


def test_question_alone_does_not_reveal_the_answer(tmp_path: Path) -> None:
    """A blind baseline (majority answer per question text, learned on train) stays near chance on test."""
    tasks = [t for t in VISION_TASKS if t not in ("grounding", "video")]
    out = tmp_path / "blind"
    generate_world(out, seed=1, n_train=96, n_val=0, n_test=48, image_size_range=(32, 48), tasks=tasks)
    for task in tasks:
        by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        overall = collections.Counter()
        for rec in read_records(out, "train", task):
            by_question[rec["conversations"][0]["value"]][rec["answer"]] += 1
            overall[rec["answer"]] += 1
        test = read_records(out, "test", task)
        hits = 0
        for rec in test:
            votes = by_question.get(rec["conversations"][0]["value"]) or overall
            hits += votes.most_common(1)[0][0] == rec["answer"]
        assert hits / len(test) <= TASKS[task].chance + 0.2, task


# ---- scoring ----------------------------------------------------------------------------------------------


def test_score_classification_normalises_lightly() -> None:
    rec = {"answer": "red"}
    assert score("colour", "red", rec) and score("colour", " Red. ", rec) and score("colour", "red, because", rec)
    assert not score("colour", "blue", rec) and not score("colour", "reddish", rec) and not score("colour", "", rec)
    assert score("count", "three", {"answer": "3"}) and not score("count", "13", {"answer": "3"})
    assert score("multi_image", "image-1", {"answer": "Image-1"}) and not score(
        "multi_image", "Image-2", {"answer": "Image-1"}
    )
    assert score("ocr", "'cake'", {"answer": "CAKE"})
    with pytest.raises(DataError, match="answer"):
        score("colour", "red", {"id": 1})


def test_box_parsing_and_iou_against_hand_computed_cases() -> None:
    assert parse_box("<ref>x</ref><box>[[1, 2, 300, 400]]</box>") == [1.0, 2.0, 300.0, 400.0]
    assert parse_box("[[10.5,20,30 , 40]] and [[0, 0, 1, 1]]") == [10.5, 20.0, 30.0, 40.0]
    assert parse_box("no box here [1, 2, 3, 4]") is None
    assert box_iou([0, 0, 100, 100], [0, 0, 100, 50]) == pytest.approx(0.5)
    assert box_iou([0, 0, 100, 100], [50, 50, 150, 150]) == pytest.approx(2500 / 17500)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([5, 5, 5, 9], [0, 0, 10, 10]) == 0.0  # degenerate
    rec = {"box": [0, 0, 100, 100]}
    assert score("grounding", "<ref>a</ref><box>[[0, 0, 100, 50]]</box>", rec)  # IoU exactly 0.5 counts
    assert not score("grounding", "<ref>a</ref><box>[[0, 0, 100, 49]]</box>", rec)  # IoU 0.49
    assert not score("grounding", "somewhere on the left", rec)


def test_chance_levels() -> None:
    assert chance_level("colour") == pytest.approx(1 / 6) and chance_level("multi_image") == 0.5
    centred = [{"box": [400, 400, 600, 600]}] * 3 + [{"box": [0, 0, 200, 200]}]
    assert chance_level("grounding", centred) == 0.75
    with pytest.raises(DataError, match="nope"):
        chance_level("nope")


# ---- corpus, errors, CLI ----------------------------------------------------------------------------------


def test_corpus_texts_cover_questions_and_answers(world: Path) -> None:
    texts = corpus_texts(world)
    joined = "\n".join(texts)
    assert "<image>" not in joined and "<video>" not in joined
    assert all(w in joined for w in WORDS) and all(c in joined for c in COLOURS)
    assert "Image-1:" in joined and "<box>[[" in joined and "What number comes after 3?" in joined
    assert len(texts) == 2 * len(read_records(world, "train"))  # held-out text stays out of a tokenizer's corpus
    everything = corpus_texts(world, ("train", "val", "test"))
    assert len(everything) == 2 * sum(len(read_records(world, s)) for s in ("train", "val", "test"))
    test_questions = {r["conversations"][0]["value"].replace("<image>", "").replace("<video>", "").strip()
                      for r in read_records(world, "test")}  # fmt: skip
    assert test_questions and test_questions <= set(everything)
    with pytest.raises(ConfigError, match="unknown splits"):
        corpus_texts(world, ("tset",))
    assert corpus_texts(world, "train") == texts  # one split may be named bare
    with pytest.raises(ConfigError, match=r"unknown splits \['tset'\]"):
        corpus_texts(world, "tset")


def test_bad_arguments_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colours"):
        generate_world(tmp_path / "x", tasks=["colours"])
    with pytest.raises(ConfigError, match="image_size_range"):
        generate_world(tmp_path / "x", image_size_range=(300, 200))
    with pytest.raises(ConfigError, match="n_val"):
        generate_world(tmp_path / "x", n_val=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        generate_world(tmp_path / "busy", n_train=1, n_val=0, n_test=0)
    with pytest.raises(DataError, match="not a synthetic world"):
        generate_world(tmp_path / "busy", n_train=1, n_val=0, n_test=0, overwrite=True)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_a_world_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "w"
    generate_world(out, n_train=6, n_val=0, n_test=0, tasks=["colour"])
    summary = generate_world(out, n_train=2, n_val=0, n_test=0, tasks=["shape"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["train", "train_meta.json", "world.json"]
    assert len(read_records(out, "train")) == 2 and summary.n_records == 2
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_cell_grid_prefers_square_cells() -> None:
    assert cell_grid((300, 300)) == (3, 3)
    assert cell_grid((200, 100)) == (4, 2)
    assert cell_grid((100, 200)) == (2, 4)
    assert cell_grid((200, 200), 4) == (2, 2)


def test_cli_synth_writes_a_world(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ivl.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        ["synth", "--out", str(out), "--seed", "2", "--train", "3", "--val", "1", "--test", "2", "--tasks", "ocr,text"],
    )
    assert result.exit_code == 0, result.output
    assert "train: 6 records" in result.output
    world = json.loads((out / "world.json").read_text())
    assert world["seed"] == 2 and world["tasks"] == ["ocr", "text"]
    assert world["counts"] == {"train": {"ocr": 3, "text": 3}, "val": {"ocr": 1}, "test": {"ocr": 2}}


# ---- follow-up questions ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_with_follow_ups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_follow") / "world"
    generate_world(out, seed=3, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, follow_ups=2)
    return out


def test_follow_ups_keep_media_and_first_turn_and_leave_eval_splits_alone(
    world: Path, world_with_follow_ups: Path
) -> None:
    plain, extended = _digest(world), _digest(world_with_follow_ups)
    images = [k for k in plain if k.endswith(".png")]
    assert images and [k for k in images if plain[k] != extended.get(k)] == []
    # videos are compared through their records: under xdist the first MP4 a worker encodes was seen to differ
    # between two encodes of the same frames (encoder state, not the generator; to be investigated)
    for split in ("val", "test"):
        assert read_records(world, split) == read_records(world_with_follow_ups, split)
    before, after = read_records(world, "train"), read_records(world_with_follow_ups, "train")
    assert [r["id"] for r in before] == [r["id"] for r in after]
    turns = collections.Counter()
    for old, new in zip(before, after, strict=True):
        assert new["conversations"][:2] == old["conversations"] and new["answer"] == old["answer"]
        n = len(new["conversations"])
        assert n % 2 == 0 and 2 <= n <= 6
        assert [t["from"] for t in new["conversations"]] == ["human", "gpt"] * (n // 2)
        assert all("<image>" not in t["value"] and "<video>" not in t["value"] for t in new["conversations"][2:])
        turns[new["task"]] += n // 2 - 1
    # every task that can ask more about its media does so; OCR and text have nothing more to ask
    assert all(turns[t] > 0 for t in ("colour", "shape", "count", "position", "grounding", "multi_image", "video"))
    assert turns["ocr"] == turns["text"] == 0
    assert json.loads((world_with_follow_ups / "world.json").read_text())["follow_ups"] == 2


def test_follow_up_answers_follow_from_the_ground_truth(world_with_follow_ups: Path) -> None:
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    checked = collections.Counter()
    for record in read_records(world_with_follow_ups, "train"):
        conv, task, objects = record["conversations"], record["task"], record.get("objects")
        for question, answer in zip(conv[2::2], conv[3::2], strict=True):
            q, a = question["value"], answer["value"]
            earlier = " ".join(t["value"] for t in conv[: conv.index(question)] if t["from"] == "human")
            if task in ("colour", "shape", "count", "video"):
                truth = objects[0] if objects else {"colour": record["colour"], "shape": record["shape"]}
                asked = "colour" if "colour" in q else "shape"
                assert a == truth[asked], record["id"]
                assert a not in earlier.lower(), f"{record['id']}: the follow-up's answer is in an earlier question"
            elif task == "position":
                assert a == opposite[record["answer"]]
                b_obj = objects[1]
                assert f"the {b_obj['colour']} {b_obj['shape']} relative to" in q or q.startswith(
                    f"Is the {b_obj['colour']} {b_obj['shape']}"
                )
            elif task == "grounding":
                ref, box = a[a.index("<ref>") + 5 : a.index("</ref>")], parse_box(a)
                match = [o for o in objects if f"the {o['colour']} {o['shape']}" == ref]
                assert len(match) == 1 and match[0]["box"] == box and ref in q and ref != record["ref"]
            elif task == "multi_image":
                assert a != record["answer"] and a in ("Image-1", "Image-2")
                other = objects[0 if a == "Image-1" else 1][0]["colour"]
                assert re.search(rf"\b{other}\b", q)
            checked[task] += 1
    assert len(checked) == 7
