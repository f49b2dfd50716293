"""Mono-InternVL through the shared processor, engine, chat API and server (exactly as for InternVL-2.5)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from mono_helpers import IMG_CONTEXT, IMG_END, IMG_START
from PIL import Image

from ivl.inference.chat import batch_chat, chat, encode_messages, load_for_inference, stream_chat
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest
from ivl.models.mono import MonoInternVL
from ivl.processing.template import LEGACY_SYSTEM_MESSAGE

GEN = {"max_new_tokens": 10}


def _image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def loaded(mono_checkpoint):
    return load_for_inference(mono_checkpoint)


def test_prompt_is_the_internlm2_chat_template(loaded):
    _, processor = loaded
    inputs = processor("What is this?", images=[_image(0)])
    assert inputs.prompts[0] == (
        f"<|im_start|>system\n{LEGACY_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\n"
    )  # no newline between turns (spec §11)
    ids = inputs.input_ids[0].tolist()
    assert ids[0] == 1  # <s> from the tokenizer
    start = ids.index(IMG_START)
    assert ids[start : start + 6] == [IMG_START, *[IMG_CONTEXT] * 4, IMG_END]
    tok = processor.tokenizer
    assert processor.stop_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")


@torch.no_grad()
def test_engine_greedy_equals_an_uncached_greedy_loop(loaded):
    model, processor = loaded
    assert isinstance(MonoInternVL.from_internvl(model), MonoInternVL)
    inputs = processor("Describe the image in detail.", images=[_image(1, (112, 56))])
    request = GenerationRequest.from_inputs(inputs, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))
    got = Engine(model, processor).generate([request])[0].token_ids
    seq, pixels = inputs.input_ids, inputs.pixel_values
    want = []
    for _ in range(12):
        logits = model(seq, pixels).logits[:, -1]
        logits[:, IMG_CONTEXT] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        want.append(int(token))
        seq = torch.cat([seq, token], dim=1)
    assert got == want and len(set(want)) > 2


def test_chat_stream_and_batch_agree(loaded):
    model, processor = loaded
    image = _image(2)
    answer = chat(model, processor, "What colour is it?", images=image, generation=GEN)
    assert isinstance(answer, str)
    streamed = "".join(stream_chat(model, processor, "What colour is it?", images=image, generation=GEN)).strip()
    assert streamed == answer
    text_answer = chat(model, processor, "Hello there", generation=GEN)
    assert batch_chat(model, processor, ["What colour is it?", "Hello there"], [image, None], generation=GEN) == [
        answer,
        text_answer,
    ]


def test_image_arriving_in_a_later_turn(loaded):
    model, processor = loaded
    first, history = chat(model, processor, "Hello there", generation=GEN, return_history=True)
    assert history == [("Hello there", first)]
    second, history = chat(
        model, processor, "<image>\nAnd this?", images=[_image(3)], history=history, generation=GEN,
        return_history=True,
    )  # fmt: skip
    assert len(history) == 2 and isinstance(second, str)


def test_openai_server_serves_mono(loaded):
    from fastapi.testclient import TestClient

    from ivl.inference.server import create_app

    model, processor = loaded
    buf = io.BytesIO()
    _image(4).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "What is in the picture?"}]}]  # fmt: skip
    app = create_app(Engine(model, processor), model_name="mono-tiny")
    with TestClient(app) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": "mono-tiny", "messages": messages, "max_tokens": 8}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    local = [{"role": "user", "content": [{"type": "image", "image": _image(4)},
                                           {"type": "text", "text": "What is in the picture?"}]}]  # fmt: skip
    request = GenerationRequest.from_inputs(encode_messages(processor, local), GenerationConfig(max_new_tokens=8))
    expected = Engine(model, processor).generate([request])[0]
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
