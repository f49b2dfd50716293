"""Mixture sampler: repeat_time semantics, sharding, weights, and exact resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from ivl.data.mixture import MixtureSampler, repeat_indices
from ivl.errors import ConfigError


def test_repeat_indices_semantics():
    assert repeat_indices(10, 1.0).tolist() == list(range(10))
    assert repeat_indices(10, 0.5, subsample="prefix").tolist() == [0, 1, 2, 3, 4]
    sub = repeat_indices(10, 0.5, seed=1)
    assert len(sub) == 5 and len(set(sub.tolist())) == 5 and sub.tolist() != [0, 1, 2, 3, 4]
    assert repeat_indices(10, 0.5, seed=1).tolist() == sub.tolist()  # seeded
    rep = repeat_indices(10, 2.5, seed=3)
    counts = Counter(rep.tolist())
    assert len(rep) == 25 and sorted(counts.values()) == [2] * 5 + [3] * 5
    assert len(repeat_indices(7, 0.1)) == 0
    with pytest.raises(ConfigError, match="repeat_time"):
        repeat_indices(10, -1.0)


def test_one_epoch_covers_each_repeated_index_once_across_shards():
    lengths, repeats = [12, 7, 5], [1.0, 2.0, 0.4]
    all_keys = []
    for rank in range(2):
        for worker in range(2):
            s = MixtureSampler(
                lengths, repeats, seed=5, rank=rank, world_size=2, worker_id=worker, num_workers=2, even_shards=False
            )
            keys = list(s)
            assert len(keys) == len(s)
            all_keys.extend(keys)
    got = Counter((d, i) for d, i, _ in all_keys)
    want = Counter()
    for d in range(len(lengths)):
        want.update((d, int(i)) for i in MixtureSampler(lengths, repeats, seed=5).pools[d])
    assert got == want
    assert {e for _, _, e in all_keys} == {0}


def test_even_shards_have_equal_length():
    sizes = {len(MixtureSampler([13, 6], seed=0, rank=r, world_size=4)) for r in range(4)}
    assert sizes == {3 + 1}


def test_deterministic_and_seed_dependent():
    a = list(MixtureSampler([30, 20], seed=1))
    assert a == list(MixtureSampler([30, 20], seed=1))
    assert a != list(MixtureSampler([30, 20], seed=2))


def test_draw_frequency_follows_repeated_length():
    s = MixtureSampler([900, 300], [1.0, 2.0], seed=0)  # repeated lengths 900 : 600
    first = [d for d, _, _ in itertools.islice(s, 500)]
    frac = first.count(0) / len(first)
    assert abs(frac - 0.6) < 0.06
    sq = MixtureSampler([900, 100], seed=0, weighting="sqrt")  # sqrt weights 30 : 10
    first = [d for d, _, _ in itertools.islice(sq, 200)]
    assert abs(first.count(0) / 200 - 0.75) < 0.08


def test_resume_continues_exactly_across_epochs():
    kwargs = dict(seed=11, num_epochs=3, rank=1, world_size=2)
    ref = list(MixtureSampler([9, 4, 6], [1.0, 1.5, 0.5], **kwargs))
    assert {e for *_, e in ref} == {0, 1, 2}
    whole = list(MixtureSampler([9, 4, 6], [1.0, 1.5, 0.5], seed=11, num_epochs=2))
    epoch0 = [k[:2] for k in whole if k[2] == 0]
    epoch1 = [k[:2] for k in whole if k[2] == 1]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # reshuffled, same content
    for cut in (0, 1, 5, len(ref) // 3, len(ref) - 1):
        s = MixtureSampler([9, 4, 6], [1.0, 1.5, 0.5], **kwargs)
        head = list(itertools.islice(s, cut))
        state = json.loads(json.dumps(s.state_dict()))
        fresh = MixtureSampler([9, 4, 6], [1.0, 1.5, 0.5], **kwargs)
        fresh.load_state_dict(state)
        assert head + list(fresh) == ref


def test_resume_into_a_different_mixture_is_refused():
    s = MixtureSampler([9, 4], seed=0)
    next(s)
    other = MixtureSampler([9, 5], seed=0)
    with pytest.raises(ConfigError, match="lengths"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ConfigError, match="invalid shard"):
        MixtureSampler([3], rank=2, world_size=2)
    assert np.isclose(MixtureSampler([4, 0]).weights.sum(), 4)
