"""OpenAI-compatible chat-completions server (FastAPI): any OpenAI client can talk to an ivl model.

Requests are validated and turned into token ids + image tiles in a worker thread, then handed to the
continuous-batching `Scheduler`, so concurrent clients share decode steps. Every failure becomes an
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}`` with a fitting status code.
Media: ``data:`` URLs always; local files only below ``media_root``; http(s) only with ``allow_remote``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivl.errors import GenerationError, ImageError, IvlError, ModelInputError, TemplateError
from ivl.inference.engine import Engine, GenerationConfig, GenerationRequest, GenerationResult
from ivl.inference.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)
from ivl.inference.scheduler import Scheduler, SchedulerBusy, SchedulerStopped

log = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    """Per-request limits; exceeding one gives a 4xx with a message naming the limit."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 8
    max_tiles_per_image: int = 12
    max_tiles: int = 48
    max_tokens: int = 4096
    default_max_tokens: int = 1024
    max_image_pixels: int = 50_000_000
    remote_timeout_s: float = 10.0
    max_queue: int = 256


# ------------------------------------------------------------------------------------------------ middleware


class BodySizeLimit:
    """ASGI middleware: reject bodies above ``limit`` bytes with 413, counting streamed chunks too."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = APIError(413, f"request body exceeds the limit of {self.limit} bytes", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await JSONResponse(too_big.body(), status_code=413)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------------------ media


class MediaLoader:
    """Turns ``image_url`` values into RGB images under the server's media policy."""

    def __init__(self, *, media_root: str | Path | None, allow_remote: bool, limits: ServerLimits) -> None:
        self.media_root = Path(media_root).resolve() if media_root is not None else None
        self.allow_remote = allow_remote
        self.limits = limits

    def load(self, url: str, param: str) -> Any:
        from ivl.processing.images import load_image

        if url.startswith("data:"):
            data = self._data_url(url, param)
            label = f"{param} (data URL, {len(data)} bytes)"
        elif url.startswith(("http://", "https://")):
            data = self._fetch(url, param)
            label = f"{param} ({url[:100]})"
        else:
            return self._local(url, param)
        try:
            return load_image(data, max_pixels=self.limits.max_image_pixels, name=label)
        except ImageError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_image") from exc

    def _data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(
                400,
                f"{param}: data URLs must be base64 encoded (data:image/...;base64,...)",
                param=param,
                code="invalid_image_url",
            )
        mime = header[5:].split(";")[0]
        if mime and not mime.startswith("image/"):
            raise APIError(
                400,
                f"{param}: data URL has media type {mime!r}, expected image/*",
                param=param,
                code="invalid_image_url",
            )
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"{param}: invalid base64 payload ({exc})", param=param, code="invalid_base64") from exc

    def _fetch(self, url: str, param: str) -> bytes:
        if not self.allow_remote:
            raise APIError(
                400,
                f"{param}: fetching remote images is disabled on this server; send the image as a data: URL",
                param=param,
                code="remote_images_disabled",
            )
        import httpx

        try:
            with (
                httpx.Client(timeout=self.limits.remote_timeout_s, follow_redirects=True) as client,
                client.stream("GET", url) as response,
            ):
                response.raise_for_status()
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.limits.max_body_bytes:
                        raise APIError(
                            400,
                            f"{param}: remote image exceeds {self.limits.max_body_bytes} bytes",
                            param=param,
                            code="image_too_large",
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise APIError(
                400, f"{param}: cannot fetch {url[:100]}: {exc}", param=param, code="image_fetch_failed"
            ) from exc

    def _local(self, url: str, param: str) -> Any:
        from ivl.processing.images import load_image

        if self.media_root is None:
            raise APIError(
                400,
                f"{param}: local file paths are not allowed on this server (no --media-root); use a data: URL",
                param=param,
                code="local_files_disabled",
            )
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise APIError(
                400, f"{param}: unsupported URL scheme {parsed.scheme!r}", param=param, code="invalid_image_url"
            )
        raw = unquote(parsed.path) if parsed.scheme == "file" else url
        candidate = Path(raw)
        path = (candidate if candidate.is_absolute() else self.media_root / candidate).resolve()
        if not path.is_relative_to(self.media_root):
            raise APIError(
                403, f"{param}: path is outside the allowed media root", param=param, code="path_not_allowed"
            )
        try:
            return load_image(path, max_pixels=self.limits.max_image_pixels, name=f"{param} ({candidate.name})")
        except ImageError as exc:
            raise APIError(400, str(exc).replace(str(path), candidate.name), param=param, code="invalid_image") from exc


# ------------------------------------------------------------------------------------------------ requests


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            raise APIError(
                400,
                f"messages[{index}].content[{j}]: images are only allowed in user messages",
                param=f"messages[{index}]",
            )
        parts.append(part.text)
    return "".join(parts)


def generation_from_request(body: ChatCompletionRequest, limits: ServerLimits) -> GenerationConfig:
    """Map OpenAI sampling fields to a GenerationConfig; no temperature/top_p given means greedy (model default)."""
    max_tokens = body.max_completion_tokens or body.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_tokens > limits.max_tokens:
        raise APIError(
            400,
            f"{param}={max_tokens} exceeds this server's limit of {limits.max_tokens}",
            param=param,
            code="max_tokens_exceeded",
        )
    sampling = body.temperature not in (None, 0.0) or (body.temperature is None and body.top_p not in (None, 1.0))
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=sampling,
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=body.top_k or 0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            stop=stop or None,
            seed=body.seed,
        )
    except GenerationError as exc:
        raise APIError(400, str(exc), code="invalid_generation_parameters") from exc


