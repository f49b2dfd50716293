"""The browser chat page: served assets, then a real headless Chromium driven by Selenium against a tiny model.

Random tiny models answer gibberish, so the engine here can be *scripted*: it forces the logits so that the
model emits a given answer token by token through the real engine, scheduler and SSE path (grounding, streaming
and stop tests). Screenshots are saved under the test's temporary directory.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from ivl.errors import ConfigError, GenerationError
from ivl.inference.engine import Engine
from ivl.inference.server import ServerLimits, create_app
from ivl.inference.webui import CONTENT_SECURITY_POLICY, PageConfig, mount_chat_page
from ivl.processing.grounding import parse_grounding

MODEL = "ivl-tiny"
KEY = "sk-webui-test"
LIMITS = ServerLimits(
    max_body_bytes=400_000, max_images=6, max_tiles_per_image=4, max_tiles=24, max_tokens=128, default_max_tokens=96
)
# the page believes in a larger body limit than the server enforces (as behind a stricter proxy), so that both
# the page's own size check and the server's 413 can be seen
PAGE_LIMITS = replace(LIMITS, max_body_bytes=1_000_000)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
GROUNDING_ANSWER = (
    "<ref>the square</ref><box>[[100, 200, 500, 800]]</box> and <ref>the dot</ref><box>[[600, 100, 900, 400]]</box>"
)


# ------------------------------------------------------------------------------------------------ helpers


class ScriptedEngine(Engine):
    """The real engine over a tiny random model; when ``script`` is set, the logits are forced to emit it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script: str | None = None
        self.step_delay = 0.0
        self.fail_steps = False
        self.requests: list = []
        self.results: list = []

    def prefill(self, requests):
        self.requests.extend(requests)
        return super().prefill(requests)

    def step(self, batch):
        if self.fail_steps:
            raise GenerationError("scripted failure in the middle of decoding")
        if self.step_delay:
            time.sleep(self.step_delay)
        return super().step(batch)

    def _advance(self, batch, logits):
        if self.script is not None:
            ids = [*self.tokenizer.encode(self.script, add_special_tokens=False), min(self.default_stop_ids)]
            for row, seq in enumerate(batch.seqs):
                token = ids[min(len(seq.generated), len(ids) - 1)]
                logits[row] = float("-inf")
                logits[row, token] = 0.0
        events = super()._advance(batch, logits)
        self.results += [e.result for e in events if e.result is not None]
        return events


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
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _png(width: int, height: int, *, colour: tuple[int, int, int] | None = None, seed: int = 0) -> bytes:
    if colour is None:
        pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    else:
        pixels = np.empty((height, width, 3), dtype="uint8")
        pixels[:] = colour
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _encode(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _scene() -> np.ndarray:
    """480×300: a red square inside [48, 60, 240, 240] and a blue dot inside [288, 30, 432, 120] on light grey."""
    from PIL import ImageDraw

    image = Image.new("RGB", (480, 300), (236, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle([70, 85, 218, 220], fill=(205, 60, 50))
    draw.ellipse([330, 45, 390, 105], fill=(40, 90, 200))
    return np.asarray(image).copy()


FRAME_COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30), (30, 220, 220),
                 (220, 30, 220), (250, 250, 250), (10, 10, 10), (240, 140, 20), (120, 60, 200)]  # fmt: skip


def _webm(path: Path, fps: int = 5) -> Path:
    """A 2 s VP8 clip whose frame k is a solid FRAME_COLOURS[k]."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "4", "b:v": "1M"}
        for colour in FRAME_COLOURS:
            frame = np.empty((48, 64, 3), dtype="uint8")
            frame[:] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------ server-side tests


@pytest.fixture(scope="module")
def processor(tiny_tok, tiny_model):
    from ivl.processing.processor import Processor

    return Processor.from_config(tiny_tok, tiny_model.config)


@pytest.fixture(scope="module")
def engine(tiny_model, processor) -> ScriptedEngine:
    return ScriptedEngine(tiny_model, processor, max_batch_size=4)


def _app(engine, *, api_key: str | None = None, page_limits: ServerLimits | None = PAGE_LIMITS):
    app = create_app(engine, model_name=MODEL, api_key=api_key, limits=LIMITS, batch_window_s=0.0)
    mount_chat_page(app, model_name=MODEL, limits=page_limits, api_key_required=api_key is not None)
    return app


def _embedded_config(page: str) -> dict:
    start = page.index('<script id="ivl-config" type="application/json">') + len(
        '<script id="ivl-config" type="application/json">'
    )
    return json.loads(page[start : page.index("</script>", start)])


def test_page_and_assets_are_served_with_a_strict_policy(engine) -> None:
    with TestClient(_app(engine, api_key=KEY)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
        assert _embedded_config(page.text) == {
            "model": MODEL,
            "apiKeyRequired": True,
            "maxBodyBytes": PAGE_LIMITS.max_body_bytes,
            "maxImages": LIMITS.max_images,
            "maxTilesPerImage": LIMITS.max_tiles_per_image,
            "maxTokens": LIMITS.max_tokens,
            "defaultMaxTokens": LIMITS.default_max_tokens,
        }
        # every asset the page references is served with a fitting type; nothing points off the origin
        for name, kind in [("app.js", "text/javascript"), ("api.js", "text/javascript"),
                           ("grounding.js", "text/javascript"), ("media.js", "text/javascript"),
                           ("style.css", "text/css")]:  # fmt: skip
            asset = client.get(f"/ui/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
            assert "http://" not in asset.text and "https://" not in asset.text, name
        assert "http" not in page.text.replace("http-equiv", "")
        for bad in ["index.html", "../server.py", "%2e%2e%2fserver.py", "nope.js"]:
            missing = client.get(f"/ui/static/{bad}")
            assert missing.status_code == 404 and "error" in missing.json(), bad
        # the API is untouched and still asks for the key
        assert client.post("/v1/chat/completions", json={}).status_code == 401


def test_config_is_escaped_and_mount_checks_its_inputs(engine) -> None:
    hostile = 'x</script><script>alert("no")</script>&'
    app = create_app(engine, model_name=hostile)
    mount_chat_page(app, model_name=hostile, limits=None)
    page = TestClient(app).get("/").text
    assert page.count("</script>") == 2  # the config block's and the module's own closing tags only
    config = _embedded_config(page)
    assert config["model"] == hostile and config["maxBodyBytes"] is None and config["apiKeyRequired"] is False
    assert "<title>x&lt;/script&gt;" in page
    mount_chat_page(app, model_name="again", limits=LIMITS)  # mounting again replaces the page
    assert _embedded_config(TestClient(app).get("/").text)["maxBodyBytes"] == LIMITS.max_body_bytes
    assert sum(getattr(r, "path", None) == "/" for r in app.routes) == 1
    foreign = create_app(engine, model_name=MODEL)
    foreign.get("/")(lambda: {"hello": "world"})
    with pytest.raises(ConfigError, match="already has a route at '/'"):
        mount_chat_page(foreign, model_name=MODEL)
    with pytest.raises(ConfigError, match="model_name"):
        PageConfig.from_limits("", None, False)


# ------------------------------------------------------------------------------------------------ browser fixtures


def _browser_paths() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, installed with apt-get when missing (root only)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium): browser tests skipped")
    browser, driver = _browser_paths()
    if browser and driver:
        return browser, driver
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        pytest.skip("chromium/chromedriver are missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command, limit in [
            (["apt-get", "update"], 240),
            (["apt-get", "install", "-y", "chromium", "chromium-driver"], 420),
        ]:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
            if done.returncode != 0:
                pytest.skip(f"`{' '.join(command)}` failed, browser tests skipped: {done.stderr.strip()[-400:]}")
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"installing chromium timed out ({exc.timeout} s), browser tests skipped")
    browser, driver = _browser_paths()
    if not (browser and driver):
        pytest.skip("apt-get installed chromium but its executables are not on PATH")
    return browser, driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui_screenshots")


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, chromedriver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def live(engine, chromium):
    with ServerThread(_app(engine)) as server:
        yield server


@pytest.fixture()
def page(browser, live, engine):
    """A freshly loaded page at desktop size, with the engine back to the plain tiny model."""
    engine.script, engine.step_delay, engine.fail_steps = None, 0.0, False
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(live.url + "/")
    _wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    return browser


def _wait(driver, condition, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def _by_id(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def _set(driver, id_: str, value: str) -> None:
    field = _by_id(driver, id_)
    field.clear()
    field.send_keys(value)


def _ask(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = _by_id(driver, "message")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _idle(driver) -> None:
    driver.execute_async_script("window.ivl.idle().then(arguments[arguments.length - 1])")


def _history(driver) -> list[dict]:
    return driver.execute_script("return JSON.parse(JSON.stringify(window.ivl.state.history))")


def _answers(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('article.assistant .text')).map(e => e.textContent)"
    )


def _attachment_names(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#attachments .attachment-name')).map(e => e.textContent)"
    )


def _error(driver) -> str | None:
    return driver.execute_script(
        "return document.getElementById('error').hidden ? null : document.getElementById('error-text').textContent"
    )


_DISPATCH = """
const [files, kind] = [arguments[0], arguments[1]];
const dt = new DataTransfer();
for (const [b64, name, type] of files) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  dt.items.add(new File([bytes], name, { type }));
}
const target = document.getElementById("message");
const event = kind === "drop"
  ? new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })
  : new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true });
