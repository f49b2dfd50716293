"""Random JPEG compression: per-tile quality uniform in 75..100, seeded per sample."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ivl.data.augment import RandomJpeg, augment_rng, jpeg_recompress
from ivl.errors import ConfigError


def noisy(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def psnr(a, b):
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


def test_recompress_is_a_real_jpeg_roundtrip():
    img = noisy(0)
    out = jpeg_recompress(img, 75)
    assert out.mode == "RGB" and out.size == img.size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    x = np.linspace(0, 255, 64)
    smooth = Image.fromarray(
        np.stack(np.broadcast_arrays(x[None, :], x[:, None], x[::-1, None] * 0 + 128), -1).astype(np.uint8)
    )
    assert psnr(smooth, jpeg_recompress(smooth, 100)) > psnr(smooth, jpeg_recompress(smooth, 75)) + 5
    with pytest.raises(ConfigError, match="quality"):
        jpeg_recompress(img, 0)


def test_quality_distribution_is_uniform_over_75_to_100():
    counts = Counter(RandomJpeg().qualities(26_000, np.random.default_rng(0)))
    assert set(counts) == set(range(75, 101))
    assert max(counts.values()) < 1200 and min(counts.values()) > 800  # expected 1000 each


def test_each_tile_gets_its_own_seeded_quality():
    tiles = [noisy(i) for i in range(6)]
    aug = RandomJpeg()
    qualities = aug.qualities(6, augment_rng(7, (0, 3, 1)))
    assert len(set(qualities)) > 1
    out = aug(tiles, augment_rng(7, (0, 3, 1)))
    for tile, q, o in zip(tiles, qualities, out, strict=True):
        assert np.array_equal(np.asarray(o), np.asarray(jpeg_recompress(tile, q)))
    again = aug(tiles, augment_rng(7, (0, 3, 1)))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again, strict=True))
    assert aug.qualities(6, augment_rng(7, (0, 3, 2))) != qualities  # another epoch, other qualities
