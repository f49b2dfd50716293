"""Engine: cache == no cache, batched == one by one, continuous joins, stops, seeds, vision once per request."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from ivl.errors import GenerationError, ModelInputError
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest

N_IMG = 4  # tokens per tile in the tiny preset


def _image_prompt(tok, tiles: int, text: str = " what is this?") -> list[int]:
    return tok.encode("look:") + [500] * (N_IMG * tiles) + tok.encode(text)


def _requests(tok, gen: GenerationConfig, seed: int = 0) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    return [
        GenerationRequest(tok.encode("hello world"), generation=gen),
        GenerationRequest(_image_prompt(tok, 2), pixel_values=torch.randn(2, 3, 56, 56, generator=g), generation=gen),
        GenerationRequest(tok.encode("The quick brown fox jumps over the lazy dog. " * 2), generation=gen),
        GenerationRequest(
            _image_prompt(tok, 1, "?"), pixel_values=torch.randn(1, 3, 56, 56, generator=g), generation=gen
        ),
        GenerationRequest(tok.encode("A"), generation=gen),
    ]


def _greedy_without_cache(model, request: GenerationRequest, steps: int) -> list[int]:
    """Reference: re-run the whole sequence every step, no cache, no padding."""
    ids = torch.as_tensor(request.input_ids)[None]
    feats = None
    if request.pixel_values is not None:
        feats = model.encode_images(request.pixel_values.to(next(model.parameters()).dtype))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, image_features=feats).logits[0, -1]
            logits[model.config.image_token_id] = float("-inf")  # the engine never emits <IMG_CONTEXT>
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("mono", [False, True])
def test_greedy_with_cache_equals_without_cache(tiny_tok, mono: bool) -> None:
    model = build_model(mono=mono)
    gen = GenerationConfig(max_new_tokens=10, stop_token_ids=[])
    engine = Engine(model, tiny_tok)
    for req in _requests(tiny_tok, gen)[:2]:
        ours = engine.generate([req])[0].token_ids
        assert ours == _greedy_without_cache(model, req, 10)
        assert len(set(ours)) > 3  # the model is not degenerate, so equality means something


@pytest.mark.parametrize("mono", [False, True])
def test_batched_equals_one_by_one(tiny_tok, mono: bool) -> None:
    model = build_model(mono=mono, dtype=torch.float64)  # fp64: padding-induced rounding cannot flip an argmax
    gens = [GenerationConfig(max_new_tokens=n, stop_token_ids=[]) for n in (9, 4, 12, 7, 1)]
    reqs = [
        GenerationRequest(r.input_ids, pixel_values=r.pixel_values, generation=g)
        for r, g in zip(_requests(tiny_tok, GenerationConfig()), gens, strict=True)
    ]
    single = [Engine(model, tiny_tok).generate([r])[0] for r in reqs]
    batched = Engine(model, tiny_tok, max_batch_size=8).generate(reqs)
    # max_batch_size=2: rows finish at different times and queued requests join the running batch
    joined = Engine(model, tiny_tok, max_batch_size=2).generate(reqs)
    for s, b, j, g in zip(single, batched, joined, gens, strict=True):
        assert len(s.token_ids) == g.max_new_tokens and s.finish_reason == "length"
        assert b.token_ids == s.token_ids
        assert j.token_ids == s.token_ids
        assert b.text == s.text == j.text
        assert b.prompt_tokens == s.prompt_tokens


def test_stop_token_ends_sequence_and_is_not_in_text(tiny_tok, tiny_model) -> None:
    req = _requests(tiny_tok, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))[0]
    free = Engine(tiny_model, tiny_tok).generate([req])[0]
    stop_at = 5
    stop_id = free.token_ids[stop_at]
    first = free.token_ids.index(stop_id)
    req2 = GenerationRequest(req.input_ids, generation=GenerationConfig(max_new_tokens=12, stop_token_ids=[stop_id]))
    engine = Engine(tiny_model, tiny_tok)
    res = engine.generate([req2])[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[: first + 1]
    assert res.text == tiny_tok.decode([i for i in free.token_ids[:first] if i not in engine.skip_ids])


def test_image_context_token_is_never_generated(tiny_tok, tiny_model) -> None:
    engine = Engine(tiny_model, tiny_tok)
    batch, _ = engine.prefill(_requests(tiny_tok, GenerationConfig(max_new_tokens=3, stop_token_ids=[]))[:1])
    logits = torch.zeros(1, tiny_model.config.text.vocab_size)
    logits[0, 500] = 100.0
    events = engine._advance(batch, logits)
    assert events[0].token_id != 500


def test_default_stop_is_im_end(tiny_tok, tiny_model) -> None:
    engine = Engine(tiny_model, tiny_tok)
    assert tiny_tok.convert_tokens_to_ids("<|im_end|>") in engine.default_stop_ids


def test_stop_string_truncates_text(tiny_tok, tiny_model) -> None:
    req = _requests(tiny_tok, GenerationConfig(max_new_tokens=16, stop_token_ids=[]))[2]
    free = Engine(tiny_model, tiny_tok).generate([req])[0]
    text = free.text
    visible = [i for i, ch in enumerate(text) if ch.isprintable() and ch != "\ufffd"]
    assert len(visible) >= 4
    cut = visible[len(visible) // 2]
    stop = text[cut : cut + 2] if cut + 2 <= len(text) else text[cut:]
    gen = GenerationConfig(max_new_tokens=16, stop_token_ids=[], stop=[stop])
    res = Engine(tiny_model, tiny_tok).generate([GenerationRequest(req.input_ids, generation=gen)])[0]
    assert res.finish_reason == "stop"
    assert res.text == text[: text.find(stop)]
    assert stop not in res.text
    assert len(res.token_ids) <= len(free.token_ids)


def test_stream_deltas_join_to_generated_text(tiny_tok, tiny_model) -> None:
    engine = Engine(tiny_model, tiny_tok)
    for req in _requests(tiny_tok, GenerationConfig(max_new_tokens=14, stop_token_ids=[]))[:3]:
        deltas = list(engine.stream(req))
        assert "".join(deltas) == engine.generate([req])[0].text
        assert all(deltas)


def test_seeded_sampling_reproducible_and_batch_independent(tiny_tok, tiny_model) -> None:
    def gen(seed: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, seed=seed, stop_token_ids=[]
        )

    prompt = tiny_tok.encode("hello world")
    alone = Engine(tiny_model, tiny_tok).generate([GenerationRequest(prompt, generation=gen(7))])[0]
    mixed = Engine(tiny_model, tiny_tok).generate(
        [
            GenerationRequest(tiny_tok.encode("other prompt here"), generation=gen(1)),
            GenerationRequest(prompt, generation=gen(7)),
            GenerationRequest(prompt, generation=gen(8)),
        ]
    )
    assert mixed[1].token_ids == alone.token_ids
    assert mixed[2].token_ids != alone.token_ids


def test_vision_encoder_runs_once_per_prefill(tiny_tok) -> None:
    model = build_model()
    calls: list[int] = []
    original = model.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return original(pixels)

    model.encode_images = counting
    reqs = _requests(tiny_tok, GenerationConfig(max_new_tokens=6, stop_token_ids=[]))
    Engine(model, tiny_tok).generate(reqs)
    assert calls == [3]  # 2 + 1 tiles of both image requests, one batched call, never again while decoding


def test_precomputed_image_features(tiny_tok, tiny_model) -> None:
    req = _requests(tiny_tok, GenerationConfig(max_new_tokens=6, stop_token_ids=[]))[1]
    with torch.no_grad():
        feats = tiny_model.encode_images(req.pixel_values)
    a = Engine(tiny_model, tiny_tok).generate([req])[0]
    b = Engine(tiny_model, tiny_tok).generate(
        [GenerationRequest(req.input_ids, image_features=feats, generation=req.generation)]
    )[0]
    assert a.token_ids == b.token_ids


def test_cancel_leaves_batch(tiny_tok, tiny_model) -> None:
    engine = Engine(tiny_model, tiny_tok)
    reqs = _requests(tiny_tok, GenerationConfig(max_new_tokens=20, stop_token_ids=[]))[:2]
    batch, events = engine.prefill(reqs)
    engine.cancel(batch, reqs[0].request_id)
    events = engine.step(batch)
    assert events[0].finish_reason == "cancelled" and len(batch) == 1


def test_bfloat16_model_generates(tiny_tok) -> None:
    model = build_model(dtype=torch.bfloat16)
    reqs = _requests(tiny_tok, GenerationConfig(max_new_tokens=4, stop_token_ids=[]))[:2]
    res = Engine(model, tiny_tok).generate(reqs)
    assert [len(r.token_ids) for r in res] == [4, 4]


def test_image_token_mismatch_raises(tiny_tok, tiny_model) -> None:
    req = GenerationRequest(_image_prompt(tiny_tok, 2), pixel_values=torch.randn(1, 3, 56, 56))
    with pytest.raises(ModelInputError, match="image tokens"):
        Engine(tiny_model, tiny_tok).generate([req])


def test_prompt_longer_than_context_raises(tiny_tok, tiny_model) -> None:
    req = GenerationRequest([5] * 5000)
    with pytest.raises(GenerationError, match="context"):
        Engine(tiny_model, tiny_tok).generate([req])


def test_max_new_tokens_clamped_to_context(tiny_tok, tiny_model) -> None:
    req = GenerationRequest([5] * 4090, generation=GenerationConfig(max_new_tokens=50, stop_token_ids=[]))
    res = Engine(tiny_model, tiny_tok).generate([req])[0]
    assert len(res.token_ids) == 6 and res.finish_reason == "length"


def test_generation_config_from_official_dict() -> None:
    cfg = GenerationConfig.from_any({"max_new_tokens": 8, "do_sample": False, "eos_token_id": 3, "num_beams": 1})
    assert cfg.max_new_tokens == 8 and cfg.stop_token_ids == [3]
    with pytest.raises(GenerationError, match="num_beams"):
        GenerationConfig.from_any({"num_beams": 4})
    with pytest.raises(GenerationError, match="bogus"):
        GenerationConfig.from_any({"bogus": 1})
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(GenerationError, match="temperature"):
        GenerationConfig(temperature=-0.5)
    assert GenerationConfig(stop="x").stop == ["x"]


@pytest.mark.parametrize("mono", [False, True])
def test_shared_prefix_cache_is_exact(tiny_tok, mono: bool) -> None:
    """Reusing the template prefix's KV gives the same tokens as prefilling everything (batched and joined)."""
    from ivl.processing.processor import Processor

    model = build_model(mono=mono, dtype=torch.float64)
    processor = Processor.from_config(tiny_tok, model.config, max_num=2)
    g = torch.Generator().manual_seed(1)
    prompts = [
        ("Describe the picture.", [torch.rand(3, 60, 90, generator=g).permute(1, 2, 0).numpy()]),
        ("Hello", None),
        (
            "What is shown in the picture? Answer briefly.",
            [torch.rand(3, 40, 40, generator=g).permute(1, 2, 0).numpy()],
        ),
    ]
    gens = [GenerationConfig(max_new_tokens=n, stop_token_ids=[]) for n in (8, 5, 11)]
    reqs = [
        GenerationRequest.from_inputs(processor(q, images=imgs), gen)
        for (q, imgs), gen in zip(prompts, gens, strict=True)
    ]
    plain = Engine(model, processor, prefix_cache=False)
    cached = Engine(model, processor, max_batch_size=2)
    expected = [plain.generate([r])[0].token_ids for r in reqs]
    assert [r.token_ids for r in cached.generate(reqs)] == expected
    assert cached._prefix is not None and cached._prefix.numel() > 10  # the system block really was shared
    assert [cached.generate([r])[0].token_ids for r in reqs] == expected
    # a custom system message does not match the cached prefix: full prefill, same result as without cache
    own = GenerationRequest.from_inputs(processor("Hello", system_message="Be terse."), gens[0])
    assert cached.generate([own])[0].token_ids == plain.generate([own])[0].token_ids
