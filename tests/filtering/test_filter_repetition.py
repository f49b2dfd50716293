"""Repetition detectors: hand-computed ratios, the official formula as an independent reference, rule verdicts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ivl.errors import ConfigError
from ivl.filtering.repetition import (
    duplicate_line_ratio,
    longest_char_run,
    longest_phrase_loop,
    longest_substring_loop,
    ngram_repetition_ratio,
    periodic_runs,
)
from ivl.filtering.rules import Sample, build_rule

WORDS = [f"w{i}" for i in range(30)]


def sample(answer: str, question: str = "Tell me something.") -> Sample:
    return Sample({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})


def official_ratio(text: str, n: int) -> float:
    """The official loader's formula, written out naively: distinct repeated n-grams / n-gram positions."""
    words = text.split()
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    repeated = {g for g in grams if grams.count(g) > 1}
    return len(repeated) / len(grams)


def test_ngram_ratio_hand_computed_duplicated_passage():
    # 30 distinct words written twice: 51 windows, 21 of them repeat (i and i+30), 30 distinct 10-grams.
    text = " ".join(WORDS + WORDS)
    assert ngram_repetition_ratio(text, 10, "distinct") == pytest.approx(21 / 30)
    assert ngram_repetition_ratio(text, 10, "positions") == pytest.approx(21 / 51)
    assert 21 / 51 > 0.4  # the official rule rejects a passage said twice


def test_ngram_ratio_long_loop_distinct_vs_official_quirk():
    # A 10-word sentence looped 20 times: 191 windows, 10 distinct, all repeated.
    text = " ".join(WORDS[:10] * 20)
    assert ngram_repetition_ratio(text, 10, "distinct") == 1.0
    assert ngram_repetition_ratio(text, 10, "positions") == pytest.approx(10 / 191)  # official code misses it


def test_ngram_ratio_short_and_unique_texts():
    assert ngram_repetition_ratio("one two three", 10) == 0.0
    assert ngram_repetition_ratio(" ".join(WORDS), 10) == 0.0
    assert ngram_repetition_ratio("", 10) == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_positions_mode_matches_official_formula(seed):
    rng = random.Random(seed)
    vocab = WORDS[: rng.randint(2, 30)]
    text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 120)))
    n = rng.randint(1, 12)
    assert ngram_repetition_ratio(text, n, "positions") == pytest.approx(official_ratio(text, n))


def test_duplicate_line_ratio():
    text = "alpha line one\nbeta line two\nalpha line one\n\n  alpha line one  \n}\n}\n"
    # non-empty lines: 6; duplicates of an earlier line with >= 10 chars: 2 ("}" is too short to count)
    assert duplicate_line_ratio(text, 10) == (pytest.approx(2 / 6), 6)
    assert duplicate_line_ratio("", 10) == (0.0, 0)


def test_longest_char_run():
    assert longest_char_run("abbbcc") == ("b", 3)
    assert longest_char_run("a" + " " * 40 + "b") == ("a", 1)  # whitespace runs are skipped
    assert longest_char_run("a" + " " * 40, skip_whitespace=False) == (" ", 40)
    assert longest_char_run("") == ("", 0)


def brute_force_runs(seq, min_period, max_period, min_repeats, min_span):
    """Maximal stretches with period p, found by extending from every start: the slow, obvious way."""
    found = set()
    n = len(seq)
    for p in range(min_period, max_period + 1):
        i = 0
        while i + p < n:
            if seq[i] != seq[i + p]:
                i += 1
                continue
            j = i
            while j + p < n and seq[j] == seq[j + p]:
                j += 1
            span = j - i + p
            if span >= min_span and span // p >= min_repeats:
                found.add((span, i, p))
            i = j
    return found


@pytest.mark.parametrize("seed", range(25))
def test_periodic_runs_matches_brute_force(seed):
    rng = random.Random(seed)
    alphabet = rng.randint(1, 4)
    seq = [rng.randrange(alphabet) for _ in range(rng.randint(0, 60))]
    if seq and rng.random() < 0.5:  # plant a loop
        unit = [rng.randrange(5) for _ in range(rng.randint(1, 6))]
        at = rng.randrange(len(seq))
        seq[at:at] = unit * rng.randint(2, 8)
    args = (rng.randint(1, 3), rng.randint(3, 9), rng.randint(1, 4), rng.randint(1, 12))
    got = periodic_runs(np.array(seq, dtype=np.int64), *args)
    assert set(got) == brute_force_runs(seq, *args)
    assert got == sorted(got, key=lambda r: (-r[0], r[2], r[1]))


