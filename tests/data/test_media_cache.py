"""MediaCache: decoded media served from memory equal a fresh decode, sample for sample (augmentation
included); a rewritten file is decoded again; the byte bound holds; bad files fail every time."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ivl.config import get_preset
from ivl.data.dataset import DatasetOptions, build_datasets
from ivl.data.media_cache import MediaCache, decoded_bytes, shared_media_cache
from ivl.errors import ConfigError, DataError, ImageError
from ivl.processing.images import load_image
from ivl.processing.processor import Processor
from ivl.processing.video import read_video


@pytest.fixture(scope="module")
def processor(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return Processor.from_config(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), get_preset("tiny"))


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _write_video(path, frames: int = 10, size: int = 32) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), k * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture
def media(tmp_path):
    Image.fromarray(_noise(56, 112, 0)).save(tmp_path / "wide.png")
    Image.fromarray(_noise(40, 60, 1, channels=4), "RGBA").save(tmp_path / "alpha.png")
    rotated = Image.fromarray(_noise(30, 70, 2))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: must be turned upright once, not twice
    rotated.save(tmp_path / "sideways.jpg", exif=exif.tobytes())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    _write_video(tmp_path / "clip.mp4")
    return tmp_path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("name", ["wide.png", "alpha.png", "sideways.jpg"])
def test_a_cached_image_equals_a_fresh_decode_and_stays_so_through_the_loader(media, name):
    cache = MediaCache(1 << 20)
    fresh = load_image(media / name, max_pixels=None)
    first = cache.image(media / name, max_pixels=None)
    second = cache.image(media / name, max_pixels=None)
    assert second is first and (cache.hits, cache.misses) == (1, 1)
    assert first.mode == "RGB" and np.array_equal(_pixels(first), _pixels(fresh))
    again = load_image(first, max_pixels=None)  # what the processor does with an image it is handed
    assert again.size == fresh.size and np.array_equal(_pixels(again), _pixels(fresh))


def test_a_video_is_cached_per_frame_sampling(media):
    cache = MediaCache(1 << 20)
    for segments in (3, 5, 3):
        clip = cache.video(media / "clip.mp4", num_segments=segments, bound=None)
        fresh = read_video(media / "clip.mp4", num_segments=segments)
        assert clip.indices == fresh.indices and len(clip.frames) == segments
        assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(clip.frames, fresh.frames, strict=True))
    assert (cache.hits, cache.misses) == (1, 2)
    assert cache.video(media / "clip.mp4", num_segments=3, bound=(0.5, 2.0)).indices != fresh.indices


def test_a_rewritten_file_is_decoded_again(media):
    cache = MediaCache(1 << 20)
    path = media / "wide.png"
    before = cache.image(path, max_pixels=None)
    Image.fromarray(_noise(56, 112, 9)).save(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock must not hide the change
    after = cache.image(path, max_pixels=None)
    assert cache.misses == 2 and not np.array_equal(_pixels(before), _pixels(after))
    assert np.array_equal(_pixels(after), _noise(56, 112, 9))


def test_the_byte_bound_evicts_least_recently_used_and_skips_what_never_fits(media):
    one = decoded_bytes(load_image(media / "wide.png", max_pixels=None))
    assert one == 56 * 112 * 3
    cache = MediaCache(one + 8 * 32 * 32 * 3)  # room for wide.png and the 8-frame clip, not alpha.png as well
    cache.image(media / "wide.png", max_pixels=None)
    cache.image(media / "alpha.png", max_pixels=None)
    cache.image(media / "wide.png", max_pixels=None)  # now the most recent
    cache.video(media / "clip.mp4", num_segments=8, bound=None)  # 8 x 32 x 32 x 3: alpha.png goes
    assert cache.bytes <= cache.max_bytes and len(cache) == 2
    cache.image(media / "wide.png", max_pixels=None)
    assert cache.hits == 2
    tiny = MediaCache(10)
    tiny.image(media / "wide.png", max_pixels=None)
    assert len(tiny) == 0 and tiny.bytes == 0


def test_bad_input_fails_every_time_and_is_not_cached(media):
    cache = MediaCache(1 << 20)
    for _ in range(2):
        with pytest.raises(ImageError, match=r"broken\.png"):
            cache.image(media / "broken.png", max_pixels=None)
        with pytest.raises(ImageError, match=r"missing\.png"):
            cache.image(media / "missing.png", max_pixels=None)
        with pytest.raises(ImageError, match=r"pixels"):
            cache.image(media / "wide.png", max_pixels=100)
    assert len(cache) == 0 and cache.misses == 6
    with pytest.raises(ValueError, match="media cache size"):
        MediaCache(-1)


def _meta(media, records, **entry):
    (media / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = media / "meta.json"
    path.write_text(json.dumps({"set": {"root": str(media), "annotation": "set.jsonl", **entry}}))
    return path


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_samples_with_the_cache_equal_samples_without_it(media, processor):
    records = [
        {"image": "wide.png", "conversations": _conv("<image>\nWhat?", "noise")},
        {
            "image": ["alpha.png", "sideways.jpg"],
            "conversations": _conv("Image-1: <image>\nImage-2: <image>\nWhich?", "Image-1"),
        },
        {"video": "clip.mp4", "conversations": _conv("What happens?", "It fades.")},
    ]
    meta = _meta(media, records, max_dynamic_patch=4, data_augment=True)
    options = {"seed": 5, "min_num_frames": 3, "max_num_frames": 6}
    [plain] = build_datasets(meta, processor, DatasetOptions(**options))
    [cached] = build_datasets(meta, processor, DatasetOptions(**options, media_cache_bytes=1 << 24))
    assert plain.media_cache is None and cached.media_cache is not None
    for epoch in range(3):  # epochs redraw JPEG qualities and video frame counts
        for i in range(len(records)):
            a, b = plain.get(i, epoch), cached.get(i, epoch)
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert cached.media_cache.hits > 0


def test_bad_records_are_reported_the_same_with_the_cache(media, processor):
    records = [{"image": "broken.png", "conversations": _conv("What?", "x")}]
    meta = _meta(media, records)
    [strict] = build_datasets(meta, processor, DatasetOptions(media_cache_bytes=1 << 20))
    for _ in range(2):
        with pytest.raises(DataError, match=r"set.jsonl:1: .*broken.png"):
            strict.get(0)
    [lenient] = build_datasets(meta, processor, DatasetOptions(media_cache_bytes=1 << 20, skip_bad_records=True))
    assert lenient.get(0) is None and lenient.get(0, epoch=1) is None and lenient.rejects.count == 2
    with pytest.raises(ConfigError, match="media_cache_bytes"):
        DatasetOptions(media_cache_bytes=-1).validate()


def test_runs_in_one_process_share_the_cache_and_the_latest_bound_holds(media, processor):
    meta = _meta(media, [{"image": "wide.png", "conversations": _conv("<image>\nWhat?", "noise")}])
    [first] = build_datasets(meta, processor, DatasetOptions(media_cache_bytes=1 << 24))
    [second] = build_datasets(meta, processor, DatasetOptions(media_cache_bytes=1 << 25))
    cache = second.media_cache
    assert cache is first.media_cache is shared_media_cache(1 << 25)
    first.get(0)
    hits = cache.hits
    second.get(0)  # decoded by the earlier run: served from memory
    assert cache.hits == hits + 1 and cache.max_bytes == 1 << 25
    shared_media_cache(0)
    assert len(cache) == 0 and cache.bytes == 0
    shared_media_cache(1 << 25)


def test_a_pickled_cache_starts_empty_with_the_same_bound(media):
    import pickle

    cache = MediaCache(1 << 20)
    cache.image(media / "wide.png", max_pixels=None)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.max_bytes == 1 << 20
    assert np.array_equal(_pixels(copy.image(media / "wide.png", max_pixels=None)), _noise(56, 112, 0))
