"""Sampling knobs against transformers' logits processors, and per-row seeded generators."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ivl.errors import GenerationError
from ivl.inference.sampling import (
    RowSampling,
    Sampler,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    row_sampling_checks,
)

V = 50


def _logits(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 3, 17, V, V + 5])
def test_top_k_matches_transformers(k: int) -> None:
    x = _logits()
    ours = apply_top_k(x, torch.full((4,), k))
    ref = TopKLogitsWarper(top_k=k)(None, x.clone())
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(p: float) -> None:
    x = _logits()
    ours = apply_top_p(x, torch.full((4,), p))
    ref = TopPLogitsWarper(top_p=p)(None, x.clone())
    torch.testing.assert_close(ours, ref)


def test_per_row_params_equal_rowwise_reference() -> None:
    x = _logits(3)
    ks, ps = [0, 5, 2], [0.5, 1.0, 0.8]
    ours = apply_top_p(apply_top_k(x, torch.tensor(ks)), torch.tensor(ps))
    for i in range(3):
        row = x[i : i + 1].clone()
        if ks[i]:
            row = TopKLogitsWarper(top_k=ks[i])(None, row)
        if ps[i] < 1:
            row = TopPLogitsWarper(top_p=ps[i])(None, row)
        torch.testing.assert_close(ours[i : i + 1], row)


def test_repetition_penalty_matches_transformers() -> None:
    x = _logits(2)
    history = torch.tensor([[1, 5, 5, 7], [0, 2, 3, 49]])
    seen = torch.zeros(2, V, dtype=torch.bool).scatter_(1, history, True)
    ours = apply_repetition_penalty(x, seen, torch.tensor([1.3, 1.3]))
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.3)(history, x.clone())
    torch.testing.assert_close(ours, ref)


def test_presence_frequency_hand_computed() -> None:
    x = torch.zeros(1, 4)
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_presence_frequency(x, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.75, -1.25, 0.0]]))


def test_sampler_pipeline_matches_transformers_order() -> None:
    """penalty → temperature → top-k → top-p, as transformers applies them."""
    x = _logits(1)
    row = RowSampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2)
    s = Sampler([row], V, "cpu")
    s.counts[0, [3, 4]] = 1
    ours = s.process(x)
    ids = torch.tensor([[3, 4]])
    ref = RepetitionPenaltyLogitsProcessor(1.2)(ids, x.clone())
    ref = TemperatureLogitsWarper(0.7)(ids, ref)
    ref = TopKLogitsWarper(10)(ids, ref)
    ref = TopPLogitsWarper(0.8)(ids, ref)
    torch.testing.assert_close(ours, ref)


def test_greedy_rows_take_argmax() -> None:
    x = _logits(3)
    s = Sampler([RowSampling(), RowSampling(do_sample=True, temperature=0.0), RowSampling()], V, "cpu")
    assert torch.equal(s(x), x.argmax(-1))


def test_seeded_row_is_independent_of_batch_company() -> None:
    x = _logits(3, seed=1)
    seeded = RowSampling(do_sample=True, temperature=1.5, seed=1234)
    alone = [int(Sampler([seeded], V, "cpu")(x[1:2])[0]) for _ in range(1)]
    s = Sampler([RowSampling(do_sample=True), seeded, RowSampling()], V, "cpu")
    assert int(s(x)[1]) == alone[0]
    # the same generator keeps producing the same stream across steps
    a, b = Sampler([seeded], V, "cpu"), Sampler([seeded], V, "cpu")
    assert [int(a(x[:1])[0]) for _ in range(20)] == [int(b(x[:1])[0]) for _ in range(20)]


def test_sampling_distribution_matches_softmax() -> None:
    """Exponential-race sampling draws from softmax(logits / T) (checked on a 4-token vocabulary)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    target = (logits / 0.8).softmax(-1)[0]
    s = Sampler([RowSampling(do_sample=True, temperature=0.8, seed=0)], 4, "cpu")
    n = 8000
    draws = torch.stack([s(logits)[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, target, atol=0.02), (freq, target)


def test_top_k_one_sampling_is_greedy() -> None:
    x = _logits(2)
    s = Sampler([RowSampling(do_sample=True, temperature=2.0, top_k=1, seed=s) for s in range(2)], V, "cpu")
    for _ in range(5):
        assert torch.equal(s(x), x.argmax(-1))


def test_keep_rows_and_extend_keep_state() -> None:
    rows = [RowSampling(repetition_penalty=2.0), RowSampling(), RowSampling(frequency_penalty=1.0)]
    s = Sampler(rows, V, "cpu")
    x = torch.zeros(3, V)
    x[:, 7] = 1.0
    s(x)  # every row produced token 7
    s.keep_rows([0, 2])
    assert len(s) == 2 and s.counts.shape == (2, V) and int(s.counts[1, 7]) == 1
    s.extend([RowSampling()])
    assert s.counts.shape == (3, V) and int(s.counts[2].sum()) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"seed": -5},
    ],
)
def test_invalid_knobs_raise(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(GenerationError, match=name):
        row_sampling_checks(RowSampling(**kwargs))
