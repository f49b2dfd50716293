"""Majority voting over sampled answers (test-time scaling): pick the most frequent final answer.

Votes are counted on a canonical key (option letter, number, yes/no, normalised phrase) so that "B",
"(B)" and "The answer is B" count together. Ties go to the answer that reached the top count first in
sample order, so a vote is reproducible from the saved samples alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ivl.evaluation.answers import AnswerKind, canonical_answer, extract_final_answer


@dataclass(frozen=True)
class Vote:
    """Outcome of a vote: the winning key, a representative answer text, and the tally."""

    key: str | None
    answer: str
    count: int
    total: int
    tally: dict[str, int]


def majority_vote(keys: Sequence[str | None]) -> tuple[str | None, int]:
    """Most frequent non-None key and its count; ties go to the key whose first occurrence is earliest.

    Returns ``(None, 0)`` when every key is None (no sample gave a readable answer).
    """
    counts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_seen.setdefault(key, i)
    if not counts:
        return None, 0
    winner = min(counts, key=lambda k: (-counts[k], first_seen[k]))
    return winner, counts[winner]


def vote_answers(
    replies: Sequence[str],
    kind: AnswerKind,
    choices: Mapping[str, str] | None = None,
    chain_of_thought: bool = True,
) -> Vote:
    """Vote over K sampled replies.

    Each reply is reduced to its final answer (``Answer: X`` line when ``chain_of_thought``), then to a
    canonical key. The returned ``answer`` is the final-answer text of the first reply that voted for the
    winner, so it can be scored exactly like a single direct prediction. With no readable answer at all the
    first reply's final answer is returned (and scored as such).
    """
    finals = [extract_final_answer(r) if chain_of_thought else r.strip() for r in replies]
    keys = [canonical_answer(f, kind, choices) for f in finals]
    winner, count = majority_vote(keys)
    tally: dict[str, int] = {}
    for key in keys:
        if key is not None:
            tally[key] = tally.get(key, 0) + 1
    if winner is None:
        return Vote(None, finals[0] if finals else "", 0, len(replies), tally)
    return Vote(winner, finals[keys.index(winner)], count, len(replies), tally)
