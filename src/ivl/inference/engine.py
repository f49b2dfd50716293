"""Batched generation with a static KV cache; sequences finish, and new ones join, independently.

A running batch (``DecodeBatch``) holds one left-padded KV cache for all its rows. Each step feeds one token
per row. Finished rows are dropped (``KVCache.keep_rows``); new requests are prefilled on their own and then
merged into the running batch by right-aligning both caches (positions come from the attention mask, so
extra left padding never changes what a row computes). This is what lets the server batch continuously.

Every chat prompt starts with the same template system block; its keys/values are computed once and copied
into each new cache (rows laid out as ``[shared prefix][padding][rest of prompt]``), so prefill only runs
the part of the prompt that differs.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ivl.errors import GenerationError, ModelInputError
from ivl.inference.sampling import RowSampling, Sampler, row_sampling_checks
from ivl.inference.streaming import GROUNDING_TOKENS, TextStream, special_ids

FinishReason = Literal["stop", "length", "cancelled"]

#: Tokens that end a chat turn in the InternVL templates (spec §5.5; Mono: [2, 92543, 92542]).
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>")


@dataclass
class GenerationConfig:
    """How to decode. ``do_sample=False`` (or ``temperature=0``) is greedy; ``stop_token_ids=None`` uses the
    template's end-of-turn tokens. Accepts the official ``generation_config`` dict keys (``eos_token_id``,
    ``num_beams=1``) via :meth:`from_any`.
    """

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> GenerationConfig:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.stop_token_ids is not None:
            ids = [self.stop_token_ids] if isinstance(self.stop_token_ids, int) else list(self.stop_token_ids)
            if any(not isinstance(i, int) or i < 0 for i in ids):
                raise GenerationError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
            self.stop_token_ids = ids
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
            if any(not isinstance(s, str) or not s for s in stops):
                raise GenerationError(f"stop strings must be non-empty strings, got {self.stop!r}")
            self.stop = stops
        row_sampling_checks(self.row_sampling())
        return self

    def row_sampling(self) -> RowSampling:
        return RowSampling(
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )

    @classmethod
    def from_any(cls, value: GenerationConfig | Mapping[str, Any] | None) -> GenerationConfig:
        """Accept a config, ``None`` (defaults) or an official-style dict such as ``dict(max_new_tokens=64)``."""
        if value is None:
            return cls()
        if isinstance(value, GenerationConfig):
            return value
        data = dict(value)
        if "eos_token_id" in data:
            eos = data.pop("eos_token_id")
            data.setdefault("stop_token_ids", [eos] if isinstance(eos, int) else eos)
        if "stop_strings" in data:
            data.setdefault("stop", data.pop("stop_strings"))
        beams = data.pop("num_beams", 1)
        if beams != 1:
            raise GenerationError(f"beam search is not supported (num_beams={beams}); use num_beams=1")
        for ignored in ("pad_token_id", "use_cache"):
            data.pop(ignored, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GenerationError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass
class GenerationRequest:
    """One prompt: token ids (1-D), optional image tiles ``[N, 3, S, S]`` or precomputed features ``[N, T, H]``."""

    input_ids: Sequence[int] | torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_inputs(
        cls, inputs: Mapping[str, Any], generation: GenerationConfig | Mapping[str, Any] | None = None, **kw: Any
    ) -> GenerationRequest:
        """Build from one sample of the processor's output (``input_ids``, ``attention_mask``, ``pixel_values``)."""
        ids = torch.as_tensor(inputs["input_ids"])
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ModelInputError(f"from_inputs expects one sample, got input_ids of shape {tuple(ids.shape)}")
            ids = ids[0]
            mask = inputs.get("attention_mask")
            if mask is not None:
                ids = ids[torch.as_tensor(mask)[0].bool()]
        pixels = inputs.get("pixel_values")
        flags = inputs.get("image_flags")
        if pixels is not None and flags is not None:
            keep = torch.as_tensor(flags).reshape(-1).bool()
            pixels = pixels[keep] if not bool(keep.all()) else pixels
        if pixels is not None and pixels.shape[0] == 0:
            pixels = None
        return cls(input_ids=ids, pixel_values=pixels, generation=GenerationConfig.from_any(generation), **kw)


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepEvent:
    """What one step produced for one sequence: a text delta and, on its last step, the finish reason."""

    request_id: str
    token_id: int
    delta: str
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None  # set on the last event of a sequence


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt_len: int
    stream: TextStream
    stop_ids: frozenset[int]
    max_new: int
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.generated)

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.request.request_id,
            text=self.stream.text,
            token_ids=list(self.generated),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_len,
        )


