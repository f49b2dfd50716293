"""Precision / recall of the rule-based filters on the synthetic world with injected defects, plus throughput.

Data: ``ivl.data.synthetic.generate_world`` (the demo's world: 9 tasks, images, videos, text), a share of its
answers rewritten into long-form clean variants (step-by-step, markdown tables, code, multilingual) so the
text rules meet hard negatives, then one known defect injected into ``--rate`` of the records per defect type.

Peer, in the same run: the official InternVL repetition check (whitespace 10-grams, distinct repeated
n-grams / n-gram positions > 0.4), on the same repetitive records and for throughput; ratios are printed.

    .venv/bin/python bench/filter_quality.py [--per-task 300] [--rate 0.03] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from ivl.data.synthetic import generate_world
from ivl.filtering.config import DEFAULT_CHAIN, FilterConfig, InputSpec
from ivl.filtering.pipeline import run_filter
from ivl.filtering.rules import RecordParseError, build_rule, parse_line

FILLER = [
    "The background is plain and evenly lit.",
    "Nothing else in the picture competes for attention.",
    "Its edges are sharp, so the outline is easy to trace.",
    "I compare the candidates one by one before deciding.",
    "The colours are saturated and easy to tell apart.",
    "A careful look at the corners confirms there is no other object.",
    "Sizes are given in pixels of the original image.",
    "Coordinates are normalised to a 0-1000 grid.",
    "This matches the wording of the question.",
    "The remaining options can be ruled out quickly.",
    "Counting twice gives the same total, which is reassuring.",
    "Relative positions are judged from the centres of the boxes.",
]
SENTENCES = [
    "the shape in the middle of the picture is clearly visible",
    "I think the answer should be checked again carefully now",
    "the model keeps describing the same object over and over",
    "there is a small red circle next to the large blue square",
    "we can see that the total number of objects is four",
    "this is the final answer to the question above",
]
CJK = ["答案是红色。", "这个图形是圆形", "我们再看一遍图片。", "结果相同", "はい、そうです。"]
WORDS = [
    "red",
    "green",
    "blue",
    "shape",
    "circle",
    "square",
    "cross",
    "triangle",
    "left",
    "right",
    "above",
    "below",
    "image",
    "object",
    "small",
    "large",
    "near",
    "far",
]


# ------------------------------------------------------------------ clean long-form variants


def long_form(rng: random.Random, rec: dict[str, Any]) -> None:
    """Rewrite the answer into a longer clean style that must pass every text rule."""
    answer = rec["conversations"][-1]["value"]
    objects = rec.get("objects") or []
    if objects and isinstance(objects[0], list):
        objects = [o for group in objects for o in group]
    style = rng.choice(
        ["steps", "table", "code", "multilingual"] if rec.get("task") == "text" else ["steps", "table", "multilingual"]
    )
    if style == "steps":
        lines = ["Let me work through this step by step."]
        for i, obj in enumerate(objects[:6], 1):
            lines.append(f"{i}. Object {i} is a {obj['colour']} {obj['shape']} inside the box {obj['box']}.")
        lines += rng.sample(FILLER, rng.randint(2, 5))
        lines.append(f"So the answer is {answer}.")
        text = "\n".join(lines)
    elif style == "table":
        rows = [f"| {i} | {o['colour']} | {o['shape']} | {o['box']} |" for i, o in enumerate(objects[:8], 1)] or [
            "| 1 | - | - | - |"
        ]
        text = "Here is what the image contains:\n\n| # | colour | shape | box |\n|---|---|---|---|\n" + "\n".join(rows)
        text += f"\n\nFrom the table, the answer is {answer}. " + " ".join(rng.sample(FILLER, 2))
    elif style == "code":
        text = (
            f"The answer is {answer}. In code:\n\n```python\ndef answer() -> str:\n    return {answer!r}\n\n\n"
            "def check() -> None:\n    assert answer() == answer()\n    print('ok')\n```\n\nThe totals are 1,000,000 and 2,500,000 (0.05 of 100)."
        )
    else:
        text = f"{answer}. Die Antwort lautet „{answer}“. La réponse est « {answer} ». 答案是{answer}。Ünïcödé ✓ — 10 000 m²."
    rec["conversations"][-1]["value"] = text


# ------------------------------------------------------------------ defect injectors (each returns False if not applicable)


def set_answer(rec: dict[str, Any], text: str) -> None:
    rec["conversations"][-1]["value"] = text


def answer(rec: dict[str, Any]) -> str:
    return rec["conversations"][-1]["value"]


def inj_loop_words(rng, rec, media):
    sentence = rng.choice(SENTENCES)
    k = rng.randint(3, 25)
    if rng.random() < 0.3 and len(answer(rec).split()) >= 20:
        set_answer(rec, " ".join([answer(rec)] * rng.randint(2, 4)))
    else:
        set_answer(rec, answer(rec) + " " + " ".join([sentence] * k))
    return True


def inj_loop_nospace(rng, rec, media):
    if rng.random() < 0.7:
        unit = rng.choice(CJK)
        set_answer(rec, answer(rec) + unit * max(10, math.ceil(rng.randint(60, 300) / len(unit))))
    else:
        set_answer(rec, answer(rec) + " " + rng.choice(["ha", "lol", "ok!"]) * rng.randint(30, 100))
    return True


def inj_dup_lines(rng, rec, media):
    lines = [
        f"- The {rng.choice(WORDS)} {rng.choice(WORDS)} is {rng.choice(WORDS)} of item {i}."
        for i in range(rng.randint(3, 6))
    ]
    block = lines * rng.randint(2, 4)
    set_answer(rec, answer(rec) + "\n" + "\n".join(block))
    return True


def inj_char_run(rng, rec, media):
    text = answer(rec)
    cut = rng.randint(0, len(text))
    set_answer(rec, text[:cut] + rng.choice("!*a=.-_#?~") * rng.randint(60, 300) + text[cut:])
    return True


def inj_zero_run(rng, rec, media):
    k = rng.randint(40, 200)
    run = rng.choice(
        ["0" * k, "0 " * k, "0, " * k, "0." + "0" * k + "1", "\n".join(" ".join(["0"] * 8) for _ in range(k // 8))]
    )
    set_answer(rec, answer(rec) + " " + run)
    return True


def inj_bad_length(rng, rec, media):
    if rng.random() < 0.7:
        set_answer(rec, rng.choice(["", " ", "\n\n"]))
    else:
        words = [rng.choice(WORDS) for _ in range(9000)]
        set_answer(rec, ". ".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)) + ".")
    return True


def inj_run_on(rng, rec, media):
    set_answer(rec, answer(rec) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(250, 600))))
    return True


def inj_encoding(rng, rec, media):
    kind = rng.random()
    text = answer(rec) + " café déjà vu — “done”"
    if kind < 0.5:
        set_answer(rec, text.encode("utf-8").decode("cp1252", errors="replace"))
    elif kind < 0.75:
        cut = rng.randint(0, len(text))
        set_answer(rec, text[:cut] + rng.choice("\x00\x07\x1b\x08") + text[cut:])
    else:
        set_answer(rec, text.replace("é", "\ufffd"))
    return True


def inj_placeholder(rng, rec, media):
    first = rec["conversations"][0]
    images = rec.get("image")
    if isinstance(images, list) and rng.random() < 0.5:
        first["value"] = first["value"].replace("<image>", "", 1)
    elif "video" in rec or images is None:
        first["value"] = "<image>\n" + first["value"]
    elif rng.random() < 0.5:
        first["value"] = first["value"] + " <image>"
    else:
        set_answer(rec, answer(rec) + " <image>")
    return True


def inj_turn_order(rng, rec, media):
    convs = rec["conversations"]
    kind = rng.random()
    if kind < 0.4:
        convs.reverse()
    elif kind < 0.7:
        convs.append({"from": "human", "value": "And why?"})
    else:
        convs.insert(1, {"from": "human", "value": "Please answer."})
    return True


def _image_file(rng, rec, media):
    images = rec.get("image")
    if images is None:
        return None
    return Path(rng.choice(images) if isinstance(images, list) else images)


def inj_media(rng, rec, media):
    path = Path(rec["video"]) if "video" in rec else _image_file(rng, rec, media)
    if path is None:
        return False
    kind = rng.random()
    if kind < 0.34:
        path.unlink()
    elif kind < 0.67:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    return True


def inj_degenerate(rng, rec, media):
    path = _image_file(rng, rec, media)
    if path is None:
        return False
    with Image.open(path) as img:
        size = img.size
    kind = rng.random()
    if kind < 0.4:
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    elif kind < 0.7:
        img = Image.open(path).convert("RGB").resize((rng.randint(2, 8), rng.randint(2, 8)))
    else:
        img = Image.open(path).convert("RGB").resize((rng.randint(500, 900), rng.randint(8, 20)))
    img.save(path)
    if isinstance(rec.get("image"), str) and "width" in rec:
        rec["width"], rec["height"] = img.size  # keep the declared size honest: only degeneracy is injected
    return True


INJECTORS = {
    "loop_words": (inj_loop_words, "ngram_repetition"),
    "loop_nospace": (inj_loop_nospace, "substring_loop"),
    "dup_lines": (inj_dup_lines, "duplicate_lines"),
    "char_run": (inj_char_run, "char_run"),
    "zero_run": (inj_zero_run, "zero_run"),
    "bad_length": (inj_bad_length, "answer_length"),
    "run_on": (inj_run_on, "sentence_length"),
    "encoding": (inj_encoding, "encoding"),
    "placeholder": (inj_placeholder, "image_placeholders"),
    "turn_order": (inj_turn_order, "turn_order"),
    "media": (inj_media, "media"),
    "degenerate": (inj_degenerate, "degenerate_image"),
    "parse": (None, "parse"),
}


# ------------------------------------------------------------------ build the dataset


def build(out: Path, per_task: int, rate: float, seed: int) -> tuple[Path, list[str | None]]:
    world = generate_world(
        out / "world", seed=seed, n_train=per_task, n_val=0, n_test=0, absolute_paths=True, overwrite=True
    )
    rng = random.Random(seed)
    records = []
    for entry in json.loads(world.meta_files["train"].read_text()).values():
        root = Path(entry["root"]) if entry["root"] else None
        for raw in Path(entry["annotation"]).read_text().splitlines():
            rec = json.loads(raw)
            for key in ("image", "video"):  # absolute media paths: one combined file, no per-dataset roots
                if key in rec:
                    rec[key] = [str(root / p) for p in rec[key]] if isinstance(rec[key], list) else str(root / rec[key])
            if rng.random() < 0.35:
                long_form(rng, rec)
            records.append(rec)
    rng.shuffle(records)
    truth: list[str | None] = [None] * len(records)
    n_each = max(20, round(rate * len(records)))
    free = list(range(len(records)))
    rng.shuffle(free)
    for name, (inject, _rule) in INJECTORS.items():
        done = 0
        while done < n_each and free:
            i = free.pop()
            if inject is None or inject(rng, records[i], out):
                truth[i] = name
                done += 1
    lines = []
    for rec, defect in zip(records, truth, strict=True):
        raw = json.dumps(rec, ensure_ascii=False).encode("utf-8")
        if defect == "parse":
            raw = raw[: rng.randint(5, len(raw) - 5)] if rng.random() < 0.7 else raw.replace(b'"gpt"', b'"gpt\xff"', 1)
        lines.append(raw + b"\n")
    path = out / "bench.jsonl"
    path.write_bytes(b"".join(lines))
    return path, truth


# ------------------------------------------------------------------ measure


def official_repetitive(raw: bytes, n: int = 10, threshold: float = 0.4) -> bool:
    """The official check, as its formula reads: any gpt answer whose repeated distinct n-grams / positions > 0.4."""
    for turn in json.loads(raw)["conversations"]:
        if turn["from"] != "gpt":
            continue
        words = turn["value"].split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams and sum(1 for c in Counter(grams).values() if c > 1) / len(grams) > threshold:
            return True
    return False


def per_rule_flags(path: Path, rule_names: list[str]) -> dict[str, set[int]]:
    rules = {name: build_rule(name) for name in rule_names}
    flags: dict[str, set[int]] = defaultdict(set)
    for i, raw in enumerate(path.read_bytes().splitlines(keepends=True)):
        try:
            sample = parse_line(raw, str(path), i + 1)
        except RecordParseError:
            flags["parse"].add(i)
            continue
        for name, rule in rules.items():
            if rule.check(sample) is not None:
                flags[name].add(i)
    return flags


def ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=300)
    parser.add_argument("--rate", type=float, default=0.03, help="share of records per defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="keep the generated data in this folder")
    args = parser.parse_args()

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ivl-filter-bench-"))
    try:
        path, truth = build(tmp, args.per_task, args.rate, args.seed)
        n = len(truth)
        defective = {i for i, t in enumerate(truth) if t}
        print(
            f"data: synthetic world (ivl.data.synthetic.generate_world, seed {args.seed}, {args.per_task}/task), {n} records, "
            f"{len(defective)} with one injected defect ({len(INJECTORS)} types x {Counter(truth)[next(iter(INJECTORS))]})\n"
        )

        rule_names = [r for r in DEFAULT_CHAIN if not r.startswith("llm_")]
        flags = per_rule_flags(path, rule_names)
        targets: dict[str, set[str]] = defaultdict(set)
        for defect, (_inj, rule) in INJECTORS.items():
            targets[rule].add(defect)
        targets["phrase_loop"].add("loop_words")  # two detectors for whitespace loops: share and back-to-back
        print(
            "| rule | target defect | n | recall | precision (vs any defect) | flags on clean | flags on other defects |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for rule in ["parse", *rule_names]:
            own = {i for i, t in enumerate(truth) if t in targets[rule]}
            got = flags.get(rule, set())
            print(
                f"| {rule} | {', '.join(sorted(targets[rule]))} | {len(own)} | {ratio(len(got & own), len(own)):.3f} | "
                f"{ratio(len(got & defective), len(got)):.3f} | {len(got - defective)} | {len((got & defective) - own)} |"
            )

        repetitive = {i for i, t in enumerate(truth) if t in ("loop_words", "loop_nospace")}
        lines = path.read_bytes().splitlines(keepends=True)
        official = set()
        for i, raw in enumerate(lines):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if official_repetitive(raw):
                    official.add(i)
        ours = (
            flags.get("ngram_repetition", set()) | flags.get("phrase_loop", set()) | flags.get("substring_loop", set())
        )
        print("\nrepetition peer, same records: recall on loop_words + loop_nospace, precision vs any defect")
        print(
            f"  ivl ngram_repetition + phrase_loop + substring_loop: recall {ratio(len(ours & repetitive), len(repetitive)):.3f}  "
            f"precision {ratio(len(ours & defective), len(ours)):.3f}"
        )
        ngram_only = flags.get("ngram_repetition", set())
        print(
            f"  ivl ngram_repetition alone (distinct denominator): recall {ratio(len(ngram_only & repetitive), len(repetitive)):.3f}"
        )
        print(
            f"  official check (positions denominator): recall {ratio(len(official & repetitive), len(repetitive)):.3f}  "
            f"precision {ratio(len(official & defective), len(official)):.3f}"
        )

        # chain throughput through the real pipeline (parse, rules, output writing, commits)
        timings = {}
        for workers in sorted({1, args.workers}):
            config = FilterConfig(
                inputs=[InputSpec(str(path))], output_dir=str(tmp / f"out{workers}"), workers=workers, chunk_size=256
            )
            start = time.perf_counter()
            summary = run_filter(config, restart=True)
            timings[workers] = n / (time.perf_counter() - start)
            caught = summary["rejected"]
        text_only = FilterConfig(
            inputs=[InputSpec(str(path))],
            output_dir=str(tmp / "text"),
            chunk_size=512,
            chain=[r for r in rule_names if r not in ("media", "degenerate_image")],
        )
        start = time.perf_counter()
        run_filter(text_only, restart=True)
        timings["text"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for raw in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                official_repetitive(raw)
        timings["official"] = n / (time.perf_counter() - start)
        rejected_ids = set()
        for wrapped in (tmp / "out1" / "rejected.jsonl").read_text().splitlines():
            rejected_ids.add(json.loads(wrapped)["line"] - 1)
        print(
            f"\nfull chain (first rejecting rule wins): rejected {caught} of {n}; recall {ratio(len(rejected_ids & defective), len(defective)):.3f}, "
            f"precision {ratio(len(rejected_ids & defective), len(rejected_ids)):.3f}"
        )
        load = os.getloadavg()[0]
        print(f"\nthroughput, records/s ({os.cpu_count()} CPUs, load average {load:.1f} during the run, one run each):")
        for workers in sorted(k for k in timings if isinstance(k, int)):
            print(f"  full rule chain incl. image decoding, {workers} worker(s): {timings[workers]:,.0f}")
        print(f"  text rules only (no media I/O), 1 worker: {timings['text']:,.0f}")
        print(f"  peer: official n-gram check alone (json + 10-grams), 1 process: {timings['official']:,.0f}")
        print(
            f"  ratio text chain / official check: {timings['text'] / timings['official']:.2f}; "
            f"full chain ({max(k for k in timings if isinstance(k, int))} workers) / official check: "
            f"{timings[max(k for k in timings if isinstance(k, int))] / timings['official']:.2f}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
