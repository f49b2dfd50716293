"""Dynamic tiling: grid choice identical to the official algorithm, pixels identical to the plain Pillow path."""

from __future__ import annotations

import functools
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from ivl.errors import ConfigError
from ivl.processing.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _normalize_on_device,
    candidate_grids,
    closest_grid,
    dynamic_tiles,
    dynamic_tiles_many,
    images_to_pixel_values,
    normalize_tiled,
)

# Spec Appendix A, copied verbatim (CPython set-iteration order of the official code).
APPENDIX_A_MAX6 = "(1,1) (1,2) (2,1) (3,1) (1,3) (4,1) (1,4) (2,2) (1,5) (5,1) (6,1) (2,3) (1,6) (3,2)"
APPENDIX_A_MAX12 = (
    "(1,1) (1,2) (2,1) (3,1) (1,3) (2,2) (4,1) (1,4) (5,1) (1,5) (1,6) (6,1) (3,2) (2,3) (7,1) (1,7) "
    "(4,2) (2,4) (1,8) (8,1) (1,9) (3,3) (9,1) (2,5) (5,2) (10,1) (1,10) (11,1) (1,11) (12,1) (3,4) "
    "(4,3) (1,12) (6,2) (2,6)"
)
APPENDIX_A_HF12 = (
    "(1,1) (1,2) (2,1) (1,3) (3,1) (1,4) (2,2) (4,1) (1,5) (5,1) (1,6) (2,3) (3,2) (6,1) (1,7) (7,1) "
    "(1,8) (2,4) (4,2) (8,1) (1,9) (3,3) (9,1) (1,10) (2,5) (5,2) (10,1) (1,11) (11,1) (1,12) (2,6) "
    "(3,4) (4,3) (6,2) (12,1)"
)


def _parse(order: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in item.strip("()").split(",")) for item in order.split())


def test_candidate_order_matches_appendix_a():
    assert candidate_grids(1, 6) == _parse(APPENDIX_A_MAX6)
    assert candidate_grids(1, 12) == _parse(APPENDIX_A_MAX12)
    assert candidate_grids(1, 12, "hf") == _parse(APPENDIX_A_HF12)


# Spec §4.3 worked examples: image -> (grid, tiles incl. thumbnail) for max 6 and max 12.
WORKED = [
    ((448, 448), ((1, 1), 1), ((1, 1), 1)),
    ((640, 480), ((3, 2), 7), ((4, 3), 13)),
    ((800, 600), ((3, 2), 7), ((4, 3), 13)),
    ((1024, 768), ((3, 2), 7), ((4, 3), 13)),
    ((896, 896), ((2, 2), 5), ((2, 2), 5)),
    ((1000, 1000), ((2, 2), 5), ((3, 3), 10)),
    ((1920, 1080), ((2, 1), 3), ((4, 2), 9)),
    ((1280, 720), ((2, 1), 3), ((4, 2), 9)),
    ((1080, 1920), ((1, 2), 3), ((2, 4), 9)),
    ((500, 600), ((1, 1), 1), ((3, 4), 13)),
    ((2000, 500), ((4, 1), 5), ((4, 1), 5)),
    ((300, 2000), ((1, 6), 7), ((1, 7), 8)),
]


@pytest.mark.parametrize(("size", "max6", "max12"), WORKED)
def test_worked_examples(size, max6, max12):
    for max_num, (grid, tiles) in ((6, max6), (12, max12)):
        assert closest_grid(*size, max_num=max_num) == grid
        cols, rows = grid
        assert cols * rows + (cols * rows > 1) == tiles


