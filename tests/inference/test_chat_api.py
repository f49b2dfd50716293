"""chat / batch_chat: official prompt layout (spec §5.1, §5.2, §8), history semantics, batch == single."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ivl.config import DEFAULT_SYSTEM_MESSAGE
from ivl.errors import GenerationError
from ivl.inference import chat as chat_module
from ivl.inference.chat import batch_chat, chat, engine_for
from ivl.inference.engine import Engine, GenerationConfig

GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def processor(tiny_tok, tiny_model_f64):
    from ivl.processing.processor import Processor

    return Processor.from_config(tiny_tok, tiny_model_f64.config, max_num=4)


def _image(seed: int, size=(90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _capture(monkeypatch, model, processor) -> list:
    """Record the requests chat() hands to the engine."""
    seen: list = []
    engine = engine_for(model, processor)
    original = Engine.generate

    def spy(self, requests):
        seen.extend(requests)
        return original(self, requests)

    monkeypatch.setattr(engine, "generate", spy.__get__(engine))
    return seen


def _official_prompt(turns: list[tuple[str, str | None]], tiles: list[int]) -> str:
    """Spec §5.1/§5.2 by hand: ChatML with newline separators, <image> -> <img> + 4·tiles context + </img>."""
    text = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
    for q, a in turns:
        text += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        if a is not None:
            text += f"{a}<|im_end|>\n"
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (4 * n) + "</img>", 1)
    return text


def _decoded(tok, request) -> str:
    return tok.decode(list(request.input_ids), skip_special_tokens=False)


def test_text_only_prompt_and_answer(monkeypatch, tiny_tok, tiny_model_f64, processor) -> None:
    seen = _capture(monkeypatch, tiny_model_f64, processor)
    answer = chat(tiny_model_f64, processor, "Hello there", generation=GEN)
    assert _decoded(tiny_tok, seen[0]) == _official_prompt([("Hello there", None)], [])
    assert seen[0].pixel_values is None
    direct = Engine(tiny_model_f64, processor).generate([seen[0]])[0]
    assert answer == direct.text.strip()


def test_single_image_gets_prefix_and_history(monkeypatch, tiny_tok, tiny_model_f64, processor) -> None:
    seen = _capture(monkeypatch, tiny_model_f64, processor)
    img = _image(0)
    answer, history = chat(tiny_model_f64, processor, "What is it?", images=img, generation=GEN, return_history=True)
    tiles = seen[0].pixel_values.shape[0]
    assert tiles > 1  # dynamic tiling + thumbnail happened
    assert _decoded(tiny_tok, seen[0]) == _official_prompt([("<image>\nWhat is it?", None)], [tiles])
    assert history == [("<image>\nWhat is it?", answer)]

    # second turn: history replayed, the same image passed again fills the old placeholder, no new prefix
    answer2, history2 = chat(
        tiny_model_f64, processor, "And the colour?", images=img, history=history, generation=GEN, return_history=True
    )
    expected = _official_prompt([("<image>\nWhat is it?", answer), ("And the colour?", None)], [tiles])
    assert _decoded(tiny_tok, seen[1]) == expected
    assert history2 == [*history, ("And the colour?", answer2)]


def test_several_images_are_labelled(monkeypatch, tiny_tok, tiny_model_f64, processor) -> None:
    seen = _capture(monkeypatch, tiny_model_f64, processor)
    chat(tiny_model_f64, processor, "Compare them.", images=[_image(1), _image(2, (40, 120))], generation=GEN)
    req = seen[0]
    prompt = _decoded(tiny_tok, req)
    assert "Image-1: <img>" in prompt and "Image-2: <img>" in prompt
    assert int((np_ids(req) == 500).sum()) == 4 * req.pixel_values.shape[0]


def np_ids(request) -> np.ndarray:
    return np.asarray(list(request.input_ids))


def test_video_frames_become_frame_lines(monkeypatch, tiny_tok, tiny_model_f64, processor) -> None:
    seen = _capture(monkeypatch, tiny_model_f64, processor)
    frames = [_image(k, (64, 48)) for k in range(3)]
    answer, history = chat(
        tiny_model_f64, processor, "What happens?", video=frames, generation=GEN, return_history=True
    )
    prompt = _decoded(tiny_tok, seen[0])
    for k in (1, 2, 3):
        assert f"Frame-{k}: <img>" in prompt
    assert seen[0].pixel_values.shape[0] == 3  # one tile per frame
    assert history[0][0].startswith("<video>")
    assert isinstance(answer, str)


def test_batch_chat_equals_individual_chats(tiny_model_f64, processor) -> None:
    questions = ["Describe.", "Say hi", "Two images?"]
    images = [_image(3), None, [_image(4), _image(5)]]
    gen = GenerationConfig(max_new_tokens=7, stop_token_ids=[])
    batched = batch_chat(tiny_model_f64, processor, questions, images=images, generation=gen)
    single = [
        chat(tiny_model_f64, processor, q, images=i, generation=gen) for q, i in zip(questions, images, strict=True)
    ]
    assert batched == single
    assert len({*batched}) == 3


def test_official_generation_dict_and_errors(tiny_model_f64, processor) -> None:
    with pytest.raises(GenerationError, match="num_beams"):
        chat(tiny_model_f64, processor, "hi", generation={"num_beams": 2})
    with pytest.raises(GenerationError, match="image entries"):
        batch_chat(tiny_model_f64, processor, ["a", "b"], images=[None])


def test_engine_is_reused(tiny_model_f64, processor) -> None:
    assert chat_module.engine_for(tiny_model_f64, processor) is chat_module.engine_for(tiny_model_f64, processor)


def test_model_methods_match_the_functions(tiny_model_f64, processor) -> None:
    """``model.chat`` / ``model.stream_chat`` / ``model.batch_chat``: the model-card spelling, same answers."""
    gen = GenerationConfig(max_new_tokens=5, stop_token_ids=[])
    image = _image(7)
    expected, history = chat(tiny_model_f64, processor, "What?", images=image, generation=gen, return_history=True)
    answer, history2 = tiny_model_f64.chat(processor, "What?", image, generation=gen, return_history=True)
    assert (answer, history2) == (expected, history)
    assert "".join(tiny_model_f64.stream_chat(processor, "What?", image, generation=gen)).strip() == expected
    assert tiny_model_f64.batch_chat(processor, ["What?", "hi"], [image, None], generation=gen) == batch_chat(
        tiny_model_f64, processor, ["What?", "hi"], images=[image, None], generation=gen
    )
