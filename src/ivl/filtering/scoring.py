"""LLM judges: 0–10 quality and repetition scores from domain prompts, through any chat scorer.

A scorer only turns prompts into reply texts (:class:`Scorer`); parsing the score, picking the template
and deciding keep/review/reject live here, so a remote OpenAI-compatible endpoint and a local ivl model
are interchangeable. An unparsable reply is recorded with its text, never guessed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ivl.errors import ConfigError, IvlError
from ivl.filtering.rules import Flag, Rule, Sample, check_positive, register_rule

ApplyTo = Literal["text", "multimodal", "all"]
OnUnparsable = Literal["review", "keep", "reject"]


class ScoringError(IvlError):
    """Some prompts of a batch got no reply after all retries; ``errors[i]`` says why (None = answered)."""

    def __init__(self, message: str, replies: list[str | None], errors: list[str | None]) -> None:
        super().__init__(message)
        self.replies = replies
        self.errors = errors


@runtime_checkable
class Scorer(Protocol):
    """Anything that answers a list of user prompts with one reply text each, in order."""

    def score_batch(self, prompts: Sequence[str]) -> list[str]: ...


# --------------------------------------------------------------------------------------------------------
# reply parsing

_NUMBER = r"-?\d+(?:\.\d+)?"
_SCORE_LINE = re.compile(
    rf"(?:\bscore\b|\brating\b|评分|得分|分数)\s*(?:is|of|=|:|：)?\s*(?:about|around|approximately)?\s*"
    rf"(?P<value>{_NUMBER})(?P<scale>\s*(?:/|out of)\s*{_NUMBER})?(?P<range>\s*(?:or|to|-|–|~)\s*\d)?",
    re.I,
)
_BARE = re.compile(rf"(?P<value>{_NUMBER})(?P<scale>\s*/\s*{_NUMBER})?\s*\.?")


def parse_score(reply: str, low: float = 0.0, high: float = 10.0) -> tuple[float | None, str | None]:
    """(score, None) or (None, why not). Reads the last ``Score: N`` line, else a bare ``N`` or ``N/10`` reply.

    Hedged ("7 or 8"), off-scale ("4/5") and out-of-range values are errors, not guesses.
    """
    text = reply.replace("*", "").strip()
    if not text:
        return None, "empty reply"
    match = None
    for line in reversed(text.splitlines()):
        found = list(_SCORE_LINE.finditer(line))
        if found:
            match = found[-1]
            break
    if match is None:
        match = _BARE.fullmatch(text)
    if match is None:
        return None, "no score found"
    if match.groupdict().get("range"):
        return None, f"ambiguous score {match.group(0).strip()!r}"
    scale = match.group("scale")
    if scale and float(re.findall(_NUMBER, scale)[-1]) != high:
        return None, f"score on another scale {match.group(0).strip()!r}"
    value = float(match.group("value"))
    if not low <= value <= high:
        return None, f"score {value:g} outside [{low:g}, {high:g}]"
    return value, None


# --------------------------------------------------------------------------------------------------------
# prompts

_ROLE_NAMES = {"system": "System", "human": "User", "gpt": "Assistant"}


class PromptLibrary:
    """Editable templates ``NAME.txt``: a user folder first, then the ones shipped in ``ivl/filtering/prompts``.

    A template holds ``{conversation}`` (and optionally ``{domain}``), replaced literally, so braces in
    data never break formatting.
    """

    def __init__(self, prompts_dir: str | os.PathLike[str] | None = None) -> None:
        self.user_dir = Path(prompts_dir) if prompts_dir else None
        if self.user_dir is not None and not self.user_dir.is_dir():
            raise ConfigError(f"prompts_dir {str(self.user_dir)!r} is not a folder")
        self._cache: dict[str, str] = {}

    def names(self) -> list[str]:
        shipped = {
            p.name[:-4]
            for p in resources.files("ivl.filtering").joinpath("prompts").iterdir()
            if p.name.endswith(".txt")
        }
        user = {p.stem for p in self.user_dir.glob("*.txt")} if self.user_dir else set()
        return sorted(shipped | user)

    def get(self, name: str) -> str:
        if name not in self._cache:
            if self.user_dir is not None and (self.user_dir / f"{name}.txt").is_file():
                text = (self.user_dir / f"{name}.txt").read_text(encoding="utf-8")
            else:
                shipped = resources.files("ivl.filtering").joinpath("prompts", f"{name}.txt")
                if not shipped.is_file():
                    raise ConfigError(f"no prompt template {name!r}; available: {', '.join(self.names())}")
                text = shipped.read_text(encoding="utf-8")
            if "{conversation}" not in text:
                raise ConfigError(f"prompt template {name!r} lacks the {{conversation}} placeholder")
            self._cache[name] = text
        return self._cache[name]

    def has(self, name: str) -> bool:
        return name in self.names()


def render_conversation(sample: Sample, max_chars: int = 12000) -> str:
    """The record as plain dialogue for a judge; long ones keep head and tail (loops live at the end)."""
    parts = []
    if sample.images:
        parts.append(f"[The sample has {len(sample.images)} image(s), not shown; <image> marks where each appears.]")
    if sample.video is not None:
        parts.append("[The sample has a video, not shown; <video> marks where it appears.]")
    parts += [f"{_ROLE_NAMES[t['from']]}: {t['value']}" for t in sample.turns]
    text = "\n\n".join(parts)
    if len(text) > max_chars:
        head, tail = max_chars * 2 // 3, max_chars // 3
        text = f"{text[:head]}\n[... {len(text) - head - tail} characters omitted ...]\n{text[-tail:]}"
    return text


_OCR_HINT = re.compile(
    r"\b(ocr|transcribe|read (?:the|all|out)|text (?:in|on|of) (?:the|this) (?:image|picture|document))\b", re.I
)
_CAPTION_HINT = re.compile(r"\b(describe|description|caption)\b", re.I)
_CODE_HINT = re.compile(r"```|\b(?:def|class|return|import|function|#include|public static)\b[^\n]*[(){}:;]")
_MATH_HINT = re.compile(
    r"\\(?:frac|sqrt|sum|int|times|cdot)|\$[^$\n]+\$|\b(?:solve|equation|prove|integral|derivative)\b", re.I
)


def guess_domain(sample: Sample) -> str:
    """Domain of a record for template choice: the input's configured domain, else a keyword guess."""
    if sample.domain:
        return sample.domain
    prompts = " ".join(v for _, v in sample.texts("prompts"))
    if sample.images or sample.video is not None:
        if _OCR_HINT.search(prompts):
            return "ocr"
        if _CAPTION_HINT.search(prompts):
            return "captioning"
        return "general"
    everything = " ".join(v for _, v in sample.texts("all"))
    if _CODE_HINT.search(everything):
        return "code"
    if _MATH_HINT.search(everything):
        return "math"
    return "general"