class RequestBuilder:
    """Validated OpenAI body → GenerationRequest (runs in a worker thread: images are decoded and tiled here)."""

    def __init__(self, engine: Engine, media: MediaLoader, limits: ServerLimits) -> None:
        self.engine = engine
        self.media = media
        self.limits = limits

    def build(self, body: ChatCompletionRequest) -> GenerationRequest:
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported; only n=1", param="n", code="unsupported_parameter")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if body.tools:
            raise APIError(
                400, "tools / function calling are not supported", param="tools", code="unsupported_parameter"
            )
        if body.messages[-1].role != "user":
            raise APIError(400, "the last message must come from the user", param="messages", code="invalid_messages")
        max_num = body.max_tiles or self.limits.max_tiles_per_image
        if max_num > self.limits.max_tiles_per_image:
            raise APIError(
                400,
                f"max_tiles={max_num} exceeds the limit of {self.limits.max_tiles_per_image} tiles per image",
                param="max_tiles",
                code="too_many_tiles",
            )
        generation = generation_from_request(body, self.limits)
        messages = self._messages(body)
        from ivl.inference.chat import encode_messages

        try:
            inputs = encode_messages(self.engine.processor, messages, max_num=max_num)
        except IvlError as exc:  # template, image, video or tile-range problems in what the client sent
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
        tiles = 0 if inputs.get("pixel_values") is None else int(inputs["pixel_values"].shape[0])
        if tiles > self.limits.max_tiles:
            raise APIError(
                400,
                f"the images make {tiles} tiles, above the limit of {self.limits.max_tiles} per request; lower max_tiles or send fewer images",
                param="messages",
                code="too_many_tiles",
            )
        request = GenerationRequest.from_inputs(inputs, generation, request_id=f"chatcmpl-{uuid.uuid4().hex}")
        prompt = len(request.input_ids)
        if prompt >= self.engine.max_context:
            raise APIError(
                400,
                f"the prompt has {prompt} tokens; the model's context is {self.engine.max_context}",
                param="messages",
                code="context_length_exceeded",
            )
        return request

    def _messages(self, body: ChatCompletionRequest) -> list[dict[str, Any]]:
        images = sum(isinstance(p, ImagePart) for m in body.messages if isinstance(m.content, list) for p in m.content)
        if images > self.limits.max_images:
            raise APIError(
                400,
                f"the request has {images} images, above the limit of {self.limits.max_images}",
                param="messages",
                code="too_many_images",
            )
        out: list[dict[str, Any]] = []
        system: list[str] = []
        for i, message in enumerate(body.messages):
            if message.role in ("system", "developer"):
                system.append(_text_of(message, i))
                continue
            if message.role == "assistant" or isinstance(message.content, str) or message.content is None:
                out.append({"role": message.role, "content": _text_of(message, i)})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    image = self.media.load(part.image_url.url, f"messages[{i}].content[{j}].image_url")
                    parts.append({"type": "image", "image": image})
                else:
                    parts.append({"type": "text", "text": part.text})
            out.append({"role": "user", "content": parts})
        if system:
            out.insert(0, {"role": "system", "content": "\n".join(system)})
        return out