target.dispatchEvent(event);
"""


def _dispatch(driver, kind: str, *files: tuple[bytes, str, str]) -> None:
    payload = [[base64.b64encode(data).decode(), name, mime] for data, name, mime in files]
    driver.execute_script(_DISPATCH, payload, kind)


def _pixel(driver, x: int, y: int) -> list[int]:
    return driver.execute_script(
        "const c = document.querySelector('figure.grounding canvas');"
        "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data)",
        x,
        y,
    )


def _mobile(driver) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )


# ------------------------------------------------------------------------------------------------ browser tests


def test_ask_about_an_image_with_the_real_model(page, engine, tmp_path) -> None:
    image = tmp_path / "noise.png"
    image.write_bytes(_png(112, 56, seed=1))
    _by_id(page, "image-input").send_keys(str(image))
    _wait(page, lambda d: _attachment_names(d) == ["noise.png"])
    _set(page, "max-tiles", "2")
    _set(page, "max-tokens", "6")
    before = len(engine.results)
    _ask(page, "What is in the picture?")
    _idle(page)
    assert _error(page) is None
    request, result = engine.requests[-1], engine.results[before]
    # the page's settings reached the engine: 6 new tokens, greedy, 2 tiles + thumbnail for a 2:1 image
    assert request.generation.max_new_tokens == 6 and not request.generation.do_sample
    assert request.pixel_values is not None and request.pixel_values.shape[0] == 3
    prompt = engine.tokenizer.decode(request.input_ids)
    assert "What is in the picture?" in prompt and prompt.count("<img>") == 1
    history = _history(page)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == result.text  # exactly what the model generated
    assert (
        history[0]["content"][0]["image_url"]["url"]
        == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    )
    assert _attachment_names(page) == []  # the composer is empty again


def test_streamed_answer_grounding_boxes_copy_and_screenshot(page, engine, shots) -> None:
    engine.script, engine.step_delay = GROUNDING_ANSWER, 0.04
    page.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"], "origin": page.current_url.rstrip("/")},
    )
    scene = _scene()
    _dispatch(page, "drop", (_encode(scene), "scene.png", "image/png"))
    _wait(page, lambda d: _attachment_names(d) == ["scene.png"])
    _ask(page, "Where are the square and the dot?")
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while page.execute_script("return window.ivl.state.busy") and time.monotonic() < deadline:
        texts = _answers(page)
        if texts and (not seen or texts[-1] != seen[-1]):
            seen.append(texts[-1])
        time.sleep(0.01)
    _idle(page)
    # the answer appeared piece by piece before it was complete
    final = _answers(page)[-1]
    assert final == "the square[100, 200, 500, 800] and the dot[600, 100, 900, 400]"
    partial = [t for t in seen if t and t != final]
    assert len(partial) >= 3, seen
    assert _history(page)[-1]["content"] == GROUNDING_ANSWER

    # boxes drawn over the image: 0-1000 coordinates → pixels of the 480×300 image (hand-computed):
    # the square [48, 60, 240, 240], the dot [288, 30, 432, 120]; lines 2 px wide, centred on the edges
    _wait(page, lambda d: d.execute_script("return !!document.querySelector('figure.grounding canvas')"))
    size = page.execute_script(
        "const c = document.querySelector('figure.grounding canvas'); return [c.width, c.height]"
    )
    assert size == [480, 300]
    square, dot = [230, 25, 75], [60, 180, 75]  # the first two colours of the palette (as `ivl chat` draws)
    assert _pixel(page, 240, 150)[:3] == square  # right edge
    assert _pixel(page, 48, 150)[:3] == square  # left edge
    assert _pixel(page, 150, 240)[:3] == square  # bottom edge
    assert _pixel(page, 48, 50)[:3] == square  # the label's background, above the box
    assert _pixel(page, 432, 75)[:3] == dot  # right edge of the dot's box
    for x, y in [(144, 150), (360, 75), (100, 200), (450, 280), (20, 20)]:  # inside and outside: the image itself
        assert _pixel(page, x, y)[:3] == scene[y, x].tolist(), (x, y)
    caption = page.execute_script("return document.querySelector('figure.grounding figcaption').textContent")
    assert "the square: (48, 60)–(240, 240)" in caption and "the dot: (288, 30)–(432, 120)" in caption
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 960, "deviceScaleFactor": 1, "mobile": False}
    )
    page.execute_script("document.getElementById('log').scrollTop = 1e6")
    page.save_screenshot(str(shots / "desktop-grounding.png"))

    # copy puts the raw answer (with its tags) on the clipboard
    page.execute_script("document.querySelector('article.assistant button.copy').click()")
    _wait(page, lambda d: _by_id(d, "status").text == "Copied the answer to the clipboard.")
    clip = page.execute_async_script("navigator.clipboard.readText().then(arguments[arguments.length - 1])")
    assert clip == GROUNDING_ANSWER


def test_grounding_parser_matches_python(page) -> None:
    cases = [
        GROUNDING_ANSWER,
        "<ref>cats</ref><box>[[10, 20, 30, 40], [500, 500, 1000, 1000]]</box>",
        "a bare box <box>[[0, 0, 1000, 1000]]</box> and a unit one <box>[[0.1, 0.2, 0.5, 0.9]]</box>",
        "<ref>bad</ref><box>[[1, 2, 3]]</box> then <ref>good</ref> <box>[[1,2,3,4], [x]]</box>",
        "<ref>shape</ref><quad>[[0, 0, 100, 0, 100, 100, 0, 100]]</quad> -<box>[[-5, 5, 2000, 10.5]]</box>",
        "no regions at all <ref>just a ref</ref>",
        "<ref>a</ref><box>[[1, 2, 3, 4]]</box><ref>b</ref>\n<box>[[5, 6, 7, 8]]</box>",
    ]
    for text in cases:
        js = page.execute_script("return window.ivl.parseGrounding(arguments[0], 640, 480)", text)
        py = parse_grounding(text, (640, 480))
        assert [(r["label"], r["kind"]) for r in js] == [(r.label, r.kind) for r in py], text
        for a, b in zip(js, py, strict=True):
            assert np.allclose(a["shapes"], b.shapes, atol=1e-9), text
    # a label never spans another </ref> (here the Python parser would read "a</ref> x <ref>b")
    js = page.execute_script(
        "return window.ivl.parseGrounding(arguments[0], 10, 10)", "<ref>a</ref> x <ref>b</ref><box>[[0,0,1,1]]</box>"
    )
    assert [r["label"] for r in js] == ["b"]


_SSE = """
const [pieces, done] = [arguments[0], arguments[arguments.length - 1]];
const encoder = new TextEncoder();
const body = new ReadableStream({
  start(controller) { for (const p of pieces) controller.enqueue(encoder.encode(p)); controller.close(); },
});
const realFetch = window.fetch;
window.fetch = async () => new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
const stream = window.ivl.streamChat({ url: "unused", body: "{}" });
(async () => {
  const chunks = [];
  try {
    for await (const chunk of stream) chunks.push(chunk.choices[0].delta.content);
    done({ chunks });
  } catch (error) {
    done({ chunks, error: window.ivl.describeError(error) });
  } finally {
    window.fetch = realFetch;
  }
})();
"""


def _sse_events(*events: str, sep: str = "\n") -> str:
    return "".join(f"data: {e}{sep}{sep}" for e in events)


def test_event_stream_parsing(page) -> None:
    """The SSE reader against hand-made streams: any chunking, CRLF line ends, comments, in-band errors."""

    def delta(text: str) -> str:
        return json.dumps({"choices": [{"delta": {"content": text}}]})

    stream = ": keep-alive\n\n" + _sse_events(delta("Hel"), delta("lo, "), delta("wörld"), "[DONE]")
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]  # events and characters cut anywhere
    assert page.execute_async_script(_SSE, pieces) == {"chunks": ["Hel", "lo, ", "wörld"]}
    crlf = _sse_events(delta("a"), delta("b"), "[DONE]", sep="\r\n")
    assert page.execute_async_script(_SSE, [crlf[:5], crlf[5:]]) == {"chunks": ["a", "b"]}
    error = json.dumps({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
    out = page.execute_async_script(_SSE, [_sse_events(delta("x"), error, "[DONE]")])
    assert out == {"chunks": ["x"], "error": "Server error (500): boom"}
    out = page.execute_async_script(_SSE, [_sse_events(delta("x")) + "data: {trunc"])
    assert out == {"chunks": ["x"], "error": "Bad gateway (502): the answer stream ended in the middle of an event"}


def test_paste_thumbnails_and_remove(page) -> None:
    _dispatch(
        page,
        "paste",
        (_png(40, 30, colour=(250, 0, 0)), "red.png", "image/png"),
        (_png(30, 40, colour=(0, 0, 250)), "blue.png", "image/png"),
    )
    _wait(page, lambda d: _attachment_names(d) == ["red.png", "blue.png"])
    _by_id(page, "attachments").find_element("css selector", "button[aria-label='Remove red.png']").click()
    _wait(page, lambda d: _attachment_names(d) == ["blue.png"])
    assert _by_id(page, "status").text == "Removed red.png."
    _dispatch(page, "paste", (b"%PDF-1.4", "doc.pdf", "application/pdf"))  # not an image: ignored by paste
    _dispatch(page, "drop", (b"%PDF-1.4", "doc.pdf", "application/pdf"))  # dropped: refused with a reason
    _wait(page, lambda d: _error(d) is not None)
    assert "doc.pdf is not an image or a video" in _error(page)
    assert _attachment_names(page) == ["blue.png"]


def test_oversized_uploads_are_refused_by_the_page_and_by_the_server(page, engine, tmp_path, shots) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png(560, 560, seed=2))  # ~940 KB: over the page's limit once base64-encoded
    assert 750_000 < huge.stat().st_size < 1_000_000
    _by_id(page, "image-input").send_keys(str(huge))
    _wait(page, lambda d: _error(d) is not None)
    shown = f"huge.png ({huge.stat().st_size / 1024:.0f} KB) is too large"  # the page's formatBytes, independently
    assert shown in _error(page) and "at most 977 KB" in _error(page)
    assert _attachment_names(page) == []

    big = tmp_path / "big.png"
    big.write_bytes(_png(400, 400, seed=3))  # ~480 KB: the page lets it through, the server's 400 KB limit does not
    _by_id(page, "image-input").send_keys(str(big))
    _wait(page, lambda d: _attachment_names(d) == ["big.png"])
    requests = len(engine.requests)
    _ask(page, "Describe this.")
    _wait(page, lambda d: _error(d) is not None)
    _idle(page)
    message = _error(page)
    assert "Request too large (413, request_too_large)" in message and "exceeds the limit of 400000 bytes" in message
    # nothing reached the model; the question and the image are given back to fix and resend
    assert len(engine.requests) == requests and _history(page) == []
    assert _attachment_names(page) == ["big.png"] and _by_id(page, "message").get_attribute("value") == "Describe this."
    page.save_screenshot(str(shots / "desktop-413.png"))


def test_multi_turn_history_settings_stop_and_clear(page, engine) -> None:
    engine.script = "A grey picture."
    _dispatch(page, "drop", (_png(56, 56, colour=(90, 90, 90)), "dark.png", "image/png"))
    _wait(page, lambda d: _attachment_names(d) == ["dark.png"])
    _set(page, "temperature", "0.7")
    _set(page, "system-prompt", "Answer briefly.")
    _ask(page, "First question?")
    _idle(page)
    assert _answers(page) == ["A grey picture."]
    engine.script = "Still grey."
    _ask(page, "Second question?")
    _idle(page)
    second = engine.requests[-1]
    prompt = engine.tokenizer.decode(second.input_ids)
    # the whole conversation is sent again: system prompt, first turn (with its image), answer, new question
    order = [
        prompt.index(s) for s in ["Answer briefly.", "<img>", "First question?", "A grey picture.", "Second question?"]
    ]
    assert order == sorted(order)
    assert second.generation.do_sample and second.generation.temperature == pytest.approx(0.7)
    assert [m["role"] for m in _history(page)] == ["user", "assistant"] * 2

    # stop: a long answer is cut, the partial answer stays, and the page is ready again
    engine.script, engine.step_delay = "The quick brown fox jumps over the lazy dog. " * 3, 0.15
    _ask(page, "Tell me a long story.")
    _wait(page, lambda d: len(_answers(d)) == 3 and len(_answers(d)[-1]) > 3)
    _by_id(page, "stop").click()
    _idle(page)
    stopped = _answers(page)[-1]
    time.sleep(0.4)
    assert _answers(page)[-1] == stopped and 3 < len(stopped) < len(engine.script)
    assert _by_id(page, "status").text == "Generation stopped."
    assert _by_id(page, "send").is_enabled() and not _by_id(page, "stop").is_displayed()
    assert _history(page)[-1] == {"role": "assistant", "content": stopped}
    deadline = time.monotonic() + 10  # the server noticed the closed stream and cancelled the generation
    while engine.results[-1].finish_reason != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.results[-1].finish_reason == "cancelled"
    assert len(engine.results[-1].token_ids) < len(engine.tokenizer.encode(engine.script, add_special_tokens=False))

    _by_id(page, "clear").click()
    assert _answers(page) == [] and _history(page) == []
    assert _by_id(page, "empty-hint").is_displayed()


def test_error_in_the_middle_of_the_stream_is_shown(page, engine) -> None:
    engine.script, engine.fail_steps = "Hello there", True  # prefill emits the first token, the next step fails
    first = engine.tokenizer.decode(engine.tokenizer.encode("Hello there", add_special_tokens=False)[:1])
    _ask(page, "hello")
    _idle(page)
    message = _error(page)
    assert "Bad request (400" in message and "scripted failure in the middle of decoding" in message
    # what arrived before the failure stays, marked as interrupted
    assert _answers(page) == [first]
    meta = page.execute_script("return document.querySelector('article.assistant .meta').textContent")
    assert meta.startswith("Interrupted: Bad request (400")
    assert _history(page)[-1] == {"role": "assistant", "content": first}


def test_video_is_sent_as_evenly_spaced_frames(page, engine, tmp_path) -> None:
    clip = _webm(tmp_path / "colours.webm")  # 10 frames at 5 fps: 2 s
    _set(page, "video-frames", "4")
    _by_id(page, "video-input").send_keys(str(clip))
    _wait(page, lambda d: len(_attachment_names(d)) == 1 or _error(d) is not None)
    assert _error(page) is None
    assert _attachment_names(page) == ["colours.webm · 4 frames of 2.0 s"]
    engine.script = "Colours."
    _ask(page, "What happens?")
    _idle(page)
    parts = _history(page)[0]["content"]
    frames = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    # midpoints of 4 equal segments of 2 s: 0.25, 0.75, 1.25, 1.75 s → frames 1, 3, 6, 8 at 5 fps
    seen = []
    for url in frames:
        rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=float)
        mean = rgb.reshape(-1, 3).mean(axis=0)
        seen.append(int(np.argmin([np.abs(mean - c).sum() for c in FRAME_COLOURS])))
    assert seen == [1, 3, 6, 8]
    assert engine.requests[-1].pixel_values.shape[0] == 4  # one tile per frame


def test_phone_viewport_is_usable(page, engine, shots) -> None:
    _mobile(page)
    page.refresh()
    _wait(page, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    width = page.execute_script("return window.innerWidth")
    assert width == 390
    assert page.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
    assert page.execute_script("return document.getElementById('settings').open") is False  # folded on phones
    for id_ in ["message", "send", "image-button", "clear"]:
        rect = page.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return [r.left, r.top, r.right, r.bottom]",
            id_,
        )
        assert rect[0] >= 0 and rect[2] <= width and rect[1] >= 0 and rect[3] <= 844, (id_, rect)
        if id_ != "message":
            assert rect[3] - rect[1] >= 44  # touch-sized
    engine.script = GROUNDING_ANSWER
    _dispatch(page, "drop", (_png(300, 200, colour=(120, 160, 200)), "photo.png", "image/png"))
    _wait(page, lambda d: _attachment_names(d) == ["photo.png"])
    _ask(page, "Where are the square and the dot?")
    _idle(page)
    _wait(page, lambda d: d.execute_script("return !!document.querySelector('figure.grounding canvas')"))
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    canvas_width = page.execute_script(
        "return document.querySelector('figure.grounding canvas').getBoundingClientRect().width"
    )
    assert canvas_width <= width
    page.save_screenshot(str(shots / "mobile-grounding.png"))


_A11Y = """
function name(el) {
  if (el.getAttribute("aria-label")) return el.getAttribute("aria-label");
  if (el.id) { const l = document.querySelector(`label[for="${el.id}"]`); if (l) return l.textContent.trim(); }
  return el.textContent.trim();
}
function rgb(s) { return s.match(/[\\d.]+/g).slice(0, 3).map(Number); }
function lum(c) {
  const l = c.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
}
function contrast(el) {
  const s = getComputedStyle(el);
  let bg = el, colour = "rgba(0, 0, 0, 0)";
  while (bg) { colour = getComputedStyle(bg).backgroundColor; if (!colour.endsWith(", 0)") && colour !== "transparent") break; bg = bg.parentElement; }
  const [a, b] = [lum(rgb(s.color)), lum(rgb(colour))];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}
