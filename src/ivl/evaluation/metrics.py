"""Benchmark metrics, each following the official scoring script of the benchmark it is named after.

Item-level functions take a prediction and the reference and return a score in [0, 1]; corpus-level
functions (POPE, circular multiple choice) take lists. ``METRICS`` wraps them in one shape for the runner:
``score_item(prediction, reference) -> dict`` and ``aggregate(records) -> dict``. Variants, where the
official scripts disagree, are documented on each function.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ivl.errors import DataError
from ivl.evaluation.answers import (
    extract_choice,
    normalize_anls,
    normalize_text,
    normalize_vqa_answer,
    parse_yes_no,
)

Box = tuple[float, float, float, float]


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


# --------------------------------------------------------------------------------------------------------
# item-level metrics


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1 if the prediction equals any reference after case/whitespace/trailing-punctuation folding."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) for a in _as_list(answers)))


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy: mean over the leave-one-out subsets of the references of min(1, #matches / 3).

    With the usual 10 answers this is the official VQA/TextVQA score (an answer given by 3 of the other 9
    annotators is fully right). Variant: prediction and references are always normalised (VLMEvalKit and
    the TextVQA/m4c evaluator do this; the original VQA script skips it when all 10 answers agree, which
    only matters for unnormalised references). A single reference degenerates to normalised exact match.
    """
    refs = [normalize_vqa_answer(a) for a in _as_list(answers)]
    if not refs:
        raise DataError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for held_out in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != held_out and ref == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA, InfoVQA; τ = 0.5).

    s = max over references of (1 − NL) where NL = edit distance / max(len) after lower-casing and
    whitespace folding; a best NL ≥ τ scores 0 (the ST-VQA/DocVQA definition). Two empty strings score 1.
    """
    pred = normalize_anls(prediction)
    best = 0.0
    for ref in _as_list(answers):
        gold = normalize_anls(ref)
        length = max(len(gold), len(pred))
        nl = 0.0 if length == 0 else levenshtein(gold, pred) / length
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


def _relaxed_float(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within 5 % relative error, anything else exact (case-insensitive).

    As in the official script, ``x%`` reads as x/100 and a reference of 0 falls back to string equality
    (relative error is undefined there). The best score over references counts.
    """
    pred = prediction.strip()
    pred_value = _relaxed_float(pred)
    for ref in _as_list(answers):
        ref = ref.strip()
        ref_value = _relaxed_float(ref)
        if pred_value is not None and ref_value:
            if abs(pred_value - ref_value) / abs(ref_value) <= tolerance:
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


def choice_accuracy(prediction: str, answer: str, choices: Mapping[str, str]) -> float:
    """1 if the option letter extracted from the prediction is the reference letter."""
    return float(extract_choice(prediction, choices) == answer.strip().upper())


# --------------------------------------------------------------------------------------------------------
# multiple-choice helpers: circular evaluation (MMBench)


def rotate_choices(choices: Mapping[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Circularly shift the option texts by ``shift`` places and remap the answer letter.

    Letter i of the result shows the option that had letter (i + shift) mod n, as in MMBench's
    circular copies; the correct option keeps its text, so its new letter is (old − shift) mod n.
    """
    letters = list(choices)
    texts = [choices[k] for k in letters]
    n = len(letters)
    if answer not in choices:
        raise DataError(f"answer {answer!r} is not one of the options {letters}")
    rotated = {letters[i]: texts[(i + shift) % n] for i in range(n)}
    return rotated, letters[(letters.index(answer) - shift) % n]


def circular_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> float:
    """MMBench CircularEval: a question counts only if every rotated copy of it is answered correctly."""
    if len(correct) != len(groups):
        raise DataError(f"circular_accuracy got {len(correct)} results for {len(groups)} group ids")
    verdict: dict[str, bool] = {}
    for ok, group in zip(correct, groups, strict=True):
        verdict[group] = verdict.get(group, True) and bool(ok)
    return sum(verdict.values()) / len(verdict) if verdict else 0.0


# --------------------------------------------------------------------------------------------------------
# POPE


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE accuracy / precision / recall / F1 with "yes" as the positive class, and the yes-ratio.

    Replies are read with :func:`parse_yes_no` (the official rule); labels must be yes/no.
    """
    if len(predictions) != len(labels):
        raise DataError(f"pope_scores got {len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred_text, label in zip(predictions, labels, strict=True):
        gold = label.strip().lower()
        if gold not in ("yes", "no"):
            raise DataError(f"POPE label must be yes or no, got {label!r}")
        pred = parse_yes_no(pred_text)
        if pred == "yes":
            tp, fp = (tp + 1, fp) if gold == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if gold == "no" else (tn, fn + 1)
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total if total else 0.0,
    }


# --------------------------------------------------------------------------------------------------------
# grounding

_BOX_BLOCK = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_FOUR_NUMBERS = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_box(text: str, width: float, height: float) -> Box | None:
    """First box of a reply, in pixels of a ``width`` × ``height`` image, or None if there is none.

    Looks inside the first ``<box>…</box>`` when present (else anywhere) for ``[x1, y1, x2, y2]`` in the
    0–1000 convention; as in the official RefCOCO evaluation, four numbers summing to < 4 are taken as
    already normalised to 0–1.
    """
    block = _BOX_BLOCK.search(text)
    match = _FOUR_NUMBERS.search(block.group(1) if block else text)
    if match is None and block is not None:
        match = _FOUR_NUMBERS.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    scale = 1.0 if x1 + y1 + x2 + y2 < 4 else 1000.0
    return (x1 / scale * width, y1 / scale * height, x2 / scale * width, y2 / scale * height)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(prediction: str, box: Sequence[float], width: float, height: float, iou: float = 0.5) -> float:
    """1 if the predicted box overlaps the reference pixel box with IoU ≥ ``iou`` (Acc@0.5)."""
    pred = parse_box(prediction, width, height)
    return float(pred is not None and box_iou(pred, box) >= iou)


# --------------------------------------------------------------------------------------------------------
# one interface for the runner


@dataclass(frozen=True)
class Metric:
    """A benchmark metric: per-item scoring, corpus aggregation, and the number reported as the score."""

    name: str
    primary: str
    score_item: Callable[[str, Mapping[str, Any]], dict[str, Any]]
    aggregate: Callable[[Sequence[Mapping[str, Any]]], dict[str, float]]


def _mean_of(key: str) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, float]]:
    def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return {key: sum(float(r["score"]) for r in records) / len(records) if records else 0.0}

    return aggregate


