"""Majority voting: counts, canonical keys and the deterministic tie-break."""

from __future__ import annotations

from ivl.evaluation.voting import majority_vote, vote_answers


def test_majority_vote_counts_and_ties() -> None:
    assert majority_vote(["a", "b", "b", "a", "b"]) == ("b", 3)
    assert majority_vote(["c", "b", "b", "c"]) == ("c", 2)  # tie: first seen wins
    assert majority_vote([None, "x", None]) == ("x", 1)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_vote_letters_over_cot_replies() -> None:
    options = {"A": "dog", "B": "cat", "C": "bird"}
    replies = ["thinking\nAnswer: (B)", "Answer: C", "so\nAnswer: B.", "no idea"]
    vote = vote_answers(replies, "letter", options)
    assert (vote.key, vote.count, vote.total) == ("B", 2, 4)
    assert vote.answer == "(B)"  # the first reply that voted for the winner, as its final answer
    assert vote.tally == {"B": 2, "C": 1}


def test_vote_numbers_group_equal_values() -> None:
    vote = vote_answers(["Answer: 4", "Answer: three", "Answer: 3.0", "Answer: 3"], "number")
    assert vote.key == repr(3.0) and vote.count == 3 and vote.answer == "three"


def test_vote_without_any_readable_answer_falls_back_to_first() -> None:
    vote = vote_answers(["hmm", "unsure"], "letter", {"A": "x", "B": "y"})
    assert vote.key is None and vote.count == 0 and vote.answer == "hmm"


def test_vote_direct_replies_are_not_cut() -> None:
    vote = vote_answers(["the cat", "The cat.", "a dog"], "phrase", chain_of_thought=False)
    assert vote.key == "cat" and vote.count == 2 and vote.answer == "the cat"
