"""Metrics against hand-computed cases (each expected number is worked out in the comment next to it)."""

from __future__ import annotations

import pytest

from ivl.errors import DataError
from ivl.evaluation.metrics import (
    aggregate_by,
    anls,
    box_iou,
    choice_accuracy,
    circular_accuracy,
    exact_match,
    get_metric,
    grounding_hit,
    levenshtein,
    parse_box,
    pope_scores,
    relaxed_accuracy,
    rotate_choices,
    vqa_accuracy,
)


def test_exact_match() -> None:
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("  RED car ", "red car") == 1.0
    assert exact_match("red", ["blue", "green"]) == 0.0


@pytest.mark.parametrize(
    ("answers", "pred", "expected"),
    [
        (["yes"] * 10, "yes", 1.0),  # 9 matches in every subset → min(1, 9/3) = 1
        (["red"] * 2 + ["blue"] * 8, "red", 0.6),  # 2 subsets · 1/3 + 8 subsets · 2/3 = 6 → /10
        (["red"] * 3 + ["blue"] * 7, "red", 0.9),  # 3 · 2/3 + 7 · 1 = 9 → /10
        (["red"] * 4 + ["blue"] * 6, "red", 1.0),  # ≥ 3 matches in every subset
        (["red"] * 1 + ["blue"] * 9, "red", 0.3),  # 1 · 0 + 9 · 1/3 = 3 → /10
        (["blue"] * 10, "red", 0.0),
        (["2 dogs"] * 10, "Two dogs.", 1.0),  # normalisation on both sides
        (["cat"], "The cat", 1.0),  # one reference: normalised exact match
    ],
)
def test_vqa_accuracy(answers: list[str], pred: str, expected: float) -> None:
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_accuracy_needs_a_reference() -> None:
    with pytest.raises(DataError):
        vqa_accuracy("x", [])


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("hello", ["hallo"], 0.8),  # 1 edit / 5 chars → NL 0.2
        ("abc", ["xyz"], 0.0),  # NL 1
        ("abxy", ["abcd"], 0.0),  # NL exactly 0.5 is not < τ → 0
        ("abcx", ["abcd"], 0.75),  # NL 0.25
        ("HeLLo  World", ["hello world"], 1.0),  # case and whitespace folded
        ("hallo", ["xyz", "hello"], 0.8),  # best reference counts
        ("", [""], 1.0),
    ],
)
def test_anls(pred: str, answers: list[str], expected: float) -> None:
    assert anls(pred, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("10.4", ["10"], 1.0),  # 4 % off
        ("10.5", ["10"], 1.0),  # exactly 5 % off still counts
        ("10.6", ["10"], 0.0),  # 6 % off
        ("5%", ["0.05"], 1.0),  # percent is /100
        ("0.0", ["0"], 0.0),  # zero reference: string comparison (official quirk)
        ("Yes", ["yes"], 1.0),
        ("12", ["x", "12.3"], 1.0),  # best reference
        ("abc", ["12"], 0.0),
    ],
)
def test_relaxed_accuracy(pred: str, answers: list[str], expected: float) -> None:
    assert relaxed_accuracy(pred, answers) == expected


def test_choice_accuracy() -> None:
    options = {"A": "dog", "B": "cat"}
    assert choice_accuracy("(B) cat", "B", options) == 1.0
    assert choice_accuracy("A", "b", options) == 0.0
    assert choice_accuracy("no idea", "A", options) == 0.0


def test_rotate_choices() -> None:
    options = {"A": "x", "B": "y", "C": "z"}
    assert rotate_choices(options, "B", 0) == (options, "B")
    assert rotate_choices(options, "B", 1) == ({"A": "y", "B": "z", "C": "x"}, "A")
    assert rotate_choices(options, "B", 2) == ({"A": "z", "B": "x", "C": "y"}, "C")
    with pytest.raises(DataError, match="'E'"):
        rotate_choices(options, "E", 1)


def test_circular_accuracy() -> None:
    correct = [True, True, False, True, True, True]
    groups = ["q1", "q1", "q1", "q2", "q2", "q2"]
    assert circular_accuracy(correct, groups) == 0.5  # q1 fails one rotation, q2 passes all


