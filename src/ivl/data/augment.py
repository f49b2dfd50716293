"""Random JPEG compression (spec §6.3): each tile re-encoded at a quality drawn uniformly from 75…100.

Randomness comes from a generator derived from (seed, sample key), so the same sample gets the same
qualities when it is re-read after a resume, and different epochs see different qualities.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ivl.errors import ConfigError

_JPEG_STREAM = 0x1B6E_6A00


def jpeg_recompress(image: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at ``quality`` and decode again (RGB), as the official ``simulate_jpeg_degradation``."""
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def augment_rng(seed: int, key: Sequence[int]) -> np.random.Generator:
    """A generator private to one sample (key = dataset, record, epoch) of one run (seed)."""
    return np.random.default_rng([int(seed), _JPEG_STREAM, *(int(k) for k in key)])


class RandomJpeg:
    """Per-tile JPEG re-encoding with an independent uniform integer quality in [min_quality, max_quality]."""

    def __init__(self, min_quality: int = 75, max_quality: int = 100) -> None:
        if not 1 <= min_quality <= max_quality <= 100:
            raise ConfigError(
                f"JPEG quality range must satisfy 1 <= min <= max <= 100, got [{min_quality}, {max_quality}]"
            )
        self.min_quality = min_quality
        self.max_quality = max_quality

    def qualities(self, count: int, rng: np.random.Generator) -> list[int]:
        return [int(q) for q in rng.integers(self.min_quality, self.max_quality + 1, size=count)]

    def __call__(self, tiles: Sequence[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
        return [jpeg_recompress(t, q) for t, q in zip(tiles, self.qualities(len(tiles), rng), strict=True)]