def test_longest_phrase_loop():
    sentence = "there is a small red circle next to the large blue square"  # 12 words
    text = " ".join(WORDS) + ". " + " ".join([sentence] * 3) + " and then it"
    assert longest_phrase_loop(text) == (sentence, 3, 36)
    assert longest_phrase_loop(" ".join([sentence] * 2)) == ("", 0, 0)  # twice is not a loop
    assert longest_phrase_loop(" ".join(["very"] * 30))[1:] == (30, 30)
    assert longest_phrase_loop("no no no, " + " ".join(WORDS)) == ("", 0, 0)


def test_longest_substring_loop():
    assert longest_substring_loop("我是一个好人。" * 12) == ("我是一个好人。", 84)
    unit, span = longest_substring_loop("x" + "ha" * 30 + "!")
    assert (unit, span) == ("ha", 60)
    assert longest_substring_loop("| --- " * 20) == ("", 0)  # no letters or digits: a table rule, not a loop
    assert longest_substring_loop("x" + "ab" * 100000) == ("ab", 16384)  # huge stretches: head and tail searched
    assert longest_substring_loop("The quick brown fox jumps over the lazy dog. " * 2) == ("", 0)


@pytest.mark.parametrize(
    ("rule", "bad", "good"),
    [
        ("ngram_repetition", " ".join(WORDS[:12] * 10), " ".join(WORDS)),
        (
            "duplicate_lines",
            "\n".join(["- the same list item again"] * 6),
            "\n".join(f"- item number {i} here" for i in range(6)),
        ),
        ("char_run", "Wow" + "!" * 80, "Wow!!! that is a ---- separator"),
        ("substring_loop", "答案是" + "对的" * 40, "答案是对的。"),
        (
            "phrase_loop",
            "Sure. " + "I will check the picture again to be sure. " * 4,
            "I will check. I will check again later today, then we will see.",
        ),
    ],
)
def test_rules_flag_positive_and_pass_negative(rule, bad, good):
    r = build_rule(rule)
    flag = r.check(sample(bad))
    assert flag is not None and flag.filter == rule and flag.action == "reject" and flag.score is not None
    assert r.check(sample(good)) is None


def test_ngram_rule_checks_answers_only_by_default():
    looped = " ".join(WORDS[:12] * 10)
    assert build_rule("ngram_repetition").check(sample("fine answer", question=looped)) is None
    assert build_rule("ngram_repetition", {"fields": "all"}).check(sample("fine answer", question=looped)) is not None


def test_ngram_rule_threshold_and_official_mode():
    looped = " ".join(WORDS[:10] * 20)
    assert build_rule("ngram_repetition", {"denominator": "positions"}).check(sample(looped)) is None
    twice = " ".join(WORDS + WORDS)
    assert build_rule("ngram_repetition", {"denominator": "positions"}).check(sample(twice)) is not None
    assert build_rule("ngram_repetition", {"threshold": 0.8}).check(sample(twice)) is None  # 0.7 <= 0.8


def test_rule_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="threshold"):
        build_rule("ngram_repetition", {"threshold": 1.5})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_rule("char_run", {"max_runs": 3})
    with pytest.raises(ConfigError, match="unknown filter rule"):
        build_rule("no_such_rule")
    with pytest.raises(ConfigError, match="action"):
        build_rule("char_run", {"action": "drop"})
    with pytest.raises(ConfigError, match="fields"):
        build_rule("zero_run", {"fields": "answer"})


@pytest.mark.parametrize("seed", range(30))
def test_loop_finders_agree_with_unfiltered_search(seed):
    """The cheap repeated-window pre-check must never hide a loop the full periodic search would find."""
    rng = random.Random(seed)
    min_repeats, min_span = rng.randint(2, 5), rng.randint(4, 30)
    words = [rng.choice(WORDS[:6]) for _ in range(rng.randint(0, 40))]
    unit = [rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 8))]
    at = rng.randint(0, len(words))
    words[at:at] = unit * rng.randint(1, 6)
    text = " ".join(words)
    ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    runs = periodic_runs(np.array([ids[w] for w in words], dtype=np.int64), 1, 64, min_repeats, min_span)
    expected = runs[0][0] if runs else 0
    assert longest_phrase_loop(text, 64, min_repeats, min_span)[2] == expected
    token = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
    token = token + "xyz"[: rng.randint(2, 3)] * rng.randint(1, 20) + token[::-1]
    runs = [
        r
        for r in periodic_runs(np.array([ord(c) for c in token], dtype=np.int64), 2, 30, min_repeats, min_span)
        if len(set(token[r[1] : r[1] + r[2]])) > 1
    ]
    assert longest_substring_loop(token, 2, 30, min_repeats, min_span)[1] == (runs[0][0] if runs else 0)