# --------------------------------------------------------------------------------------------------------
# LLM rules


@dataclass(kw_only=True)
class LLMRule(Rule):
    """Score below ``threshold`` → reject (or review if the rule's action is review); below ``review_below`` → review."""

    stage = "llm"
    enabled: bool = False
    threshold: float = 7.0
    thresholds: dict[str, float] = field(default_factory=dict)
    review_below: float | None = None
    apply_to: ApplyTo = "all"
    on_unparsable: OnUnparsable = "review"
    template: str | None = None
    max_prompt_chars: int = 12000

    def validate(self) -> None:
        super().validate()
        check_positive(self, max_prompt_chars=self.max_prompt_chars)
        for key, value in {"threshold": self.threshold, **self.thresholds, "review_below": self.review_below}.items():
            if value is not None and not 0 <= value <= 10:
                raise ConfigError(f"rule {self.name}: {key} must be within [0, 10], got {value!r}")
        if self.apply_to not in ("text", "multimodal", "all"):
            raise ConfigError(f"rule {self.name}: apply_to must be text, multimodal or all, got {self.apply_to!r}")
        if self.on_unparsable not in ("review", "keep", "reject"):
            raise ConfigError(
                f"rule {self.name}: on_unparsable must be review, keep or reject, got {self.on_unparsable!r}"
            )

    def applies(self, sample: Sample) -> bool:
        multimodal = bool(sample.images) or sample.video is not None
        return self.apply_to == "all" or (self.apply_to == "multimodal") == multimodal

    def template_name(self, domain: str, library: PromptLibrary) -> str:
        if self.template:
            return self.template
        return domain if library.has(domain) else "general"

    def prompt(self, sample: Sample, domain: str, library: PromptLibrary) -> str:
        conversation = render_conversation(sample, self.max_prompt_chars)
        template = library.get(self.template_name(domain, library))
        return template.replace("{domain}", domain).replace("{conversation}", conversation)

    def decide(self, reply: str, domain: str) -> tuple[float | None, Flag | None]:
        score, error = parse_score(reply)
        if score is None:
            reason = f"unparsable score reply ({error}): {reply[:300]!r}"
            if self.on_unparsable == "keep":
                return None, None
            return None, Flag(self.name, reason, None, "review" if self.on_unparsable == "review" else self.action)
        threshold = self.thresholds.get(domain, self.threshold)
        if score < threshold:
            return score, Flag(self.name, f"{domain} score {score:g} < {threshold:g}", score, self.action)
        if self.review_below is not None and score < self.review_below:
            return score, Flag(
                self.name, f"{domain} score {score:g} < review_below {self.review_below:g}", score, "review"
            )
        return score, None

    def check(self, sample: Sample) -> Flag | None:
        raise ConfigError(f"rule {self.name} needs a scorer; run it through ivl.filtering.pipeline")