# ------------------------------------------------------------------------------------------------ app


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    media_root: str | Path | None = None,
    allow_remote: bool = False,
    limits: ServerLimits | None = None,
    batch_window_s: float = 0.005,
    chat_page: bool = True,
) -> FastAPI:
    """Build the FastAPI app; its lifespan starts and stops the batching scheduler thread.

    With ``chat_page`` the browser chat page is served at ``/`` (it talks to the same OpenAI API).
    """
    limits = limits or ServerLimits()
    scheduler = Scheduler(engine, batch_window_s=batch_window_s, max_queue=limits.max_queue)
    builder = RequestBuilder(
        engine, MediaLoader(media_root=media_root, allow_remote=allow_remote, limits=limits), limits
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="ivl", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.model_name = model_name
    app.add_middleware(BodySizeLimit, limit=limits.max_body_bytes)

    def error(exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
        return error(APIError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error"))

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if scheduler.running else "stopped", "model": model_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return ModelList(data=[ModelCard(id=model_name)]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        return ModelCard(id=model_name).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        check_auth(request)
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
        try:
            body = ChatCompletionRequest.model_validate(payload)
        except ValueError as exc:
            raise RequestValidationError(getattr(exc, "errors", list)()) from exc
        if body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        gen_request = await run_in_threadpool(builder.build, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(scheduler, gen_request, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await _generate_unless_abandoned(scheduler, gen_request, request)
        except (ModelInputError, GenerationError, TemplateError) as exc:
            raise APIError(400, str(exc), code="invalid_request") from exc
        except SchedulerBusy as exc:
            raise APIError(429, f"server busy: {exc}", code="server_busy") from exc
        except SchedulerStopped as exc:
            raise APIError(503, str(exc), code="server_stopped") from exc
        completion = ChatCompletion(
            id=gen_request.request_id,
            model=model_name,
            choices=[Choice(message=ResponseMessage(content=result.text), finish_reason=_finish(result.finish_reason))],
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
        )
        return JSONResponse(completion.model_dump())

    if chat_page:
        from ivl.inference.webui import mount_chat_page

        mount_chat_page(app, model_name=model_name, limits=limits, api_key_required=api_key is not None)
    return app


async def _generate_unless_abandoned(
    scheduler: Scheduler, gen_request: GenerationRequest, http_request: Request
) -> GenerationResult:
    """Await the result, but stop generating (free the batch slot) if the client hangs up meanwhile."""
    task = asyncio.ensure_future(scheduler.generate(gen_request))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await http_request.is_disconnected():
                task.cancel()  # closes the event stream, which cancels the request in the scheduler
                raise APIError(499, "client closed the request", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


def _finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else ("stop" if reason is not None else None)


async def _sse(scheduler: Scheduler, request: GenerationRequest, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())

    def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices: bool = True) -> str:
        body = ChatCompletionChunk(
            id=request.request_id,
            created=created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
            usage=usage,
        )
        return f"data: {body.model_dump_json(exclude_none=False)}\n\n"

    events = scheduler.events(request)
    try:
        yield chunk(Delta(role="assistant", content=""))
        async for ev in events:
            if ev.delta:
                yield chunk(Delta(content=ev.delta))
            if ev.result is not None:
                yield chunk(Delta(), finish=_finish(ev.finish_reason))
                if include_usage:
                    r = ev.result
                    usage = Usage(
                        prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens,
                        total_tokens=r.prompt_tokens + r.completion_tokens,
                    )
                    yield chunk(Delta(), usage=usage, choices=False)
    except (IvlError, SchedulerBusy, SchedulerStopped) as exc:
        status = 429 if isinstance(exc, SchedulerBusy) else 400
        yield f"data: {json.dumps(APIError(status, str(exc)).body())}\n\n"
    except Exception as exc:  # the stream has started: report in-band rather than dropping the connection
        log.exception("streaming generation failed")
        yield f"data: {json.dumps(APIError(500, f'internal server error ({type(exc).__name__})').body())}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    media_root: str | Path | None = None,
    allow_remote: bool = False,
    model_name: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    max_batch_size: int = 16,
    limits: ServerLimits | None = None,
) -> None:
    """Load a checkpoint directory and serve it until interrupted."""
    import uvicorn

    from ivl.inference.chat import load_for_inference

    model, processor = load_for_inference(model_dir, dtype=dtype, device=device)
    engine = Engine(model, processor, max_batch_size=max_batch_size)
    app = create_app(
        engine,
        model_name=model_name or Path(model_dir).resolve().name,
        api_key=api_key,
        media_root=media_root,
        allow_remote=allow_remote,
        limits=limits,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
