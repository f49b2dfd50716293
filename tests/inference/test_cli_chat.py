"""`ivl chat` (one-shot, interactive, --draw-boxes) and `ivl serve` on a saved tiny checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from ivl.cli import app
from ivl.inference import chat as chat_module
from ivl.inference.chat import ChatSession, chat, load_for_inference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tok, tiny_model):
    from ivl.processing.processor import Processor

    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    tiny_model.save_pretrained(path)
    Processor.from_config(tiny_tok, tiny_model.config, max_num=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((rng.random((70, 100, 3)) * 255).astype("uint8")).save(path)
    return path


def test_one_shot_answer_equals_python_api(checkpoint, image_path) -> None:
    result = CliRunner().invoke(
        app, ["chat", "--model", str(checkpoint), "--image", str(image_path), "--max-new-tokens", "8", "What?"]
    )
    assert result.exit_code == 0, result.output
    model, processor = load_for_inference(checkpoint)
    expected = chat(model, processor, "What?", images=str(image_path), generation={"max_new_tokens": 8})
    assert result.output.strip() == expected


def test_interactive_session_commands(checkpoint, image_path) -> None:
    script = "\n".join(
        [f"/image {image_path}", "What is it?", "/image nowhere.png", "/bogus", "/reset", "Hello", "/exit", "never"]
    )
    result = CliRunner().invoke(app, ["chat", "--model", str(checkpoint), "--max-new-tokens", "4"], input=script)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "(image 1 added" in out
    assert "error: image file nowhere.png does not exist" in out
    assert "unknown command '/bogus'" in out
    assert "(conversation cleared)" in out


def test_session_places_placeholders_across_turns(tiny_tok, tiny_model, image_path) -> None:
    from ivl.processing.processor import Processor

    session = ChatSession(
        tiny_model, Processor.from_config(tiny_tok, tiny_model.config, max_num=2), {"max_new_tokens": 3}
    )
    session.add_image(image_path)
    list(session.ask("first?"))
    list(session.ask("second?"))
    session.add_image(image_path)
    list(session.ask("third?"))
    questions = [q for q, _ in session.history]
    assert questions == ["<image>\nfirst?", "second?", "Image-2: <image>\nthird?"]
    session.reset()
    assert session.history == [] and session.images == []


def test_draw_boxes(checkpoint, image_path, tmp_path, monkeypatch) -> None:
    answer = "<ref>thing</ref><box>[[100, 200, 500, 800]]</box>"
    monkeypatch.setattr(chat_module.ChatSession, "ask", lambda self, q: iter([answer]))
    out = tmp_path / "boxes.png"
    result = CliRunner().invoke(
        app, ["chat", "--model", str(checkpoint), "--image", str(image_path), "--draw-boxes", str(out), "Where?"]
    )
    assert result.exit_code == 0, result.output
    assert f"(boxes drawn to {out})" in result.output
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    changed = np.argwhere(np.abs(drawn - original).sum(-1) > 0)
    # box corners in pixels: x 10..50 of 100, y 14..56 of 70; the outline lies on them
    assert changed[:, 1].min() >= 9 and changed[:, 1].max() <= 51
    assert changed[:, 0].max() <= 57


@pytest.mark.slow
def test_serve_command_end_to_end(checkpoint) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IVL_API_KEY": "k-123"}
    cmd = [sys.executable, "-m", "ivl.cli", "serve", "--model", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "server did not start")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        out = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert out.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)