def _require(reference: Mapping[str, Any], key: str) -> Any:
    value = reference.get(key)
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        raise DataError(f"item {reference.get('id', '?')!r} has no {key!r}, which this metric needs")
    return value


def _text_metric(fn: Callable[[str, Sequence[str]], float]) -> Callable[[str, Mapping[str, Any]], dict[str, Any]]:
    return lambda pred, ref: {"score": fn(pred, _require(ref, "answers"))}


def _score_choice(pred: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    choices = _require(ref, "choices")
    letter = extract_choice(pred, choices)
    gold = str(_require(ref, "answers")[0]).strip().upper()
    return {"score": float(letter == gold), "pred_letter": letter}


def _aggregate_circular(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    if not records:
        return {"circular_accuracy": 0.0, "accuracy": 0.0}
    originals = [r for r in records if int(r.get("rotation", 0)) == 0]
    groups = [str(r.get("group", r.get("id"))) for r in records]
    return {
        "circular_accuracy": circular_accuracy([r["score"] >= 1.0 for r in records], groups),
        "accuracy": sum(r["score"] for r in originals) / len(originals) if originals else 0.0,
    }


def _score_pope(pred: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    label = str(_require(ref, "answers")[0]).strip().lower()
    got = parse_yes_no(pred)
    return {"score": float(got == label), "pred_label": got, "label": label}


def _aggregate_pope(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return pope_scores([r["pred_label"] for r in records], [r["label"] for r in records])


def _score_grounding(pred: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    box = _require(ref, "box")
    width, height = _require(ref, "image_size")
    parsed = parse_box(pred, width, height)
    iou = box_iou(parsed, box) if parsed is not None else 0.0
    return {"score": float(iou >= 0.5), "iou": iou, "pred_box": list(parsed) if parsed else None}


def _aggregate_grounding(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    n = len(records) or 1
    return {
        "accuracy@0.5": sum(r["score"] for r in records) / n,
        "mean_iou": sum(r["iou"] for r in records) / n,
    }


def _score_synthetic(pred: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    """The synthetic world's own scorer (``ivl.data.synthetic.score``), so demo numbers match its definition."""
    from ivl.data.synthetic import score

    record = _require(ref, "record")
    return {"score": float(score(str(record.get("task", ref.get("task"))), pred, record))}


METRICS: dict[str, Metric] = {
    "exact_match": Metric("exact_match", "accuracy", _text_metric(exact_match), _mean_of("accuracy")),
    "vqa_accuracy": Metric("vqa_accuracy", "vqa_accuracy", _text_metric(vqa_accuracy), _mean_of("vqa_accuracy")),
    "anls": Metric("anls", "anls", _text_metric(anls), _mean_of("anls")),
    "relaxed_accuracy": Metric(
        "relaxed_accuracy", "relaxed_accuracy", _text_metric(relaxed_accuracy), _mean_of("relaxed_accuracy")
    ),
    "multiple_choice": Metric("multiple_choice", "accuracy", _score_choice, _mean_of("accuracy")),
    "multiple_choice_circular": Metric(
        "multiple_choice_circular", "circular_accuracy", _score_choice, _aggregate_circular
    ),
    "pope": Metric("pope", "f1", _score_pope, _aggregate_pope),
    "grounding": Metric("grounding", "accuracy@0.5", _score_grounding, _aggregate_grounding),
    "synthetic": Metric("synthetic", "accuracy", _score_synthetic, _mean_of("accuracy")),
}


def get_metric(name: str) -> Metric:
    """Look a metric up by name, with an error that lists the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise DataError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def aggregate_by(records: Sequence[Mapping[str, Any]], metric: Metric, key: str = "category") -> dict[str, dict]:
    """Aggregate separately for each value of ``key`` (e.g. per category), sorted by that value."""
    buckets: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        buckets[str(record.get(key) or "")].append(record)
    return {name: metric.aggregate(buckets[name]) for name in sorted(buckets) if name}
