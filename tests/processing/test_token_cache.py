"""TokenCache: remembered piece ids equal the tokenizer's, and the cache never serves stale ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ivl.config import get_preset
from ivl.processing.processor import Processor
from ivl.processing.token_cache import TokenCache

PIECES = [
    "<|im_start|>system\nYou are a tiny InternVL.<|im_end|>\n",
    "<|im_start|>user\n",
    "\nHow many red circles are there? Answer with a number.<|im_end|>\n",
    "<|im_start|>assistant\n4<|im_end|>\n",
    "",
    "Image-1: ",
]


@pytest.fixture()
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _reference(tok, pieces):
    return [list(ids) for ids in tok(list(pieces), add_special_tokens=False)["input_ids"]]


def test_ids_equal_the_tokenizers_on_first_and_repeated_use(tok):
    cache = TokenCache(tok)
    pieces = PIECES + PIECES[:3]  # repeats inside one call
    assert cache.encode(pieces) == _reference(tok, pieces)
    assert (cache.misses, cache.hits) == (len(PIECES), 3)
    assert cache.encode(PIECES) == _reference(tok, PIECES)
    assert cache.misses == len(PIECES) and cache.hits == 3 + len(PIECES)


def test_a_returned_list_can_be_changed_without_changing_the_cache(tok):
    cache = TokenCache(tok)
    first = cache.encode(PIECES[:1])[0]
    first.append(-1)
    assert cache.encode(PIECES[:1]) == _reference(tok, PIECES[:1])


def test_a_full_cache_forgets_and_stays_correct(tok):
    cache = TokenCache(tok, max_entries=2)
    for _ in range(2):
        for piece in PIECES:
            assert cache.encode([piece]) == _reference(tok, [piece])
            assert len(cache) <= 2
        assert cache.encode(PIECES) == _reference(tok, PIECES)  # more new pieces in one call than fit
        assert len(cache) <= 2


def test_tokens_added_to_the_tokenizer_invalidate_remembered_pieces(tok):
    cache = TokenCache(tok)
    piece = "a zebra crossing"
    before = cache.encode([piece])
    tok.add_tokens(["zebra"])
    after = cache.encode([piece])
    assert after == _reference(tok, [piece]) != before


def test_size_zero_remembers_nothing_and_a_negative_size_is_refused(tok):
    cache = TokenCache(tok, max_entries=0)
    for _ in range(2):
        assert cache.encode(PIECES) == _reference(tok, PIECES)
    assert len(cache) == 0 and cache.hits == 0
    with pytest.raises(ValueError, match="max_entries"):
        TokenCache(tok, max_entries=-1)


def test_processor_encodings_are_the_same_with_a_warm_cache_and_after_a_tokenizer_swap(tiny_tokenizer_dir):
    proc = Processor.from_config(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), get_preset("tiny"))
    messages = [{"role": "user", "content": "Is red a colour or a shape?"}, {"role": "assistant", "content": "colour"}]
    cold = proc.encode_conversation(messages)
    warm = proc.encode_conversation(messages)
    assert proc.token_cache.hits > 0
    assert warm.input_ids.tolist() == cold.input_ids.tolist() and warm.labels.tolist() == cold.labels.tolist()

    swapped = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    swapped.add_tokens(["colour or"])
    proc.tokenizer = swapped
    fresh = Processor.from_config(swapped, get_preset("tiny")).encode_conversation(messages)
    again = proc.encode_conversation(messages)
    assert again.input_ids.tolist() == fresh.input_ids.tolist() != cold.input_ids.tolist()


def test_threads_sharing_a_small_cache_get_correct_ids_and_it_pickles(tok):
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    cache = TokenCache(tok, max_entries=3)  # forgets all the time while other threads read
    texts = [f"How many {n} red circles? Image-{n % 3}" for n in range(40)]
    expected = _reference(tok, texts)

    def work(k: int) -> bool:
        return all(cache.encode([texts[(k + j) % 40]]) == [expected[(k + j) % 40]] for j in range(40))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.encode(texts[:5]) == expected[:5] and len(copy) <= 3


def test_long_pieces_are_tokenised_every_time_and_never_held(tok):
    cache = TokenCache(tok, max_piece_chars=20)
    long = "Describe every object in this picture in detail."
    for _ in range(2):
        assert cache.encode([long, PIECES[1]]) == _reference(tok, [long, PIECES[1]])
    assert len(cache) == 1 and cache.misses == 3  # the long piece missed both times; the short one once
