"""A fake OpenAI-compatible chat server on 127.0.0.1 whose replies are steered by markers in the prompt.

Markers (anywhere in the user prompt): ``SCORE=N`` → "…\\nScore: N"; ``REP=N`` → the same, but only for the
repetition template; ``GARBLE`` → a reply without a score; ``FAIL429=k`` / ``FAIL500=k`` → the first k
attempts of that prompt fail with that status; ``BAD400`` → always 400. Every request is logged.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeOpenAI:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reply_for(self, prompt: str) -> tuple[int, str]:
        with self.lock:
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
        if "BAD400" in prompt:
            return 400, "bad request"
        for code in (429, 500):
            m = re.search(rf"FAIL{code}=(\d+)", prompt)
            if m and attempt <= int(m.group(1)):
                return code, "try later"
        if "GARBLE" in prompt:
            return 200, "I am not able to rate this sample."
        key = "REP" if "for repetition only" in prompt else "SCORE"
        m = re.search(rf"{key}=(\d+)", prompt)
        return 200, f"Looks fine.\nScore: {m.group(1) if m else 10}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.requests.append(
                        {
                            "path": self.path,
                            "body": body,
                            "auth": self.headers.get("Authorization"),
                            "t": time.monotonic(),
                        }
                    )
                try:
                    time.sleep(fake.delay_s)
                    status, text = fake.reply_for(body["messages"][-1]["content"])
                finally:
                    # counted out before the reply is written: once its last byte arrives the client may send
                    # its next request, which must not find this one still counted (max_in_flight stays a bound)
                    with fake.lock:
                        fake.in_flight -= 1
                if status == 200:
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                    }
                else:
                    payload = {"error": {"message": text}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    with FakeOpenAI(delay_s=0.01) as server:
        yield server
