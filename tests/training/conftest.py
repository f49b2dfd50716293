"""Fixtures of the trainer tests: a tiny synthetic world, a tokenizer, and a recipe builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def train_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train records each of colour (plain), shape (JPEG-augmented) and text; images 56-112 px."""
    from ivl.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("train_world") / "world"
    generate_world(
        root, seed=0, n_train=16, n_val=0, n_test=0, tasks=["colour", "shape", "text"],
        image_size_range=(56, 112), absolute_paths=True,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def train_tokenizer(tmp_path_factory: pytest.TempPathFactory, train_world: Path) -> Path:
    from ivl.data.synthetic import corpus_texts
    from ivl.processing.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("train_tokenizer")
    build_tokenizer(corpus_texts(train_world), flavour="qwen2", save_dir=path)
    return path


@pytest.fixture
def make_recipe(train_world: Path, train_tokenizer: Path, tmp_path: Path):
    """``make_recipe(**sections)`` → a plain recipe mapping for the tiny preset on the tiny world."""
    from ivl.training.recipe import deep_merge

    def build(**sections: Any) -> dict[str, Any]:
        base = {
            "name": "tiny",
            "model": {"preset": "tiny", "tokenizer": str(train_tokenizer)},
            "data": {
                "meta": str(train_world / "train_meta.json"),
                "max_packed_tokens": 192,
                "max_packed_tiles": 12,
                "max_dynamic_patch": 2,
                "num_epochs": None,
            },
            "stage": {"name": "stage2"},
            "optim": {"lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.01},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "progress": False, "threads": 1},
        }
        return deep_merge(base, sections)

    return build
