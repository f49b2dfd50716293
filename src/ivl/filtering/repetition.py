"""Repetition detectors: n-gram loops, duplicated lines, character runs and short-period loops.

The paper's motivation: a small share of repetitive answers teaches a model to loop, worst in long
chain-of-thought. Each detector is a pure function (tested on its own) wrapped by a named rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from ivl.errors import ConfigError
from ivl.filtering.rules import Flag, Rule, Sample, TextFields, check_fields_param, check_positive, register_rule

Denominator = Literal["distinct", "positions"]


def ngram_repetition_ratio(text: str, n: int = 10, denominator: Denominator = "distinct") -> float:
    """Share of whitespace-token n-grams that are repeated.

    Numerator: distinct n-grams occurring more than once. ``distinct`` divides by the number of distinct
    n-grams (the spec's wording: a loop scores ≈ 1). ``positions`` divides by the number of n-gram
    positions, as the official loader's code does; it tops out at 0.5 and *falls* as a loop gets longer
    (a sentence repeated 50 times scores ≈ p/len), so it misses exactly the long loops.
    """
    words = text.split()
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    repeated = sum(1 for c in counts.values() if c > 1)
    return repeated / (len(counts) if denominator == "distinct" else total)


def duplicate_line_ratio(text: str, min_chars: int = 10) -> tuple[float, int]:
    """(share of non-empty lines that repeat an earlier line, number of non-empty lines).

    Lines are compared after stripping; lines shorter than ``min_chars`` never count as duplicates, so
    code braces, ``---`` rules and table separators do not trip the rule.
    """
    lines = [s for s in (raw.strip() for raw in text.splitlines()) if s]
    if not lines:
        return 0.0, 0
    seen: set[str] = set()
    dups = 0
    for line in lines:
        if len(line) >= min_chars and line in seen:
            dups += 1
        seen.add(line)
    return dups / len(lines), len(lines)


def longest_char_run(text: str, skip_whitespace: bool = True) -> tuple[str, int]:
    """(character, length) of the longest run of one repeated character (whitespace skipped by default)."""
    best_char, best = "", 0
    pattern = r"(\S)\1*" if skip_whitespace else r"(.)\1*"
    for m in re.finditer(pattern, text, re.S):
        if m.end() - m.start() > best:
            best_char, best = m.group(1), m.end() - m.start()
    return best_char, best


def periodic_runs(
    seq: np.ndarray, min_period: int, max_period: int, min_repeats: int, min_span: int
) -> list[tuple[int, int, int]]:
    """(span, start, period) of every stretch of ``seq`` that repeats a unit of ``period`` items back to back
    at least ``min_repeats`` whole times over at least ``min_span`` items; longest first, shortest period first.

    A stretch has period p exactly where ``seq[i] == seq[i + p]`` holds for a run of consecutive i; all
    periods are compared in one vectorised pass (a sentinel pads the tail so windows never match past it).
    """
    n = len(seq)
    max_period = min(max_period, n - 1)
    if n == 0 or max_period < min_period:
        return []
    padded = np.concatenate([seq.astype(np.int64), np.full(max_period, -1, dtype=np.int64)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, max_period + 1)[:n]
    same = windows[:, min_period:] == windows[:, :1]  # [n, periods]: seq[i] == seq[i + p]
    flat = np.zeros((same.shape[1], n + 1), dtype=np.int8)
    flat[:, :n] = same.T
    edges = np.flatnonzero(np.diff(flat.ravel(), prepend=np.zeros(1, dtype=np.int8)))
    starts, ends = edges[::2], edges[1::2]
    rows, first = np.divmod(starts, n + 1)
    periods = rows + min_period
    spans = ends - starts + periods
    keep = (spans >= min_span) & (spans // periods >= min_repeats)
    found = sorted(zip((-spans[keep]).tolist(), periods[keep].tolist(), first[keep].tolist(), strict=True))
    return [(-neg_span, start, period) for neg_span, period, start in found]


#: Longest stretch searched in one piece; longer ones are searched at head and tail (bounded memory: the
#: vectorised search holds periods x length cells).
_MAX_SEARCH = 32768


def _head_and_tail(items: Sequence[Any]) -> list[Sequence[Any]]:
    if len(items) <= _MAX_SEARCH:
        return [items]
    return [items[: _MAX_SEARCH // 2], items[-(_MAX_SEARCH // 2) :]]


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _has_repeated_gram(items: Sequence[Any], k: int) -> bool:
    """Whether any k consecutive items occur twice: a cheap necessary condition for a long loop."""
    total = len(items) - k + 1
    if total < 2:
        return False
    grams = (
        zip(*(items[i:] for i in range(k)), strict=False)
        if not isinstance(items, str)
        else (items[i : i + k] for i in range(total))
    )
    return len(set(grams)) < total


def _guaranteed_overlap(min_span: int, min_repeats: int, cap: int) -> int:
    """A window length every qualifying loop is sure to repeat.

    A run of period p spanning s >= max(min_span, min_repeats * p) items matches itself shifted by p over
    s - p >= max((min_repeats - 1) * p, min_span - p) >= min_span * (min_repeats - 1) / min_repeats items.
    """
    return max(1, min(cap, min_span * (min_repeats - 1) // min_repeats))


def longest_substring_loop(
    text: str, min_period: int = 2, max_period: int = 30, min_repeats: int = 10, min_span: int = 50
) -> tuple[str, int]:
    """(unit, span in characters) of the longest run of a short unit repeated back to back inside one
    whitespace-free stretch of text.

    Catches loops that whitespace words cannot see (CJK text, "hahaha…", "ok!ok!ok!…"); loops of whole
    words are :func:`longest_phrase_loop`'s. Units without any letter or digit (rules, ellipses) and
    one-character units are ignored: :func:`longest_char_run` covers those.
    """
    best_unit, best = "", 0
    for token in (piece for whole in text.split() for piece in _head_and_tail(whole)):
        # A qualifying loop repeats an 8-character window; most stretches are rejected by that check alone.
        if len(token) < max(min_span, best + 1) or not _has_repeated_gram(
            token, _guaranteed_overlap(min_span, min_repeats, 8)
        ):
            continue
        for span, start, period in periodic_runs(_codepoints(token), min_period, max_period, min_repeats, min_span):
            unit = token[start : start + period]
            if any(ch.isalnum() for ch in unit) and len(set(unit)) > 1:
                if span > best:
                    best_unit, best = unit, span
                break
    return best_unit, best


def longest_phrase_loop(
    text: str, max_words: int = 64, min_repeats: int = 3, min_span: int = 24
) -> tuple[str, int, int]:
    """(phrase, times repeated, span in words) of the longest phrase of whitespace words repeated back to back.

    The official n-gram share is diluted by a long answer around a loop; a back-to-back repeat is not.
    """
    words = text.split()
    if len(words) > _MAX_SEARCH:
        return max(
            (longest_phrase_loop(" ".join(part), max_words, min_repeats, min_span) for part in _head_and_tail(words)),
            key=lambda r: r[2],
        )
    # Texts without a repeated 10-gram (nearly all clean ones) cannot hold a qualifying loop: skip the search.
    if len(words) < min_span or not _has_repeated_gram(words, _guaranteed_overlap(min_span, min_repeats, 10)):
        return "", 0, 0
    ids: dict[str, int] = {}
    seq = np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.int64, count=len(words))
    runs = periodic_runs(seq, 1, max_words, min_repeats, min_span)
    if not runs:
        return "", 0, 0
    span, start, period = runs[0]
    return " ".join(words[start : start + period]), span // period, span


# --------------------------------------------------------------------------------------------------------
# rules


@register_rule
@dataclass(kw_only=True)
class NgramRepetition(Rule):
    """The official rule: reject an answer whose repeated 10-gram share exceeds 0.4."""

    name = "ngram_repetition"
    n: int = 10
    threshold: float = 0.4
    denominator: Denominator = "distinct"
    fields: TextFields = "answers"

    def validate(self) -> None:
        super().validate()
        check_positive(self, n=self.n)
        check_fields_param(self, self.fields)
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"rule {self.name}: threshold must be in [0, 1], got {self.threshold!r}")
        if self.denominator not in ("distinct", "positions"):
            raise ConfigError(f"rule {self.name}: denominator must be distinct or positions, got {self.denominator!r}")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            ratio = ngram_repetition_ratio(text, self.n, self.denominator)
            if ratio > self.threshold:
                return self.flag(f"turn {turn}: {ratio:.2f} of {self.n}-grams repeated (> {self.threshold})", ratio)
        return None


@register_rule
@dataclass(kw_only=True)
class DuplicateLines(Rule):
    """Excessive duplicate lines in one text (copy-paste accidents, looping list items)."""

    name = "duplicate_lines"
    threshold: float = 0.3
    min_lines: int = 4
    min_line_chars: int = 10
    fields: TextFields = "all"

    def validate(self) -> None:
        super().validate()
        check_positive(self, min_lines=self.min_lines, min_line_chars=self.min_line_chars)
        check_fields_param(self, self.fields)
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"rule {self.name}: threshold must be in [0, 1], got {self.threshold!r}")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            ratio, n_lines = duplicate_line_ratio(text, self.min_line_chars)
            if n_lines >= self.min_lines and ratio > self.threshold:
                return self.flag(
                    f"turn {turn}: {ratio:.2f} of {n_lines} lines are duplicates (> {self.threshold})", ratio
                )
        return None


@register_rule
@dataclass(kw_only=True)
class CharRun(Rule):
    """A long run of one character ("!!!!…", "aaaa…", "____…"); whitespace runs are ignored."""

    name = "char_run"
    max_run: int = 50
    fields: TextFields = "all"

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_run=self.max_run)
        check_fields_param(self, self.fields)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        # Matches only runs longer than max_run, so clean text is scanned at C speed.
        return re.compile(rf"(\S)\1{{{self.max_run},}}")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            runs = [(m.end() - m.start(), m.group(1)) for m in self._pattern.finditer(text)]
            if runs:
                length, char = max(runs)
                return self.flag(f"turn {turn}: {char!r} repeated {length} times (> {self.max_run})", length)
        return None


@register_rule
@dataclass(kw_only=True)
class SubstringLoop(Rule):
    """A short unit repeated back to back many times (loops without spaces, e.g. CJK or "hahaha")."""

    name = "substring_loop"
    min_period: int = 2
    max_period: int = 30
    min_repeats: int = 10
    min_span: int = 50
    fields: TextFields = "answers"

    def validate(self) -> None:
        super().validate()
        check_positive(self, min_period=self.min_period, max_period=self.max_period, min_span=self.min_span)
        check_fields_param(self, self.fields)
        if self.min_repeats < 2 or self.max_period < self.min_period:
            raise ConfigError(f"rule {self.name}: need min_repeats >= 2 and max_period >= min_period")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            unit, span = longest_substring_loop(text, self.min_period, self.max_period, self.min_repeats, self.min_span)
            if span:
                return self.flag(f"turn {turn}: {unit!r} repeated over {span} characters", span)
        return None


@register_rule
@dataclass(kw_only=True)
class PhraseLoop(Rule):
    """A phrase of up to ``max_words`` words said ``min_repeats`` times back to back (degenerate decoding)."""

    name = "phrase_loop"
    max_words: int = 64
    min_repeats: int = 3
    min_span: int = 24
    fields: TextFields = "answers"

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_words=self.max_words, min_span=self.min_span)
        check_fields_param(self, self.fields)
        if self.min_repeats < 2:
            raise ConfigError(f"rule {self.name}: min_repeats must be >= 2, got {self.min_repeats}")

    def check(self, sample: Sample) -> Flag | None:
        for turn, text in sample.texts(self.fields):
            phrase, times, span = longest_phrase_loop(text, self.max_words, self.min_repeats, self.min_span)
            if span:
                shown = phrase if len(phrase) <= 80 else phrase[:77] + "..."
                return self.flag(f"turn {turn}: {shown!r} repeated {times} times in a row ({span} words)", span)
        return None
