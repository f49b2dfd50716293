"""Greedy packing, over-long rules, resumable packed stream and collation (no model needed)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ivl.data.collate import packed_collate, padded_collate
from ivl.data.mixture import MixtureSampler
from ivl.data.packing import GreedyPacker, Pack, PackedStream, PackingConfig, packing_efficiency
from ivl.errors import ConfigError, DataError

IMG = 50  # image context token id of these hand-built samples


def sample(n_tokens, n_tiles=0, key=None, image_at=0, first_label=-100):
    """A sample with ``n_tiles`` tiles whose image tokens (2 per tile) start at ``image_at``."""
    ids = torch.arange(1, n_tokens + 1) % 40 + 1
    if n_tiles:
        ids[image_at : image_at + 2 * n_tiles] = IMG
    labels = ids.clone()
    labels[: min(n_tokens, image_at + 2 * n_tiles + 1)] = -100
    labels[0] = first_label
    labels[-1] = 7
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(n_tiles, 3, 4, 4),
        "image_flags": torch.ones(n_tiles, dtype=torch.long),
        "num_patches_list": [n_tiles] if n_tiles else [],
        "key": key,
    }


def lengths(pack: Pack):
    return [s["input_ids"].shape[0] for s in pack.samples]


def test_first_fit_by_hand():
    packer = GreedyPacker(PackingConfig(max_packed_tokens=10, max_packed_tiles=4))
    out = []
    for n in (6, 5, 4, 3):
        out += packer.add(sample(n))
    assert [lengths(p) for p in out] == [[6, 4]]  # 6+4 hits the token budget exactly
    assert [lengths(p) for p in packer.flush()] == [[5, 3]]
    # tiles: buffers are scanned most-tiles first
    packer = GreedyPacker(PackingConfig(max_packed_tokens=100, max_packed_tiles=4))
    out = []
    for t in (3, 2, 1, 2):
        out += packer.add(sample(20, t))
    assert [[s["pixel_values"].shape[0] for s in p.samples] for p in out] == [[3, 1], [2, 2]]


def test_budgets_hold_and_every_sample_is_packed_once():
    rng = random.Random(0)
    cfg = PackingConfig(max_packed_tokens=64, max_packed_tiles=6, max_buffer_size=4)
    packer = GreedyPacker(cfg, image_token_id=IMG)
    samples = [sample(rng.randint(8, 64), rng.randint(0, 3), key=i) for i in range(300)]
    packs = [p for s in samples for p in packer.add(s)] + packer.flush()
    keys = sorted(k for p in packs for k in p.sample_keys())
    assert keys == list(range(300))
    for p in packs:
        assert p.num_tokens <= 64 and p.num_tiles <= 6
        assert p.num_tokens == sum(lengths(p))
    assert packer.stats.samples == 300 and packer.stats.packs == len(packs)
    assert len(packer.buffers) == 0
    assert packing_efficiency(packs, 64) > 0.8


def test_overlong_truncate_and_reject_rules():
    packer = GreedyPacker(
        PackingConfig(max_packed_tokens=10, max_packed_tiles=2, overlong="truncate"), image_token_id=IMG
    )
    [full] = packer.add(sample(15, key="text"))  # truncated to exactly the budget: emitted at once
    assert packer.stats.truncated == 1 and lengths(full) == [10]
    [full] = packer.add(sample(15, 1, image_at=2, key="img-early"))  # image tokens at 2..3 survive the cut
    assert packer.stats.truncated == 2 and full.num_tiles == 1 and (full.samples[0]["input_ids"] == IMG).sum() == 2
    packer.add(sample(15, 1, image_at=9, key="img-late"))  # cut at 10 would split the image
    packer.add(sample(8, 3, key="tiles"))
    assert packer.stats.rejected == 2
    assert packer.stats.reject_reasons == {"truncation would cut an image": 1, "more than 2 tiles": 1}
    strict = GreedyPacker(PackingConfig(max_packed_tokens=10, overlong="reject"))
    assert strict.add(sample(11)) == [] and strict.stats.reject_reasons == {"longer than 10 tokens": 1}
    assert strict.buffers == []
    with pytest.raises(ConfigError, match="overlong"):
        PackingConfig(overlong="split").validate()  # type: ignore[arg-type]
    with pytest.raises(DataError, match="exceeds the pack budget"):
        strict.place(sample(11, key="x"))


def test_buffer_overflow_evicts_the_fullest():
    packer = GreedyPacker(PackingConfig(max_packed_tokens=10, max_packed_tiles=8, max_buffer_size=2))
    assert packer.add(sample(6)) == [] and packer.add(sample(8)) == []
    out = packer.add(sample(7))  # three open buffers > 2: the 8-token one leaves
    assert [lengths(p) for p in out] == [[8]]


def fetch(key):
    d, i, e = key
    g = torch.Generator().manual_seed(d * 1000 + i * 10 + e)
    n = int(torch.randint(5, 40, (1,), generator=g))
    tiles = int(torch.randint(0, 3, (1,), generator=g)) if d == 0 else 0
    if d == 1 and i == 3:
        return None  # an unreadable record, skipped
    s = sample(n, tiles)
    s["pixel_values"] = torch.randn(tiles, 3, 4, 4, generator=g)
    return s


def make_stream():
    sampler = MixtureSampler([20, 15, 9], [1.0, 2.0, 0.5], seed=4, num_epochs=2)
    return PackedStream(
        sampler, fetch, GreedyPacker(PackingConfig(max_packed_tokens=64, max_packed_tiles=4, max_buffer_size=3), IMG)
    )


def signature(pack):
    return [(tuple(s["key"]), s["input_ids"].tolist(), s["pixel_values"].sum().item()) for s in pack.samples]


def test_packed_stream_resumes_exactly():
    reference = [signature(p) for p in make_stream()]
    assert len(reference) > 10
    for cut in (1, 4, len(reference) // 2, len(reference) - 1):
        stream = make_stream()
        head = [signature(next(stream)) for _ in range(cut)]
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = make_stream()
        resumed.load_state_dict(state)
        assert head + [signature(p) for p in resumed] == reference
        assert resumed.packer.stats.samples + resumed.skipped == len(resumed.sampler) * 2


def test_packed_collate_layout():
    a, b = sample(4, first_label=-100), sample(3, first_label=9)
    a["labels"] = torch.tensor([-100, 11, 12, 13])
    b["labels"] = torch.tensor([9, 21, -100])
    batch = packed_collate(Pack([a, b], 7, 0), loss_mode="square", pad_to=9, pad_token_id=0)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 4, 7, 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12, 13, 9, 21, -100, -100, -100]]
    # a's last token must not learn b's first label (9)
    assert batch["targets"].tolist() == [[11, 12, 13, -100, 21, -100, -100, -100, -100]]
    w = 1 / 3**0.5
    torch.testing.assert_close(batch["loss_weights"], torch.tensor([[w, w, w, 0, 1.0, 0, 0, 0, 0]]))
    assert batch["pixel_values"] is None and batch["num_real_tokens"] == 7
    with_dummy = packed_collate(Pack([a]), dummy_tile_size=4)
    assert with_dummy["pixel_values"].shape == (1, 3, 4, 4) and with_dummy["image_flags"].tolist() == [0]
    tiles = packed_collate(Pack([sample(12, 2), a, sample(12, 1)]))
    assert tiles["pixel_values"].shape[0] == 3 and tiles["num_patches_list"] == [2, 1]
    with pytest.raises(ConfigError, match="pad_to"):
        packed_collate(Pack([a, b]), pad_to=5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_collate_masks_by_length_not_token_id(side):
    a = {"input_ids": torch.tensor([0, 5, 0]), "labels": torch.tensor([-100, 5, 0])}
    b = {"input_ids": torch.tensor([3, 4, 5, 6, 0]), "labels": torch.tensor([8, -100, 5, 6, 0])}
    batch = padded_collate([a, b], pad_token_id=0, padding_side=side, loss_mode="sample")
    if side == "right":
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
        assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 0]
        assert batch["targets"][0].tolist() == [5, 0, -100, -100, -100]
    else:
        assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]
        assert batch["position_ids"][0].tolist() == [0, 0, 0, 1, 2]
        assert batch["targets"][0].tolist() == [-100, -100, 5, 0, -100]
    # token id 0 inside a sequence stays attended and supervised
    assert batch["attention_mask"][1, 4] == 1 and batch["targets"][1, 3] == 0
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()
    assert batch["loss_weights"].sum(dim=1).tolist() == [1.0, 1.0]