@dataclass
class DecodeBatch:
    """Running state of the rows decoded together: cache, mask [B, L], last tokens [B, 1], sampler."""

    seqs: list[_Sequence]
    cache: Any
    attention_mask: torch.Tensor
    last_tokens: torch.Tensor
    sampler: Sampler

    def __len__(self) -> int:
        return len(self.seqs)


class Engine:
    """Generation for one model + processor (or tokenizer). Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        max_batch_size: int = 16,
        vision_chunk: int = 64,
        keep_tokens: Sequence[str] = GROUNDING_TOKENS,
        prefix_cache: bool = True,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_batch_size = max_batch_size
        self.vision_chunk = vision_chunk
        self.config = model.config
        # the KV cache follows the LLM's dtype, pixels the vision stem's (they may differ, e.g. fp16 ViT + bf16 LLM)
        param = next(getattr(model, "language_model", model).parameters())
        self.device, self.dtype = param.device, param.dtype
        vision = getattr(model, "vision_model", None)
        self.vision_dtype = next(vision.parameters()).dtype if vision is not None else self.dtype
        self.max_context = int(self.config.text.max_position_embeddings)
        self.default_stop_ids = frozenset(self._default_stop_ids())
        self.image_token_id = int(self.config.image_token_id)
        # special tokens are hidden from the text, except the grounding tags (kept, like the official demo)
        self.skip_ids = special_ids(self.tokenizer, keep_tokens)
        self.prefix_cache = prefix_cache
        self._prefix: torch.Tensor | None = None  # token ids of the shared prompt prefix (on CPU)
        self._prefix_kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._prefix_probed = False

    # ------------------------------------------------------------------ setup helpers

    def _default_stop_ids(self) -> list[int]:
        """The template's stop words when a Processor is given; else the usual chat end tokens + eos."""
        template_ids = getattr(self.processor, "stop_token_ids", None)
        if template_ids:
            return [int(i) for i in template_ids]
        ids: list[int] = []
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        for tok in DEFAULT_STOP_TOKENS:
            if tok in vocab:
                ids.append(int(vocab[tok]))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
        if self.config.text.eos_token_id is not None and not ids:
            ids.append(int(self.config.text.eos_token_id))
        return ids

    def _new_sequence(self, request: GenerationRequest) -> tuple[_Sequence, torch.Tensor]:
        cfg = request.generation
        ids = torch.as_tensor(request.input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise GenerationError(f"request {request.request_id}: empty prompt")
        room = self.max_context - ids.numel()
        if room < 1:
            raise GenerationError(
                f"request {request.request_id}: prompt of {ids.numel()} tokens leaves no room in the "
                f"{self.max_context}-token context"
            )
        stop_ids = frozenset(cfg.stop_token_ids) if cfg.stop_token_ids is not None else self.default_stop_ids
        seq = _Sequence(
            request=request,
            prompt_len=ids.numel(),
            stream=TextStream(self.tokenizer, cfg.stop or (), skip_ids=self.skip_ids),
            stop_ids=stop_ids,
            max_new=min(cfg.max_new_tokens, room),
        )
        return seq, ids

    def _image_features(
        self, requests: Sequence[GenerationRequest], ids: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        """Run the vision encoder once over all tiles of the new requests (in batch order)."""
        feats: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            if pending:
                pixels = torch.cat(pending).to(device=self.device, dtype=self.vision_dtype)
                for chunk in pixels.split(self.vision_chunk):
                    feats.append(self.model.encode_images(chunk))
                pending.clear()

        for req, tokens in zip(requests, ids, strict=True):
            n_img_tokens = int((tokens == self.image_token_id).sum())
            if req.image_features is not None:
                flush()
                feats.append(req.image_features.to(device=self.device, dtype=self.dtype))
                have = req.image_features.numel() // req.image_features.shape[-1]  # [N, T, H] or [N·T, H]
            elif req.pixel_values is not None:
                pending.append(req.pixel_values)
                have = req.pixel_values.shape[0] * self.config.num_image_token
            else:
                have = 0
            if have != n_img_tokens:
                raise ModelInputError(
                    f"request {req.request_id}: {n_img_tokens} image tokens in the prompt but the images give {have}"
                )
        flush()
        return torch.cat(feats) if feats else None

    # ------------------------------------------------------------------ shared prompt prefix

    def _probe_prefix(self) -> None:
        """Find the template's fixed prompt start: the common token prefix of two dummy chat prompts."""
        self._prefix_probed = True
        if not self.prefix_cache or not callable(self.processor) or self.processor is self.tokenizer:
            return
        try:
            a = self.processor("a")["input_ids"][0].tolist()
            b = self.processor("b")["input_ids"][0].tolist()
        except Exception:  # not a chat processor: nothing to share
            return
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n >= 4 and self.image_token_id not in a[:n]:
            self._prefix = torch.tensor(a[:n], dtype=torch.long)

    @property
    def shared_prefix_length(self) -> int:
        """Tokens of the template prefix whose KV is reused across requests (0 until found or when disabled)."""
        return 0 if self._prefix is None else self._prefix.numel()

    @torch.inference_mode()
    def _shared_prefix(self, ids: Sequence[torch.Tensor]) -> int:
        """Length of the cached prefix every prompt starts with (0 when they do not all share it)."""
        if not self._prefix_probed:
            self._probe_prefix()
        prefix = self._prefix
        if prefix is None:
            return 0
        n = prefix.numel()
        if not all(t.numel() > n and torch.equal(t[:n], prefix) for t in ids):
            return 0
        if self._prefix_kv is None:
            cache = self._allocate(1, n)
            self.model(prefix[None].to(self.device), cache=cache, logits_to_keep=1)
            self._prefix_kv = (cache.keys, cache.values)
        return n

    # ------------------------------------------------------------------ batch life cycle

    @torch.inference_mode()
    def prefill(self, requests: Sequence[GenerationRequest]) -> tuple[DecodeBatch, list[StepEvent]]:
        """Encode images, run the prompts (left-padded) through the model, and pick each first token."""
        if not requests:
            raise GenerationError("prefill needs at least one request")
        seqs, ids = zip(*(self._new_sequence(r) for r in requests), strict=True)
        features = self._image_features(requests, ids)
        shared = self._shared_prefix(ids)
        rest = [t[shared:] for t in ids]
        longest = max(t.numel() for t in rest)
        pad_id = self._pad_id()
        input_ids = torch.full((len(rest), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rest), longest), dtype=torch.long)
        for i, t in enumerate(rest):
            input_ids[i, longest - t.numel() :] = t
            mask[i, longest - t.numel() :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        capacity = shared + longest + max(s.max_new for s in seqs)
        cache = self._allocate(len(rest), capacity)
        positions = _positions(mask) + shared
        if shared:  # rows: [shared prefix][padding][rest]; the mask and positions make the gap invisible
            keys, values = self._prefix_kv
            for dst, src in zip([*cache.keys, *cache.values], [*keys, *values], strict=True):
                dst[:, :, :shared] = src
            cache.length = shared
            mask = torch.cat([torch.ones((len(rest), shared), dtype=mask.dtype, device=self.device), mask], dim=1)
        logits = self.model(
            input_ids,
            image_features=features,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        ).logits[:, -1]
        sampler = Sampler([s.request.generation.row_sampling() for s in seqs], logits.shape[-1], self.device)
        batch = DecodeBatch(list(seqs), cache, mask, torch.empty(0), sampler)
        return batch, self._advance(batch, logits)

    @torch.inference_mode()
    def step(self, batch: DecodeBatch) -> list[StepEvent]:
        """Feed every row its last token; return this step's events (finished rows are removed)."""
        if not len(batch):
            return []
        ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        positions = batch.attention_mask.sum(dim=1, keepdim=True) - 1
        logits = self.model(
            batch.last_tokens,
            attention_mask=batch.attention_mask,
            position_ids=positions,
            cache=batch.cache,
        ).logits[:, -1]
        return self._advance(batch, logits)

    def _advance(self, batch: DecodeBatch, logits: torch.Tensor) -> list[StepEvent]:
        # <IMG_CONTEXT> marks image slots: generated, it would demand image features on the next step
        logits[:, self.image_token_id] = float("-inf")
        tokens = batch.sampler(logits)
        batch.last_tokens = tokens.unsqueeze(-1)
        events: list[StepEvent] = []
        keep: list[int] = []
        for i, (seq, tok) in enumerate(zip(batch.seqs, tokens.tolist(), strict=True)):
            seq.generated.append(tok)
            delta = ""
            if seq.cancelled:
                seq.finish_reason = "cancelled"
            elif tok in seq.stop_ids:
                seq.finish_reason = "stop"
            else:
                delta = seq.stream.push(tok)
                if seq.stream.stopped:
                    seq.finish_reason = "stop"
                elif seq.remaining <= 0:
                    seq.finish_reason = "length"
            result = None
            if seq.finish_reason is not None:
                delta += seq.stream.finish()
                result = seq.result()
            else:
                keep.append(i)
            events.append(StepEvent(seq.request.request_id, tok, delta, seq.finish_reason, result))
        if len(keep) < len(batch):
            self._keep(batch, keep)
        return events

    def _keep(self, batch: DecodeBatch, keep: list[int]) -> None:
        batch.seqs = [batch.seqs[i] for i in keep]
        if not keep:
            batch.cache = None
            batch.attention_mask = batch.attention_mask[:0]
            batch.last_tokens = batch.last_tokens[:0]
            batch.sampler.keep_rows([])
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        batch.cache.keep_rows(rows)
        batch.attention_mask = batch.attention_mask.index_select(0, rows)
        batch.last_tokens = batch.last_tokens.index_select(0, rows)
        batch.sampler.keep_rows(keep)
        # columns that are padding for every remaining row carry no information: drop them
        lead = int((batch.attention_mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if lead:
            cache = batch.cache
            cache.keys = [k[:, :, lead:] for k in cache.keys]
            cache.values = [v[:, :, lead:] for v in cache.values]
            cache.length -= lead
            batch.attention_mask = batch.attention_mask[:, lead:]

    def join(self, batch: DecodeBatch, requests: Sequence[GenerationRequest]) -> list[StepEvent]:
        """Prefill ``requests`` and merge them into the running ``batch`` (continuous batching)."""
        new, events = self.prefill(requests)
        if not len(new):
            return events
        if not len(batch):
            batch.seqs, batch.cache, batch.attention_mask = new.seqs, new.cache, new.attention_mask
            batch.last_tokens, batch.sampler = new.last_tokens, new.sampler
            return events
        self._merge_into(batch, new)
        return events

    @torch.inference_mode()
    def _merge_into(self, batch: DecodeBatch, new: DecodeBatch) -> None:
        la, lb = batch.cache.length, new.cache.length
        length = max(la, lb)
        capacity = length + max(s.remaining for s in [*batch.seqs, *new.seqs])
        na, nb = len(batch), len(new)
        merged = self._allocate(na + nb, capacity)
        for dst, a, b in zip(
            [*merged.keys, *merged.values],
            [*batch.cache.keys, *batch.cache.values],
            [*new.cache.keys, *new.cache.values],
            strict=True,
        ):
            dst[:na, :, length - la : length] = a[:, :, :la]
            dst[na:, :, length - lb : length] = b[:, :, :lb]
        merged.length = length
        mask = torch.zeros((na + nb, length), dtype=batch.attention_mask.dtype, device=self.device)
        mask[:na, length - la :] = batch.attention_mask
        mask[na:, length - lb :] = new.attention_mask
        batch.seqs.extend(new.seqs)
        batch.cache = merged
        batch.attention_mask = mask
        batch.last_tokens = torch.cat([batch.last_tokens, new.last_tokens])
        _merge_samplers(batch.sampler, new.sampler)

    def cancel(self, batch: DecodeBatch, request_id: str) -> None:
        """Mark a request as cancelled; it leaves the batch at the next step."""
        for seq in batch.seqs:
            if seq.request.request_id == request_id:
                seq.cancelled = True

    def _allocate(self, batch_size: int, capacity: int) -> Any:
        from ivl.models.cache import KVCache

        return KVCache.allocate(self.config.text, batch_size, capacity, dtype=self.dtype, device=self.device)

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.config.text.pad_token_id
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------------ user-facing loops

    def run(
        self,
        requests: Iterable[GenerationRequest],
        on_event: Callable[[StepEvent], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for all requests, at most ``max_batch_size`` rows at a time, admitting new ones as rows finish."""
        queue = list(requests)
        order = [r.request_id for r in queue]
        done: dict[str, GenerationResult] = {}
        batch: DecodeBatch | None = None
        while queue or (batch is not None and len(batch)):
            running = len(batch) if batch is not None else 0
            free = self.max_batch_size - running
            if queue and free > 0:
                admitted, queue = queue[:free], queue[free:]
                if batch is None:
                    batch, events = self.prefill(admitted)
                else:
                    events = self.join(batch, admitted)
            else:
                events = self.step(batch)
            for ev in events:
                if on_event is not None:
                    on_event(ev)
                if ev.result is not None:
                    done[ev.request_id] = ev.result
        return [done[rid] for rid in order]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request; results come back in request order."""
        return self.run(requests)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text deltas of one request as they are produced (never half a character, never a stop string)."""
        batch, events = self.prefill([request])
        while True:
            for ev in events:
                if ev.delta:
                    yield ev.delta
                if ev.finish_reason is not None:
                    return
            events = self.step(batch)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: real tokens count 0, 1, 2...; padding gets 0."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _merge_samplers(dst: Sampler, src: Sampler) -> None:
    counts_dst, counts_src = dst.counts, src.counts
    n_dst = len(dst)
    dst.rows.extend(src.rows)
    dst.generators.extend(src.generators)
    if counts_dst is not None or counts_src is not None:
        v = dst.vocab_size
        a = counts_dst if counts_dst is not None else torch.zeros(n_dst, v, dtype=torch.int32, device=dst.device)
        b = counts_src if counts_src is not None else torch.zeros(len(src), v, dtype=torch.int32, device=dst.device)
        dst.counts = torch.cat([a, b])
    dst._refresh()
