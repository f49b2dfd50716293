"""Records → samples through the real processor: tiles per dataset n_max, JPEG augmentation, bad-record
policy with a rejects file, over-long rule, video records and the resumable packed DataLoader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ivl.config import get_preset
from ivl.data.augment import RandomJpeg, augment_rng, jpeg_recompress
from ivl.data.dataset import (
    DatasetOptions,
    PackedIterable,
    PackedLoaderConfig,
    ResumableLoader,
    build_datasets,
    denormalize_tiles,
    jpeg_augment_pixels,
)
from ivl.data.mixture import MixtureSampler
from ivl.data.packing import PackingConfig
from ivl.errors import DataError
from ivl.processing.processor import Processor
from ivl.processing.tiling import IMAGENET_MEAN, IMAGENET_STD, TiledImage, normalize_tiled

S = 56  # tile size of the tiny preset; 4 image tokens per tile


@pytest.fixture(scope="module")
def processor(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return Processor.from_config(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), get_preset("tiny"))


def conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_dataset(tmp_path, name, records, **meta):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {name: {"root": str(tmp_path), "annotation": f"{name}.jsonl", **meta}}


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(tmp_path / "square.png")
    return tmp_path


def build(tmp_path, meta, processor, **opts):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    return build_datasets(path, processor, DatasetOptions(**opts))


def test_text_image_and_multi_image_samples(world, processor):
    meta = write_dataset(
        world,
        "mix",
        [
            {"conversations": conv("hi", "hello")},
            {"image": "wide.png", "conversations": conv("What?", "noise")},
            {
                "image": ["wide.png", "square.png"],
                "conversations": conv("Image-1: <image>\nImage-2: <image>\nSame?", "no"),
            },
        ],
        max_dynamic_patch=4,
    )
    [ds] = build(world, meta, processor)
    text, img, multi = ds[0], ds[1], ds[2]
    assert text["pixel_values"].shape == (0, 3, S, S) and text["image_flags"].numel() == 0
    assert (text["input_ids"] == processor.image_token_id).sum() == 0
    # 112x56 with n_max 4 -> grid (2, 1) + thumbnail = 3 tiles, 4 tokens each
    assert img["pixel_values"].shape == (3, 3, S, S) and img["num_patches_list"] == [3]
    assert (img["input_ids"] == processor.image_token_id).sum() == 12
    assert img["image_flags"].tolist() == [1, 1, 1]
    # two images share the budget: max(1, 4 // 2) = 2 -> (2,1)+thumb = 3 and (1,1) = 1
    assert multi["num_patches_list"] == [3, 1] and multi["pixel_values"].shape[0] == 4
    supervised = img["labels"][img["labels"] != -100]
    assert supervised[-1].item() == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert img["dataset"] == "mix" and img["index"] == 1 and img["where"].endswith("mix.jsonl:2")


def test_denormalize_recovers_every_level_exactly():
    levels = np.arange(256, dtype=np.uint8)
    tile = np.stack([np.roll(levels, 85 * c).reshape(16, 16) for c in range(3)], axis=-1)  # all levels, all channels
    pixels = normalize_tiled([TiledImage(tile, None, (1, 1), 16)])
    assert np.array_equal(denormalize_tiles(pixels, IMAGENET_MEAN, IMAGENET_STD)[0], tile)


def test_jpeg_augmentation_per_tile_is_seeded_and_exact(world, processor):
    record = {"image": "wide.png", "conversations": conv("What?", "noise")}
    meta = {
        **write_dataset(world, "plain", [record], max_dynamic_patch=4),
        **write_dataset(world, "aug", [record], max_dynamic_patch=4, data_augment=True),
    }
    plain, aug = build(world, meta, processor, seed=3)
    a0, a0_again, a1 = aug.get(0, epoch=0), aug.get(0, epoch=0), aug.get(0, epoch=1)
    base = plain.get(0)["pixel_values"]
    assert torch.equal(a0["pixel_values"], a0_again["pixel_values"])
    assert not torch.equal(a0["pixel_values"], base) and not torch.equal(a0["pixel_values"], a1["pixel_values"])
    assert torch.equal(a0["input_ids"], plain.get(0)["input_ids"])
    # independent reference: JPEG each uint8 tile at the qualities drawn for (seed, dataset 1, record 0, epoch 0)
    tiles = denormalize_tiles(base, IMAGENET_MEAN, IMAGENET_STD)
    qualities = RandomJpeg().qualities(len(tiles), augment_rng(3, (1, 0, 0)))
    expected = [np.asarray(jpeg_recompress(Image.fromarray(t), q)) for t, q in zip(tiles, qualities, strict=True)]
    got = denormalize_tiles(a0["pixel_values"], IMAGENET_MEAN, IMAGENET_STD)
    assert np.array_equal(got, np.stack(expected))
    direct = jpeg_augment_pixels(base, augment_rng(3, (1, 0, 0)), IMAGENET_MEAN, IMAGENET_STD, RandomJpeg())
    assert torch.equal(direct, a0["pixel_values"])


def test_bad_records_fail_fast_or_go_to_the_rejects_file(world, processor):
    records = [
        {"conversations": conv("hi", "hello")},
        {"image": "missing.png", "conversations": conv("What?", "x")},
        {"conversations": [{"from": "bot", "value": "x"}]},
    ]
    meta = write_dataset(world, "bad", records)
    [strict] = build(world, meta, processor)
    assert strict.get(0) is not None
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*missing.png"):
        strict.get(1)
    with pytest.raises(DataError, match=r"bad.jsonl:3: conversations\[0\].from must be human/gpt/system, got 'bot'"):
        strict.get(2)
    rejects = world / "rejects.jsonl"
    [lenient] = build(world, meta, processor, skip_bad_records=True, rejects_path=str(rejects))
    assert lenient.get(1) is None and lenient.get(2) is None and lenient.get(0) is not None
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [x["where"].rsplit(":", 1)[1] for x in lines] == ["2", "3"]
    assert "missing.png" in lines[0]["reason"] and lenient.rejects.count == 2
    assert lenient.rejects.reasons == {"ImageError": 1, "DataError": 1}


def test_max_length_rule(world, processor):
    meta = write_dataset(
        world, "long", [{"image": "square.png", "conversations": conv("Describe.", "word " * 80)}], max_dynamic_patch=1
    )
    [full] = build(world, meta, processor)
    n = full.get(0)["input_ids"].numel()
    [trunc] = build(world, meta, processor, max_length=n - 10, overlong="truncate")
    assert trunc.get(0)["input_ids"].numel() == n - 10
    [rej] = build(world, meta, processor, max_length=n - 10, overlong="reject")
    assert rej.get(0) is None and rej.rejects.reasons == {"overlong": 1}
    image_end = int((full.get(0)["input_ids"] == processor.image_token_id).nonzero().max())
    [cut] = build(world, meta, processor, max_length=image_end, overlong="truncate")
    assert cut.get(0) is None  # truncation would cut the image: rejected, not fatal


def test_video_record(world, processor):
    import av

    path = world / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), k * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    meta = write_dataset(world, "vid", [{"video": "clip.mp4", "conversations": conv("What happens?", "It fades.")}])
    [ds] = build(world, meta, processor, min_num_frames=3, max_num_frames=5)
    sample = ds.get(0)
    frames = sample["pixel_values"].shape[0]
    assert 3 <= frames <= 5 and sample["num_patches_list"] == [1] * frames
    assert (sample["input_ids"] == processor.image_token_id).sum() == 4 * frames
    text = processor.tokenizer.decode(sample["input_ids"])
    assert f"Frame-{frames}:" in text and "<video>" not in text


def _loader_world(world, processor, skip=True, **opts):
    recs_a = [{"image": "wide.png", "conversations": conv(f"q{i}", "a " * (i % 7 + 1))} for i in range(10)]
    recs_b = [{"conversations": conv(f"text {i}", "b " * (i % 5 + 1))} for i in range(8)]
    recs_b[3] = {"image": "nope.png", "conversations": conv("x", "y")}
    meta = {
        **write_dataset(world, "a", recs_a, max_dynamic_patch=2, data_augment=True),
        **write_dataset(world, "b", recs_b, repeat_time=1.5),
    }
    return build(world, meta, processor, skip_bad_records=skip, **opts)


def _signature(batch):
    return (
        tuple(map(tuple, batch["keys"])),
        batch["input_ids"].sum().item(),
        float(batch["pixel_values"].sum()) if batch["pixel_values"] is not None else 0.0,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_loader_resumes_exactly(world, processor, workers):
    datasets = _loader_world(world, processor)
    cfg = PackedLoaderConfig(
        packing=PackingConfig(max_packed_tokens=600, max_packed_tiles=6, max_buffer_size=2), num_epochs=2, seed=1
    )
    full = [
        _signature(b)
        for b in ResumableLoader(PackedIterable(datasets, cfg, processor.image_token_id), num_workers=workers)
    ]
    assert len(full) > 6
    cut = 5
    loader = ResumableLoader(PackedIterable(datasets, cfg, processor.image_token_id), num_workers=workers)
    head = []
    for batch in loader:
        head.append(_signature(batch))
        if len(head) == cut:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = ResumableLoader(
        PackedIterable(datasets, cfg, processor.image_token_id, resume=state), num_workers=workers
    )
    assert head + [_signature(b) for b in resumed] == full
    # the unreadable record (dataset 1, record 3) is skipped every time the sampler draws it
    shards = max(1, workers)
    drawn = [
        key
        for w in range(shards)
        for key in MixtureSampler([10, 8], [1.0, 1.5], seed=1, num_epochs=2, worker_id=w, num_workers=shards)
    ]
    expected = sum(1 for d, i, _ in drawn if (d, i) == (1, 3))
    assert expected >= 1 and resumed.summary()["skipped_records"] == expected
    assert resumed.summary()["samples"] == len(drawn) - expected


def test_worker_processes_with_the_media_cache_give_the_same_batches(world, processor):
    cfg = PackedLoaderConfig(
        packing=PackingConfig(max_packed_tokens=600, max_packed_tiles=6, max_buffer_size=2), num_epochs=3, seed=2
    )
    runs = []
    for cache in (0, 1 << 22):
        datasets = _loader_world(world, processor, media_cache_bytes=cache)
        loader = ResumableLoader(PackedIterable(datasets, cfg, processor.image_token_id), num_workers=2)
        runs.append([_signature(b) for b in loader])
    assert len(runs[0]) > 6 and runs[0] == runs[1]
