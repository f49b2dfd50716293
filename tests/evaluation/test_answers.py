"""Answer normalisation and extraction against hand-worked cases."""

from __future__ import annotations

import pytest

from ivl.evaluation.answers import (
    canonical_answer,
    extract_choice,
    extract_final_answer,
    extract_number,
    normalize_anls,
    normalize_text,
    normalize_vqa_answer,
    parse_yes_no,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("the cat", "cat"),  # article
        ("An Apple", "apple"),  # article, case
        ("dont", "don't"),  # contraction restored
        ("hello-world", "hello world"),  # mark not touching a space becomes a space
        ("yes - no", "yes no"),  # mark touching a space is deleted
        ("1,000", "1000"),  # digit-comma-digit: all marks deleted
        ("3.5", "3.5"),  # period before a digit survives
        ("  ten\tpeople\n", "10 people"),
        ("none", "0"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_normalize_anls_and_text() -> None:
    assert normalize_anls("  HeLLo   World ") == "hello world"
    assert normalize_text(" 'Paris.' ") == "paris"
    assert normalize_text("Red car!") == "red car"
    assert normalize_text("U.S.A") == "u.s.a"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Let's look.\nThere are 3 red circles.\nAnswer: B", "B"),
        ("reasoning\nAnswer: \\boxed{42}", "42"),
        ("so we get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
        ("Step 1...\n**Answer:** C", "C"),
        ("The final answer is: 7.", "7"),
        ("Answer: A\nWait, no.\nAnswer: D", "D"),  # the last Answer line wins
        ("  just a direct reply  ", "just a direct reply"),  # no marker: whole reply
        ("Answer: 'blue'", "blue"),
    ],
)
def test_extract_final_answer(reply: str, expected: str) -> None:
    assert extract_final_answer(reply) == expected


OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", "B"),
        ("(C) a bird", "C"),
        ("D.", "D"),
        ("The answer is D.", "D"),
        ("I would pick option C here", "C"),
        ("I think it is a cat", "B"),  # option text, no letter
        ("Maybe B", "B"),  # one standalone letter
        ("B or C", None),  # two letters: undecidable
        ("hmm", None),
        ("", None),
        ("E", None),  # not an option
    ],
)
def test_extract_choice(reply: str, expected: str | None) -> None:
    assert extract_choice(reply, OPTIONS) == expected


def test_extract_choice_prefers_most_specific_option_text() -> None:
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("it is dark red", options) == "B"
    assert extract_choice("red and blue", options) is None
    assert extract_choice("b", ["A", "B"]) is None  # lower-case letters are words, not options


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,234.5", 1234.5), ("it is -3", -3.0), ("50%", 0.5), ("three apples", 3.0), ("from 2 to 7", 7.0), ("no", None)],
)
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. No other objects.", "yes"),  # only the first sentence counts
        ("Not at all", "no"),
        ("a cat", "yes"),  # anything without no/not is yes (official rule)
    ],
)
def test_parse_yes_no(reply: str, expected: str) -> None:
    assert parse_yes_no(reply) == expected


def test_canonical_answer_kinds() -> None:
    assert canonical_answer("(B)", "letter", OPTIONS) == canonical_answer("The answer is B", "letter", OPTIONS) == "B"
    assert canonical_answer("3", "number") == canonical_answer("three", "number") == canonical_answer("3.0", "number")
    assert canonical_answer("The Cat.", "phrase") == canonical_answer("cat", "phrase") == "cat"
    assert canonical_answer("No, it is not", "yesno") == "no"
    assert canonical_answer("   ", "phrase") is None
    assert canonical_answer("what", "letter", OPTIONS) is None
