"""The tiny offline tokenizer: id layout of the real checkpoints, determinism, AutoTokenizer round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ivl.errors import ConfigError
from ivl.processing.tokenizer import INTERNVL_TOKENS, build_tokenizer

SAMPLES = ["Hello world!", "你好，世界。", "a <img><IMG_CONTEXT></img> b", "  spaces\n\nand newlines\t"]


def test_qwen2_layout_matches_real_checkpoints(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 507
    # spec §3.4: nine tokens appended in this order, ids sequential, the last id is </box>
    assert [tok.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS] == list(range(498, 507))
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 500  # the `tiny` preset's image_token_id
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [495, 496, 497]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok("abc").input_ids == tok("abc", add_special_tokens=False).input_ids  # Qwen adds no BOS
    assert tok.convert_ids_to_tokens(0) == "!"  # like Qwen, id 0 is a real token (spec §10.12)


def test_special_tokens_are_atomic_and_skippable(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tok("x<img><IMG_CONTEXT><IMG_CONTEXT></img>y", add_special_tokens=False).input_ids
    assert ids[1:5] == [498, 500, 500, 499]
    assert tok.decode(ids, skip_special_tokens=True) == "xy"
    assert tok.context_image_token == "<IMG_CONTEXT>" and tok.start_image_token == "<img>"


@pytest.mark.parametrize("flavour", ["qwen2", "internlm2"])
def test_round_trip_and_determinism(tmp_path, flavour):
    texts = ["The cat sat on the mat.", "Numbers 123 and 456."] * 5
    first = build_tokenizer(texts, flavour=flavour, save_dir=tmp_path / "a")
    second = build_tokenizer(texts, flavour=flavour)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    for text in SAMPLES:
        assert loaded(text).input_ids == first(text).input_ids
        assert loaded.decode(loaded(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless


@pytest.mark.parametrize("flavour", ["qwen2", "internlm2"])
def test_numbers_are_spelled_digit_by_digit(tmp_path, flavour):
    # a corpus full of the same coordinates: a plain byte-level BPE merges them into tokens like "Ġ1000"
    box = "<box>[[38, 0, 1000, 1000]]</box>"
    build_tokenizer([f"the red circle {box}"] * 50, flavour=flavour, save_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pieces = tok.convert_ids_to_tokens(tok(box, add_special_tokens=False).input_ids)
    digits = [p.removeprefix("Ġ") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("38") + ["0"] + list("1000") * 2  # as Qwen2's pre-tokenizer splits them
    assert tok.decode(tok(box, add_special_tokens=False).input_ids) == box


def test_internlm2_flavour_adds_bos(tmp_path):
    tok = build_tokenizer(flavour="internlm2", save_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 496 and tok.convert_tokens_to_ids("<|im_start|>") == 497
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 500
    ids = tok("hello").input_ids
    assert ids[0] == 1 and ids[1:] == tok("hello", add_special_tokens=False).input_ids
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_vocab_size_controls_the_top_ids():
    tok = build_tokenizer(vocab_size=700)
    assert len(tok) == 700
    assert tok.convert_tokens_to_ids("</box>") == 699
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 693


def test_too_small_vocab_is_rejected():
    with pytest.raises(ConfigError, match="too small"):
        build_tokenizer(vocab_size=200)
    with pytest.raises(ConfigError, match="flavour"):
        build_tokenizer(flavour="llama")  # type: ignore[arg-type]