def test_pope_scores() -> None:
    preds = ["yes", "no", "Yes, there is", "No.", "There is not a dog.", "yes"]
    labels = ["yes", "no", "no", "yes", "no", "yes"]
    # parsed: yes no yes no no yes → TP 2 (0, 5), FP 1 (2), TN 2 (1, 4), FN 1 (3)
    got = pope_scores(preds, labels)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["yes_ratio"] == pytest.approx(3 / 6)
    with pytest.raises(DataError, match="maybe"):
        pope_scores(["yes"], ["maybe"])


def test_pope_scores_unbalanced() -> None:
    # always "yes": TP 1, FP 3 → precision 1/4, recall 1, F1 = 2·(1/4)/(5/4) = 0.4
    got = pope_scores(["yes"] * 4, ["yes", "no", "no", "no"])
    assert got["f1"] == pytest.approx(0.4) and got["yes_ratio"] == 1.0


def test_parse_box_scales_to_pixels() -> None:
    text = "<ref>the cat</ref><box>[[100, 200, 500, 600]]</box>"
    assert parse_box(text, 200, 100) == pytest.approx((20.0, 20.0, 100.0, 60.0))
    assert parse_box("[[0.1, 0.2, 0.5, 0.6]]", 200, 100) == pytest.approx((20.0, 20.0, 100.0, 60.0))
    assert parse_box("no box here", 10, 10) is None
    assert parse_box("<box>[[1,2,3]]</box> [[10, 20, 30, 40]]", 1000, 1000) == pytest.approx((10, 20, 30, 40))


def test_box_iou() -> None:
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)  # 50 / 150
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_grounding_hit_threshold() -> None:
    # image 100×100, so 0–1000 coordinates are tenths of a pixel
    assert grounding_hit("<box>[[0, 0, 100, 100]]</box>", (0, 0, 10, 10), 100, 100) == 1.0
    assert grounding_hit("<box>[[0, 0, 100, 50]]</box>", (0, 0, 10, 10), 100, 100) == 1.0  # IoU exactly 0.5
    assert grounding_hit("<box>[[0, 0, 100, 40]]</box>", (0, 0, 10, 10), 100, 100) == 0.0  # IoU 0.4
    assert grounding_hit("I cannot see it", (0, 0, 10, 10), 100, 100) == 0.0


def test_metric_registry_and_aggregation() -> None:
    mc = get_metric("multiple_choice_circular")
    refs = [
        {"id": "q1@0", "group": "q1", "rotation": 0, "answers": ["A"], "choices": {"A": "x", "B": "y"}},
        {"id": "q1@1", "group": "q1", "rotation": 1, "answers": ["B"], "choices": {"A": "y", "B": "x"}},
        {"id": "q2@0", "group": "q2", "rotation": 0, "answers": ["B"], "choices": {"A": "x", "B": "y"}},
        {"id": "q2@1", "group": "q2", "rotation": 1, "answers": ["A"], "choices": {"A": "y", "B": "x"}},
    ]
    preds = ["A", "B", "B", "B"]  # q1 right twice; q2 right, then wrong
    records = [
        {**r, **mc.score_item(p, r), "category": "c1" if r["group"] == "q1" else "c2"}
        for p, r in zip(preds, refs, strict=True)
    ]
    assert mc.aggregate(records) == {"circular_accuracy": 0.5, "accuracy": 1.0}
    assert aggregate_by(records, mc) == {
        "c1": {"circular_accuracy": 1.0, "accuracy": 1.0},
        "c2": {"circular_accuracy": 0.0, "accuracy": 1.0},
    }
    pope = get_metric("pope")
    rec = pope.score_item("No, there is not", {"answers": ["no"]})
    assert rec == {"score": 1.0, "pred_label": "no", "label": "no"}
    grounding = get_metric("grounding")
    rec = grounding.score_item("<box>[[0,0,500,500]]</box>", {"box": [0, 0, 50, 50], "image_size": [100, 100]})
    assert rec["score"] == 1.0 and rec["iou"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="'box'"):
        grounding.score_item("x", {"id": "g1", "image_size": [1, 1]})
    with pytest.raises(DataError, match="unknown metric"):
        get_metric("bleu")
