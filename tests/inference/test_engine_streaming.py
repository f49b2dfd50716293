"""UTF-8-safe incremental detokenisation and stop-string hold-back."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ivl.errors import GenerationError
from ivl.inference.streaming import (
    GROUNDING_TOKENS,
    IncrementalDetokenizer,
    StopStringMatcher,
    TextStream,
    special_ids,
)

TEXTS = [
    "hello world, this is a small test of streaming text",
    "你好，世界！书生·万象是一个多模态大模型。",
    "emoji 😀🎉👍 and accents café naïve",
    "<ref>cat</ref><box>[[1, 2, 3, 4]]</box>",
]


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # a small vocabulary keeps multi-byte characters split across several tokens
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_multibyte_characters_are_split_across_tokens(byte_tokenizer) -> None:
    ids = byte_tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # otherwise the following tests would not exercise partial characters


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_and_never_split_chars(byte_tokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == byte_tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_random_token_streams_match_full_decode(byte_tokenizer) -> None:
    rng = random.Random(0)
    vocab = len(byte_tokenizer)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))]
        detok = IncrementalDetokenizer(byte_tokenizer)
        streamed = "".join(detok.push(i) for i in ids) + detok.flush()
        full = byte_tokenizer.decode(ids, skip_special_tokens=True)
        # random bytes may form invalid UTF-8; away from such spots the stream equals the full decode
        if "\ufffd" not in full:
            assert streamed == full


def test_special_tokens_are_skipped(byte_tokenizer) -> None:
    ids = [*byte_tokenizer.encode("ok", add_special_tokens=False), byte_tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "ok"


def test_stop_string_cuts_and_holds_back_prefix() -> None:
    m = StopStringMatcher(["STOP", "<end>"])
    out = [m.push("abc S"), m.push("T"), m.push("x"), m.push(" <en"), m.push("d> tail")]
    assert out == ["abc ", "", "STx", " ", ""]
    assert m.stopped and m.text == "abc STx "


def test_stop_string_spanning_deltas_is_never_emitted() -> None:
    m = StopStringMatcher(["\n\nUser:"])
    pieces = ["Answer", "\n", "\nUs", "er", ":", " more"]
    shown = "".join(m.push(p) for p in pieces) + m.flush()
    assert shown == "Answer" and m.stopped


def test_earliest_stop_wins() -> None:
    m = StopStringMatcher(["bb", "a"])
    assert m.push("xxbba") == "xx"


def test_flush_releases_unresolved_tail() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("value ST") == "value "
    assert m.flush() == "ST" and not m.stopped


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(GenerationError, match="stop"):
        StopStringMatcher(["ok", ""])


def test_text_stream_with_multibyte_stop(byte_tokenizer) -> None:
    text = "你好，世界！书生"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(byte_tokenizer, ["世界"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        if stream.stopped:
            break
    shown += stream.finish()
    assert shown == "你好，" and stream.stopped


def test_grounding_tags_survive_other_specials_do_not(tiny_tok) -> None:
    text = "<ref>cat</ref><box>[[1, 2, 3, 4]]</box>"
    ids = [*tiny_tok.encode(text, add_special_tokens=False), tiny_tok.convert_tokens_to_ids("<|im_end|>")]
    ids = [tiny_tok.convert_tokens_to_ids("<img>"), *ids]
    skip = special_ids(tiny_tok, GROUNDING_TOKENS)
    assert tiny_tok.convert_tokens_to_ids("<ref>") not in skip
    assert tiny_tok.convert_tokens_to_ids("<IMG_CONTEXT>") in skip
    detok = IncrementalDetokenizer(tiny_tok, skip_ids=skip)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == text
    everything = IncrementalDetokenizer(tiny_tok, skip_ids=special_ids(tiny_tok))
    assert "".join(everything.push(i) for i in ids) + everything.flush() == "cat[[1, 2, 3, 4]]"
