"""Tiny Mono-InternVL models, tokenizer and checkpoints shared by the Mono tests (fp32, offline, seeded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mono_helpers import IMG_CONTEXT, IMG_END, IMG_START, tiny_mono

from ivl.config import MonoConfig, get_preset
from ivl.models.mono import MonoInternVL

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def mono_model() -> MonoInternVL:
    return tiny_mono()


@pytest.fixture
def mono_config() -> MonoConfig:
    return get_preset("mono-tiny")


@pytest.fixture(scope="session")
def mono_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An InternLM2-style tiny tokenizer (``<s>`` prepended, 507 tokens, ``<IMG_CONTEXT>`` = 500)."""
    from ivl.processing.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("mono_tokenizer")
    tok = build_tokenizer(flavour="internlm2", save_dir=path)
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [IMG_START, IMG_END, IMG_CONTEXT]
    return path


@pytest.fixture(scope="session")
def mono_checkpoint(tmp_path_factory: pytest.TempPathFactory, mono_tokenizer_dir: Path) -> Path:
    """A saved tiny Mono-InternVL (official layout) with its tokenizer."""
    from ivl.checkpoint.io import save_model

    path = tmp_path_factory.mktemp("mono_ckpt") / "mono-tiny"
    save_model(tiny_mono(seed=1), path, layout="official", copy_files_from=mono_tokenizer_dir)
    return path
