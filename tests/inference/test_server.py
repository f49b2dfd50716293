"""End-to-end: the stock `openai` client against a uvicorn server running a tiny random model."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from ivl.inference.chat import encode_messages
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest
from ivl.inference.server import ServerLimits, create_app

MODEL = "ivl-tiny"
KEY = "sk-test-key"
LIMITS = ServerLimits(
    max_body_bytes=300_000, max_images=2, max_tiles_per_image=4, max_tiles=4, max_tokens=64, default_max_tokens=8
)


class ServerThread:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a daemon thread."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def processor(tiny_tok, tiny_model_f64):
    from ivl.processing.processor import Processor

    return Processor.from_config(tiny_tok, tiny_model_f64.config)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "square.png").write_bytes(_png(56, 56, 3))
    outside = root.parent / "secret.png"
    outside.write_bytes(_png(56, 56, 4))
    return root


@pytest.fixture(scope="module")
def server(tiny_model_f64, processor, media_root):
    engine = Engine(tiny_model_f64, processor, max_batch_size=8)
    app = create_app(engine, model_name=MODEL, api_key=KEY, media_root=media_root, limits=LIMITS, batch_window_s=0.05)
    with ServerThread(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _expected(tiny_model_f64, processor, messages, max_tokens: int) -> str:
    """The same request run in-process, one by one: what the server must return."""
    inputs = encode_messages(processor, messages, max_num=LIMITS.max_tiles_per_image)
    req = GenerationRequest.from_inputs(inputs, GenerationConfig(max_new_tokens=max_tokens))
    return Engine(tiny_model_f64, processor).generate([req])[0].text


def _user(text: str, *images: bytes) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_health_and_models(server, client) -> None:
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_plain_completion(client, tiny_model_f64, processor) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == _expected(tiny_model_f64, processor, messages, 6)
    assert out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_image_completion(client, tiny_model_f64, processor) -> None:
    messages = _user("What is in the picture?", _png(56, 56))
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    text_only = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=1
    )
    assert out.usage.prompt_tokens > text_only.usage.prompt_tokens + 4  # <img> + 4 context tokens + </img> + \n
    expected = _expected(tiny_model_f64, processor, [{"role": "user", "content": [
        {"type": "image", "image": Image.open(io.BytesIO(_png(56, 56)))},
        {"type": "text", "text": "What is in the picture?"},
    ]}], 6)  # fmt: skip
    assert out.choices[0].message.content == expected


def test_streaming_matches_non_streaming(client) -> None:
    messages = _user("Describe the image in detail.", _png(56, 56, 1))
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_framing(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_concurrent_clients_are_batched_and_exact(server, client, tiny_model_f64, processor) -> None:
    prompts = [f"Question number {i}: what do you see?" for i in range(8)]
    images = [_png(56, 56, 10 + i) if i % 2 else None for i in range(8)]

    def messages(i: int) -> list[dict]:
        return _user(prompts[i], images[i]) if images[i] else [{"role": "user", "content": prompts[i]}]

    def ask(i: int) -> str:
        return (
            client.chat.completions.create(model=MODEL, messages=messages(i), max_tokens=10).choices[0].message.content
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    sequential = [ask(i) for i in range(8)]
    assert answers == sequential
    assert server.app.state.scheduler.max_rows_seen > 1


def test_seeded_sampling_is_reproducible(client) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 1.3}
    a = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    assert a == b


def test_stop_string(client) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown"}], "max_tokens": 16}
    free = client.chat.completions.create(**kw).choices[0].message.content
    stop = next((free[i : i + 2] for i in range(2, len(free) - 1) if free[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("random output has no usable stop string")
    out = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert out.message.content == free[: free.find(stop)] and out.finish_reason == "stop"


def test_local_file_under_media_root(client, media_root) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "square.png"}}, {"type": "text", "text": "hi"}],
        }
    ]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).choices


# ------------------------------------------------------------------------------------------------ errors


def _error(exc_info) -> dict:
    return exc_info.value.body if isinstance(exc_info.value.body, dict) else {}


def test_wrong_and_missing_api_key(server) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and _error(info)["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_unknown_model(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert _error(info)["code"] == "model_not_found" and "gpt-17" in _error(info)["message"]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,@@@not-base64@@@", "invalid_base64"),
        ("data:image/png;base64," + base64.b64encode(b"definitely not an image").decode(), "invalid_image"),
        ("data:image/png," + "abc", "invalid_image_url"),
        ("https://example.com/cat.png", "remote_images_disabled"),
    ],
)
def test_bad_images(client, url: str, code: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    err = _error(info)
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert err["param"] == "messages[0].content[0].image_url"


def test_path_outside_media_root_is_refused(client) -> None:
    for url in ("../secret.png", "file:///etc/passwd", "/etc/hostname"):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert _error(info)["code"] == "path_not_allowed"


def test_too_many_images_and_tiles(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_user("x", *[_png(56, 56, k) for k in range(3)]))
    assert _error(info)["code"] == "too_many_images"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_user("x", _png(224, 56)))  # 4 tiles + thumbnail > 4
    assert _error(info)["code"] == "too_many_tiles"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_user("x"), extra_body={"max_tiles": 12})
    assert _error(info)["param"] == "max_tiles"


def test_max_tokens_limit(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    assert _error(info)["code"] == "max_tokens_exceeded" and _error(info)["param"] == "max_tokens"


def test_body_too_large(client) -> None:
    huge = _user("x", b"\x89PNG" + bytes(400_000))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=huge)
    assert info.value.status_code == 413 and _error(info)["code"] == "request_too_large"


def test_schema_and_json_errors(server, client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert _error(info)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert _error(info)["param"] == "n"
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_server_survives_errors(server, client) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=2)


def test_queue_full_gives_429(tiny_model_f64, processor) -> None:
    limits = ServerLimits(max_queue=0)
    app = create_app(Engine(tiny_model_f64, processor), model_name=MODEL, limits=limits)
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert _error(info)["code"] == "server_busy"


class SlowEngine(Engine):
    """Decode steps take 50 ms, so a client can hang up while its request is still running."""

    def step(self, batch):
        time.sleep(0.05)
        return super().step(batch)


@pytest.mark.parametrize("stream", [False, True])
def test_client_hang_up_cancels_generation(tiny_model_f64, processor, stream: bool) -> None:
    app = create_app(SlowEngine(tiny_model_f64, processor), model_name=MODEL, limits=LIMITS)
    scheduler = app.state.scheduler
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": stream}
    with ServerThread(app) as srv:
        if stream:  # read the first two events, then hang up
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                next(lines)
        else:  # 64 steps of 50 ms cannot finish within the 0.4 s read timeout
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.4)
        deadline = time.monotonic() + 5
        while scheduler._sinks and time.monotonic() < deadline:
            time.sleep(0.05)
        # a cancel drops the sink at once, but a 50 ms step already running still finishes and is counted
        time.sleep(0.15)
        steps = scheduler.steps
        time.sleep(0.3)
        assert scheduler._sinks == {} and scheduler.steps == steps < 60  # stopped, not decoding to the end
