"""Shared test fixtures (session-scoped, built offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A saved qwen2-style tiny tokenizer (507 tokens, ``<IMG_CONTEXT>`` = 500 like the ``tiny`` preset)."""
    from ivl.processing.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(flavour="qwen2", save_dir=path)
    return path