@functools.cache
def _official_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def _official_reference(width: int, height: int, min_num: int, max_num: int, image_size: int = 448):
    """The official dynamic_preprocess grid choice, transcribed from spec §4.1 step by step."""
    target_ratios = _official_candidates(min_num, max_num)
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def test_grid_property_12k_random_triples():
    rng = np.random.default_rng(1234)
    n = 12_000
    # a mix of uniform sizes, exact multiples of 448 (where ties happen) and extreme aspect ratios
    widths = np.concatenate(
        [rng.integers(1, 8000, n // 3), 448 * rng.integers(1, 8, n // 3) // rng.integers(1, 4, n // 3)]
    )
    heights = np.concatenate(
        [rng.integers(1, 8000, n // 3), 448 * rng.integers(1, 8, n // 3) // rng.integers(1, 4, n // 3)]
    )
    widths = np.concatenate([widths, rng.integers(1, 30000, n - len(widths))])
    heights = np.concatenate([heights, rng.integers(1, 200, n - len(heights))])
    maxes = rng.choice([1, 2, 4, 6, 8, 12, 16, 24, 36, 40], n)
    mins = np.where(rng.random(n) < 0.2, rng.integers(1, 5, n), 1)
    mins = np.minimum(mins, maxes)
    ties = 0
    for w, h, lo, hi in zip(widths.tolist(), heights.tolist(), mins.tolist(), maxes.tolist(), strict=True):
        if rng.random() < 0.5:
            w, h = h, w
        ours = closest_grid(w, h, min_num=lo, max_num=hi)
        assert ours == _official_reference(w, h, lo, hi), (w, h, lo, hi)
        if lo == 1:  # transformers' independent implementation agrees whenever min_num = 1 (spec §4.2)
            assert ours == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi), (w, h, hi)
        ties += w * ours[1] == h * ours[0] and ours != (1, 1)
    assert ties > 100  # the tie-break branch really was exercised


def test_tie_example_from_spec():
    # 500x600, max 6: |0.8333-2/3| > |0.8333-1| in doubles, so (1,1) wins with no tie
    assert closest_grid(500, 600, max_num=6) == (1, 1)
    # 896x896: (2,2) wins the tie with (1,1); (3,3) needs area > 0.5*448^2*9 = 903,168 > 802,816
    assert closest_grid(896, 896) == (2, 2)
    assert closest_grid(951, 951) == (3, 3)  # 904,401 > 903,168


def test_min_num_order_matters_like_the_official_code():
    # With min = max = 4 the equal-product candidates tie; the set order decides (spec §4.2)
    official = [closest_grid(w, w, min_num=4, max_num=4) for w in (100, 2000)]
    hf = [closest_grid(w, w, min_num=4, max_num=4, order="hf") for w in (100, 2000)]
    reference = [_official_reference(w, w, 4, 4) for w in (100, 2000)]
    assert official == reference
    assert all(g[0] * g[1] == 4 for g in official + hf)


def _plain_pillow(image: Image.Image, max_num: int, size: int, use_thumbnail: bool = True, min_num: int = 1):
    """The official pixel path: resize to the grid, crop tiles in raster order, thumbnail of the original."""
    cols, rows = _official_reference(*image.size, min_num, max_num, size)
    resized = image.resize((cols * size, rows * size))
    tiles = [
        resized.crop(((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size))
        for k in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return np.stack([np.asarray(t) for t in tiles])


@pytest.mark.parametrize(
    ("size", "max_num", "tile"),
    [
        ((1024, 768), 12, 448),
        ((300, 2000), 12, 448),
        ((448, 448), 12, 448),
        ((896, 448), 6, 448),
        ((97, 61), 12, 56),
        ((1920, 1080), 6, 112),
        ((5, 300), 4, 28),
    ],
)
def test_tiles_equal_the_plain_pillow_path(size, max_num, tile):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tiled = dynamic_tiles(image, max_num=max_num, image_size=tile)
    expected = _plain_pillow(image, max_num, tile)
    assert tiled.num_tiles == len(expected)
    np.testing.assert_array_equal(tiled.pixels, expected)
    assert [np.asarray(t).tobytes() for t in tiled.tiles] == [e.tobytes() for e in expected]


def test_thumbnail_rules():
    image = Image.new("RGB", (1920, 960), (10, 20, 30))
    assert dynamic_tiles(image, max_num=12).num_tiles == 9  # (4,2) + thumbnail
    assert dynamic_tiles(image, max_num=12, use_thumbnail=False).num_tiles == 8
    single = dynamic_tiles(Image.new("RGB", (448, 448)), max_num=12)
    assert single.grid == (1, 1) and single.num_tiles == 1 and single.thumbnail is None
    forced = dynamic_tiles(Image.new("RGB", (448, 448)), min_num=2, max_num=2)
    assert forced.num_tiles == 3 and forced.thumbnail is not None


def test_non_rgb_input_is_converted_first():
    gray = Image.fromarray(np.arange(64 * 80, dtype=np.uint32).reshape(64, 80).astype(np.uint8), "L")
    tiled = dynamic_tiles(gray, image_size=28, max_num=4)
    np.testing.assert_array_equal(tiled.pixels, _plain_pillow(gray.convert("RGB"), 4, 28))


def test_normalisation_is_the_official_transform():
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    tiled = dynamic_tiles(image, max_num=6, image_size=112)
    out = tiled.to_tensor()
    # ToTensor (u8 / 255 in float32) then Normalize ((x - mean) / std in float32), computed with numpy
    x = tiled.pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, np.float32)[:, None, None]
    expected = (x - mean) / std
    assert out.shape == (tiled.num_tiles, 3, 112, 112) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(expected))
    assert torch.equal(tiled.to_tensor(dtype=torch.bfloat16), out.to(torch.bfloat16))
    assert torch.equal(tiled.to_tensor(device="cpu"), out)
    # the accelerator path (uint8 moved first, torch arithmetic on the device) computes the same values
    assert torch.equal(
        _normalize_on_device([tiled], IMAGENET_MEAN, IMAGENET_STD, torch.float32, torch.device("cpu")), out
    )


def test_matches_transformers_got_ocr2_pil_processor():
    rng = np.random.default_rng(6)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((700, 300), (200, 900))]
    reference = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=6,
        size={"height": 112, "width": 112},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )(images=images, return_tensors="pt")
    tiled = dynamic_tiles_many(images, max_num=6, image_size=112)
    ours = normalize_tiled(tiled)
    assert [t.num_tiles for t in tiled] == reference["num_patches"].tolist()
    torch.testing.assert_close(ours, reference["pixel_values"], atol=1e-6, rtol=0)


def test_many_with_per_image_budgets_and_threads():
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((640, 480), (100, 700))]
    serial = dynamic_tiles_many(images, max_num=[12, 3], image_size=56, parallel=False)
    threaded = dynamic_tiles_many(images, max_num=[12, 3], image_size=56, parallel=True)
    assert [t.grid for t in serial] == [
        closest_grid(640, 480, image_size=56),
        closest_grid(100, 700, max_num=3, image_size=56),
    ]
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
    assert normalize_tiled(serial).shape[0] == sum(t.num_tiles for t in serial)