@register_rule
@dataclass(kw_only=True)
class LLMQuality(LLMRule):
    """Paper strategy 1: 0–10 quality by domain prompt; default threshold 7, pure-text records only."""

    name = "llm_quality"
    apply_to: ApplyTo = "text"


@register_rule
@dataclass(kw_only=True)
class LLMRepetition(LLMRule):
    """Paper strategy 2: 0–10 non-repetitiveness (10 = none); below 3 removed, optional review band."""

    name = "llm_repetition"
    threshold: float = 3.0
    template: str | None = "repetition"


# --------------------------------------------------------------------------------------------------------
# scorers


class _RateLimiter:
    """Spaces request starts at least ``1/rate`` seconds apart (a steady, burst-free rate)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class OpenAIScorer:
    """Chat-completions client for any OpenAI-compatible endpoint (vLLM, SGLang, LMDeploy, ``ivl serve``…).

    Prompts of one call run concurrently (``concurrency`` in flight), starts are spaced by ``rate_limit``
    requests/s, and transport errors, 429 and 5xx are retried with exponential backoff and jitter (a
    ``Retry-After`` header wins). Other 4xx are final for that prompt.
    """

    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    rate_limit: float | None = None
    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    max_tokens: int = 64
    temperature: float = 0.0
    system_prompt: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    transport: Any = None  # an httpx transport, for tests or custom networking

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"scorer concurrency must be >= 1, got {self.concurrency}")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigError(f"scorer rate_limit must be > 0 requests/s, got {self.rate_limit}")
        if self.max_retries < 0:
            raise ConfigError(f"scorer max_retries must be >= 0, got {self.max_retries}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"scorer base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    _loop: Any = field(default=None, init=False, repr=False, compare=False)
    _thread: Any = field(default=None, init=False, repr=False, compare=False)
    _client: Any = field(default=None, init=False, repr=False, compare=False)
    _limiter: Any = field(default=None, init=False, repr=False, compare=False)

    def score_batch(self, prompts: Sequence[str]) -> list[str]:
        """Replies in prompt order; raises :class:`ScoringError` (with the partial replies) if any failed.

        Requests run on one event loop in a helper thread that lives as long as the scorer, so the HTTP
        client (its TLS context and keep-alive connections) and the rate limit carry over between calls.
        """
        if not prompts:
            return []
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="ivl-scorer", daemon=True)
            self._thread.start()
        results = asyncio.run_coroutine_threadsafe(self._run(list(prompts)), self._loop).result()
        replies = [r if isinstance(r, str) else None for r in results]
        errors = [None if isinstance(r, str) else r.message for r in results]
        failed = [e for e in errors if e is not None]
        if failed:
            raise ScoringError(
                f"{len(failed)} of {len(prompts)} scoring requests to {self.url} failed; first: {failed[0]}",
                replies,
                errors,
            )
        return [r for r in replies if r is not None]

    def close(self) -> None:
        """Close connections and stop the helper thread (a later call starts them again)."""
        if self._loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = self._client = self._limiter = None

    def __enter__(self) -> OpenAIScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _run(self, prompts: list[str]) -> list[str | _Failure]:
        import httpx

        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s, headers=headers, transport=self.transport, limits=limits
            )
            self._limiter = _RateLimiter(self.rate_limit)
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(prompt: str) -> str | _Failure:
            async with semaphore:
                return await self._request(self._client, self._limiter, prompt)

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def _body(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            **self.extra_body,
        }

    async def _request(self, client: Any, limiter: _RateLimiter, prompt: str) -> str | _Failure:
        import httpx

        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            await limiter.wait()
            retry_after: float | None = None
            try:
                response = await client.post(self.url, json=self._body(prompt))
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        return str(response.json()["choices"][0]["message"]["content"] or "")
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        return _Failure(f"malformed completion from {self.url}: {type(exc).__name__}: {exc}")
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in _RETRY_STATUS:
                    return _Failure(last)
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else min(self.max_backoff_s, self.backoff_s * 2**attempt)
                await asyncio.sleep(delay * (1 + 0.25 * random.random()))
        return _Failure(f"gave up after {self.max_retries + 1} attempts; last: {last}")


@dataclass(frozen=True)
class _Failure:
    message: str


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class EngineScorer:
    """Scores with a local ivl model through :class:`ivl.inference.engine.Engine` (greedy, engine-batched).

    Prompts are wrapped in the ``internvl2_5`` chat template (spec §5.1) unless ``encode`` is given; a
    prompt that does not fit the context window fails alone (reported in :class:`ScoringError`).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_new_tokens: int = 64,
        system_message: str | None = None,
        encode: Any = None,
    ) -> None:
        from ivl.config import DEFAULT_SYSTEM_MESSAGE

        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.system_message = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
        self._encode = encode

    def chat_text(self, prompt: str) -> str:
        return (
            f"<|im_start|>system\n{self.system_message}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )

    def encode(self, prompt: str) -> list[int]:
        if self._encode is not None:
            return list(self._encode(prompt))
        # The tokenizer adds <s> itself for InternLM2 flavours and nothing for Qwen2, as the template expects.
        return list(self.engine.tokenizer(self.chat_text(prompt))["input_ids"])

    def score_batch(self, prompts: Sequence[str]) -> list[str]:
        from ivl.inference.engine import GenerationConfig, GenerationRequest

        generation = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False)
        replies: list[str | None] = [None] * len(prompts)
        errors: list[str | None] = [None] * len(prompts)
        requests, where = [], []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) + self.max_new_tokens > self.engine.max_context:
                errors[i] = (
                    f"prompt of {len(ids)} tokens + {self.max_new_tokens} new exceeds the context of {self.engine.max_context}"
                )
                continue
            requests.append(GenerationRequest(input_ids=ids, generation=generation))
            where.append(i)
        try:
            results = [r.text for r in self.engine.generate(requests)] if requests else []
        except IvlError:  # one bad prompt (e.g. literal image tokens) must not sink the batch: isolate it
            results = []
            for i, request in zip(where, requests, strict=True):
                try:
                    results.append(self.engine.generate([request])[0].text)
                except IvlError as exc:
                    results.append(None)
                    errors[i] = f"{type(exc).__name__}: {exc}"
        for i, text in zip(where, results, strict=True):
            replies[i] = text
        failed = [e for e in errors if e is not None]
        if failed:
            raise ScoringError(
                f"{len(failed)} of {len(prompts)} prompts could not be scored locally; first: {failed[0]}",
                replies,
                errors,
            )
        return [r or "" for r in replies]


def local_scorer(checkpoint: str, *, max_new_tokens: int = 64, batch_size: int = 16) -> EngineScorer:
    """An :class:`EngineScorer` for an ivl checkpoint folder (weights + tokenizer), on GPU when there is one."""
    import torch
    from transformers import AutoTokenizer

    from ivl.inference.engine import Engine
    from ivl.models.internvl import InternVL

    if not Path(checkpoint).is_dir():
        raise ConfigError(f"scorer checkpoint {checkpoint!r} is not a folder")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = InternVL.from_pretrained(checkpoint, device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return EngineScorer(Engine(model, tokenizer, max_batch_size=batch_size), max_new_tokens=max_new_tokens)
