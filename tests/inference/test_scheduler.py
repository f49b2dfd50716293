"""Continuous batching scheduler: concurrent requests share batches and still equal one-by-one results."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ivl.errors import ModelInputError
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest
from ivl.inference.scheduler import Scheduler, SchedulerBusy


def _reqs(tok, n: int, max_new=(5, 9, 3, 12, 7, 4)) -> list[GenerationRequest]:
    prompts = ["hello", "The quick brown fox", "A red square", "你好，世界", "Describe the image", "42"]
    return [
        GenerationRequest(
            tok.encode(prompts[i % len(prompts)] * (1 + i % 3)),
            generation=GenerationConfig(max_new_tokens=max_new[i % len(max_new)], stop_token_ids=[]),
        )
        for i in range(n)
    ]


def test_concurrent_requests_are_batched_and_exact(tiny_tok, tiny_model_f64) -> None:
    reqs = _reqs(tiny_tok, 6)
    expected = [Engine(tiny_model_f64, tiny_tok).generate([r])[0].token_ids for r in reqs]
    sched = Scheduler(Engine(tiny_model_f64, tiny_tok, max_batch_size=4), batch_window_s=0.05).start()
    try:

        async def main():
            return await asyncio.gather(*(sched.generate(r) for r in reqs))

        results = asyncio.run(main())
    finally:
        sched.stop()
    assert [r.token_ids for r in results] == expected
    assert sched.max_rows_seen > 1  # requests really shared decode steps
    assert sched.max_rows_seen <= 4


def test_late_request_joins_running_batch(tiny_tok, tiny_model_f64) -> None:
    long, short = _reqs(tiny_tok, 2, max_new=(40, 5))
    expected = [Engine(tiny_model_f64, tiny_tok).generate([r])[0].token_ids for r in (long, short)]
    sched = Scheduler(Engine(tiny_model_f64, tiny_tok), batch_window_s=0.0).start()
    try:

        async def main():
            first = asyncio.create_task(sched.generate(long))
            while sched.steps < 3:  # the long request is already decoding
                await asyncio.sleep(0.001)
            second = await sched.generate(short)
            return await first, second, sched.steps

        a, b, steps_when_short_done = asyncio.run(main())
    finally:
        sched.stop()
    assert [a.token_ids, b.token_ids] == expected
    assert sched.max_rows_seen == 2  # the short one joined mid-flight instead of waiting
    assert steps_when_short_done < 40


def test_bad_request_fails_alone(tiny_tok, tiny_model) -> None:
    good = _reqs(tiny_tok, 2)
    bad = GenerationRequest(tiny_tok.encode("x") + [500] * 4, pixel_values=None)
    sched = Scheduler(Engine(tiny_model, tiny_tok), batch_window_s=0.05).start()
    try:

        async def main():
            return await asyncio.gather(*(sched.generate(r) for r in [good[0], bad, good[1]]), return_exceptions=True)

        out = asyncio.run(main())
    finally:
        sched.stop()
    assert isinstance(out[1], ModelInputError)
    assert len(out[0].token_ids) == 5 and len(out[2].token_ids) == 9


def test_stream_consumer_leaving_cancels(tiny_tok, tiny_model) -> None:
    req = _reqs(tiny_tok, 1, max_new=(400,))[0]
    sched = Scheduler(Engine(tiny_model, tiny_tok)).start()
    try:

        async def main():
            events = sched.events(req)
            async for _ev in events:
                break
            await events.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if sched._sinks == {}:
                    break
            return sched.steps

        steps = asyncio.run(main())
    finally:
        sched.stop()
    assert sched._sinks == {} and steps < 400


def test_queue_limit(tiny_tok, tiny_model) -> None:
    sched = Scheduler(Engine(tiny_model, tiny_tok), max_queue=0).start()
    try:
        with pytest.raises(SchedulerBusy):
            sched.submit(_reqs(tiny_tok, 1)[0], lambda ev: None)
    finally:
        sched.stop()


def test_uses_no_grad(tiny_tok, tiny_model) -> None:
    assert all(p.requires_grad for p in tiny_model.parameters())  # generation must not depend on this
    req = _reqs(tiny_tok, 1)[0]
    sched = Scheduler(Engine(tiny_model, tiny_tok)).start()
    try:
        res = asyncio.run(sched.generate(req))
    finally:
        sched.stop()
    assert len(res.token_ids) == 5
    assert torch.is_grad_enabled()