def test_default_uses_the_pool_only_when_the_work_pays_for_the_hand_off(monkeypatch):
    """Small frames are resized inline (a pool hand-off costs more than their resize); big photos in parallel."""
    import ivl.processing.tiling as tiling

    submitted = []
    real_pool = tiling.worker_pool

    class CountingPool:
        def submit(self, fn, *args):
            submitted.append(args[1])
            return real_pool().submit(fn, *args)

    monkeypatch.setattr(tiling, "worker_pool", CountingPool)
    frames = [Image.new("RGB", (112, 56), (10 * k, 0, 0)) for k in range(8)]
    small = dynamic_tiles_many(frames, max_num=1, image_size=56)
    assert submitted == [] and len(small) == 8
    photos = [Image.new("RGB", (1000, 800)), Image.new("RGB", (800, 1000))]
    big = dynamic_tiles_many(photos, max_num=6, image_size=448)
    assert len(submitted) == sum(1 + (t.thumbnail is not None) for t in big) == 4  # grid + thumbnail of each
    serial = dynamic_tiles_many(photos, max_num=6, image_size=448, parallel=False)
    for a, b in zip(big, serial, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def _tile_counts() -> list[int]:
    images = [Image.new("RGB", (900, 500)), Image.new("RGB", (300, 700))]
    return [t.num_tiles for t in dynamic_tiles_many(images, parallel=True)]


def test_thread_pool_survives_fork():
    expected = _tile_counts()  # starts the shared pool in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:  # like a DataLoader worker
        assert pool.apply_async(_tile_counts).get(timeout=60) == expected


def test_lazily_opened_files_are_loaded_before_threads_share_them(tmp_path):
    rng = np.random.default_rng(9)
    source = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    source.save(tmp_path / "lazy.png")
    expected = _plain_pillow(source, 12, 56)
    for _ in range(5):  # grid and thumbnail resizes of a not-yet-decoded PNG run on two threads at once
        tiled = dynamic_tiles_many([Image.open(tmp_path / "lazy.png")], image_size=56, parallel=True)[0]
        np.testing.assert_array_equal(tiled.pixels, expected)
        pixels, _ = images_to_pixel_values([Image.open(tmp_path / "lazy.png")], image_size=56)
        assert pixels.shape[0] == len(expected)


def test_nested_use_from_pool_threads_does_not_deadlock():
    from ivl.processing.images import worker_pool

    images = [Image.new("RGB", (900, 500)), Image.new("RGB", (300, 700))]
    expected = images_to_pixel_values(images)[1]
    futures = [worker_pool().submit(images_to_pixel_values, images) for _ in range(2 * (os.cpu_count() or 1))]
    assert all(f.result(timeout=60)[1] == expected for f in futures)


def test_images_to_pixel_values_loads_in_parallel(tmp_path):
    rng = np.random.default_rng(8)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((300, 200), (90, 400))]
    paths = []
    for k, image in enumerate(images):
        paths.append(tmp_path / f"{k}.png")
        image.save(paths[-1])
    pixels, counts = images_to_pixel_values([paths[0], images[1], str(paths[1])], max_num=4, image_size=56)
    expected = [dynamic_tiles(im, max_num=4, image_size=56) for im in (images[0], images[1], images[1])]
    assert counts == [t.num_tiles for t in expected]
    assert torch.equal(pixels, normalize_tiled(expected))


def test_bad_tile_ranges():
    with pytest.raises(ConfigError, match="min_num=5"):
        closest_grid(10, 10, min_num=5, max_num=2)
    with pytest.raises(ConfigError):
        dynamic_tiles(Image.new("RGB", (4, 4)), max_num=0)
    with pytest.raises(ConfigError):
        dynamic_tiles_many([Image.new("RGB", (4, 4))], max_num=[1, 2])
