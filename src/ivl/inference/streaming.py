"""Token ids → text deltas, safely: never half a UTF-8 character, never the start of a stop string.

Byte-level BPE tokenizers split multi-byte characters (CJK, emoji) across tokens; decoding a prefix then
yields U+FFFD. We decode a small window of recent tokens and emit only once the window's text no longer
ends in U+FFFD (the approach of text-generation-inference). Stop strings are matched on the accumulated
text; a tail that could still grow into a stop string is held back until it is resolved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ivl.errors import GenerationError

_REPLACEMENT = "\ufffd"


#: Special tokens worth showing: grounding answers are unusable without them (spec §5.4).
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")


def special_ids(tokenizer: Any, keep: Iterable[str] = ()) -> frozenset[int]:
    """Ids of every special token (named or added as special) except those in ``keep``."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    keep_set = set(keep)
    kept = {int(i) for i, tok in added.items() if str(getattr(tok, "content", tok)) in keep_set}
    return frozenset(ids - kept)


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the newly completed text (possibly "").

    ``skip_ids``: drop exactly these ids before decoding (lets grounding tags survive while other special
    tokens are removed); when ``None``, ``skip_special_tokens`` is passed to the tokenizer as usual.
    """

    def __init__(
        self, tokenizer: Any, *, skip_special_tokens: bool = True, skip_ids: frozenset[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        if self.skip_ids is not None:
            return self.tokenizer.decode([i for i in ids if i not in self.skip_ids], skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return text that is now final."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still pending (a dangling partial character decodes to U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        if len(full) > len(prefix):
            return full[len(prefix) :].rstrip(_REPLACEMENT)
        return ""


class StopStringMatcher:
    """Accumulates text, detects the earliest stop string, and holds back possible stop-string prefixes."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = [s for s in stops]
        for s in self.stops:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
        self.text = ""  # everything accepted so far (already cut at a stop string once stopped)
        self._emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return the part that is safe to show now."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            self.text += delta
            self._emitted = len(self.text)
            return delta
        start = max(0, len(self.text) - max(len(s) for s in self.stops) + 1)
        self.text += delta
        cut = self._find_stop(start)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """End of generation: release the held-back tail (it never became a stop string)."""
        return self._release(len(self.text))

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out


class TextStream:
    """Detokenizer + stop-string matcher for one sequence: ``push(token) -> delta``; ``stopped`` when a stop hit."""

    def __init__(
        self,
        tokenizer: Any,
        stops: Iterable[str] = (),
        *,
        skip_special_tokens: bool = True,
        skip_ids: frozenset[int] | None = None,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens, skip_ids=skip_ids)
        self.matcher = StopStringMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def text(self) -> str:
        return self.matcher.text

    def push(self, token_id: int) -> str:
        return self.matcher.push(self.detok.push(token_id))

    def finish(self) -> str:
        """Flush pending bytes and held-back text at the end of the sequence."""
        if self.matcher.stopped:
            return ""
        out = self.matcher.push(self.detok.flush())
        return out + self.matcher.flush()
