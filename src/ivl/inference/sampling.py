"""Next-token selection for a batch whose rows carry their own sampling parameters.

Every row of a decode batch may belong to a different request (different temperature, top-p, seed...), so
each knob is a per-row tensor rather than a scalar. Semantics follow transformers' logits processors
(repetition penalty → temperature → top-k → top-p), which the tests use as the reference.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ivl.errors import GenerationError


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters of one sequence; ``temperature == 0`` or ``do_sample=False`` means greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty: divide positive, multiply negative logits of tokens already produced.

    ``seen`` is a bool [B, V] mask of produced tokens, ``penalty`` a [B] tensor (1.0 = off).
    """
    p = penalty.to(logits.dtype).unsqueeze(-1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI-style additive penalties: ``logit -= frequency·count + presence·[count > 0]``."""
    counts = counts.to(logits.dtype)
    return (
        logits
        - frequency.to(logits.dtype).unsqueeze(-1) * counts
        - presence.to(logits.dtype).unsqueeze(-1) * (counts > 0).to(logits.dtype)
    )


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the tokens whose logit is at least the k-th largest (k = 0 keeps everything)."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    active = k > 0
    if not bool(active.any()):
        return logits
    kmax = int(k.max())
    top_values = torch.topk(logits, kmax, dim=-1).values
    kth = top_values.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))
    remove = (logits < kth) & active.unsqueeze(-1)
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability stays ≤ 1 - p (p = 1 keeps all)."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1.0 - top_p.to(cumulative.dtype)).unsqueeze(-1)
    remove_sorted[..., -1] = False  # the most likely token always survives
    remove_sorted &= active.unsqueeze(-1)
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


class Sampler:
    """Picks next tokens for a batch; rows can be dropped (finished) and added (joined) between steps.

    Each row owns a torch.Generator, so a seeded request produces the same tokens whichever batch it shares.
    Penalty state (token counts over *generated* tokens, as the official ``chat`` does since it passes only
    embeddings to ``generate``) is kept only when some row needs it.
    """

    def __init__(self, rows: Sequence[RowSampling], vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.rows: list[RowSampling] = []
        self.generators: list[torch.Generator | None] = []
        self.counts: torch.Tensor | None = None
        self._params: dict[str, torch.Tensor] = {}
        self.extend(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def extend(self, rows: Sequence[RowSampling]) -> None:
        """Append rows for newly admitted sequences."""
        rows = list(rows)
        self.rows.extend(rows)
        self.generators.extend(None if r.greedy else _new_generator(r.seed, self.device) for r in rows)
        if self.counts is not None or any(r.penalised for r in rows):
            extra = torch.zeros(len(rows), self.vocab_size, dtype=torch.int32, device=self.device)
            if self.counts is None:
                old = torch.zeros(len(self.rows) - len(rows), self.vocab_size, dtype=torch.int32, device=self.device)
                self.counts = torch.cat([old, extra])
            else:
                self.counts = torch.cat([self.counts, extra])
        self._refresh()

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Drop every row not listed in ``keep`` (indices into the current batch, in order)."""
        keep = list(keep)
        self.rows = [self.rows[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if self.counts is not None:
            self.counts = self.counts[torch.tensor(keep, dtype=torch.long, device=self.device)]
        self._refresh()

    def _refresh(self) -> None:
        def t(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        rows = self.rows
        self._params = {
            "temperature": t([r.temperature if not r.greedy else 1.0 for r in rows], torch.float32),
            "top_k": t([r.top_k for r in rows], torch.long),
            "top_p": t([r.top_p for r in rows], torch.float32),
            "repetition": t([r.repetition_penalty for r in rows], torch.float32),
            "presence": t([r.presence_penalty for r in rows], torch.float32),
            "frequency": t([r.frequency_penalty for r in rows], torch.float32),
        }
        self._all_greedy = all(r.greedy for r in rows)
        self._any_penalty = any(r.penalised for r in rows)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalties and warpers to [B, V] logits (float32 copy); returns the filtered logits."""
        if logits.shape[0] != len(self.rows):
            raise GenerationError(f"sampler has {len(self.rows)} rows but got logits for {logits.shape[0]}")
        x = logits.float()
        p = self._params
        if self._any_penalty and self.counts is not None:
            x = apply_repetition_penalty(x, self.counts > 0, p["repetition"])
            x = apply_presence_frequency(x, self.counts, p["presence"], p["frequency"])
        if not self._all_greedy:
            x = x / p["temperature"].unsqueeze(-1)
            x = apply_top_k(x, p["top_k"])
            x = apply_top_p(x, p["top_p"])
        return x

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the next token of every row as a [B] long tensor and record it for penalties."""
        x = self.process(logits)
        tokens = x.argmax(dim=-1)
        if not self._all_greedy:
            probs = x.softmax(dim=-1)
            for i, gen in enumerate(self.generators):
                if gen is None:
                    continue
                # exponential-race sampling == multinomial, but with the row's own generator
                noise = torch.empty_like(probs[i]).exponential_(generator=gen)
                tokens[i] = (probs[i] / noise).argmax()
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens.unsqueeze(-1), torch.ones_like(tokens, dtype=torch.int32).unsqueeze(-1))
        return tokens


def row_sampling_checks(row: RowSampling) -> None:
    """Raise GenerationError naming the first invalid knob."""
    if row.temperature < 0 or row.temperature != row.temperature:
        raise GenerationError(f"temperature must be >= 0, got {row.temperature}")
    if not 0.0 < row.top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {row.top_p}")
    if row.top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), got {row.top_k}")
    if row.repetition_penalty <= 0:
        raise GenerationError(f"repetition_penalty must be > 0, got {row.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(row, name)
        if not -2.0 <= value <= 2.0:
            raise GenerationError(f"{name} must be in [-2, 2], got {value}")
    if row.seed is not None and row.seed < 0:
        raise GenerationError(f"seed must be a non-negative integer, got {row.seed}")