const controls = Array.from(document.querySelectorAll("button, input, textarea, select, summary"));
return {
  unnamed: controls.filter((el) => !name(el)).map((el) => el.outerHTML.slice(0, 80)),
  contrast: Object.fromEntries(["send", "clear", "model-name", "status", "message", "max-tiles-help", "empty-hint"]
    .map((id) => [id, contrast(document.getElementById(id))])),
  log: [document.getElementById("log").getAttribute("role"), document.getElementById("log").getAttribute("aria-live")],
  alert: document.getElementById("error").getAttribute("role"),
  lang: document.documentElement.lang,
};
"""


def test_accessibility_basics(page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    report = page.execute_script(_A11Y)
    assert report["unnamed"] == []
    assert all(ratio >= 4.5 for ratio in report["contrast"].values()), report["contrast"]
    assert report["log"] == ["log", "polite"] and report["alert"] == "alert" and report["lang"] == "en"
    # keyboard: the file picker, the message box and the send button are reachable with Tab
    page.execute_script("document.body.focus()")
    reached = []
    for _ in range(14):
        ActionChains(page).send_keys(Keys.TAB).perform()  # to the page, not into a focused file input
        reached.append(page.switch_to.active_element.get_attribute("id"))
    assert {"message", "image-input", "video-input", "send", "clear"} <= set(reached), reached
    # every resource came from the page's own origin
    origins = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
        ".filter(o => o !== location.origin)"
    )
    assert origins == []


def test_api_key_is_asked_once_per_session(browser, engine, chromium) -> None:
    engine.script, engine.step_delay, engine.fail_steps = "Welcome.", 0.0, False
    with ServerThread(_app(engine, api_key=KEY)) as server:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.get(server.url + "/")
        _wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
        _ask(browser, "hi")
        _wait(browser, lambda d: _by_id(d, "key-dialog").is_displayed())
        _by_id(browser, "api-key").send_keys("sk-wrong")
        _by_id(browser, "key-save").click()
        # the server refuses the wrong key: the dialog comes back with its message
        _wait(browser, lambda d: "incorrect API key" in _by_id(d, "key-reason").text)
        assert _by_id(browser, "key-dialog").is_displayed()
        _by_id(browser, "api-key").send_keys(KEY)
        _by_id(browser, "key-save").click()
        _idle(browser)
        assert _answers(browser) == ["Welcome."] and _error(browser) is None
        assert browser.execute_script("return sessionStorage.getItem('ivl.apiKey')") == KEY
        browser.refresh()  # same tab, same session: no second question
        _wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
        _ask(browser, "again")
        _idle(browser)
        assert not _by_id(browser, "key-dialog").is_displayed()
        assert _answers(browser) == ["Welcome."] and _error(browser) is None


def test_scripted_engine_forces_the_answer(engine, processor) -> None:
    """The test double itself: through the plain engine API it emits exactly its script, then stops."""
    from ivl.inference.chat import encode_messages
    from ivl.inference.engine import GenerationConfig, GenerationRequest

    scripted = ScriptedEngine(engine.model, processor)
    scripted.script = GROUNDING_ANSWER
    inputs = encode_messages(processor, [{"role": "user", "content": "where?"}])
    request = GenerationRequest.from_inputs(inputs, GenerationConfig(max_new_tokens=100, do_sample=True))
    (result,) = scripted.generate([request])
    assert result.text == GROUNDING_ANSWER and result.finish_reason == "stop"
    assert result.completion_tokens == len(processor.tokenizer.encode(GROUNDING_ANSWER, add_special_tokens=False)) + 1
