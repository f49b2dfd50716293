"""`TokenCache`: token ids of text pieces, remembered between samples.

A training set repeats the same pieces over and over (the chat frame, the system message, role headers,
templated questions and closed-set answers), and every epoch repeats them all again. The processor tokenises
each piece on its own (pieces never merge across an image or a turn boundary), so remembering a piece's ids
gives exactly the ids the tokenizer would: only the repeated calls into the tokenizer are saved.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

DEFAULT_MAX_ENTRIES = 1 << 16
#: longer pieces (a user's long message) rarely repeat: they are tokenised every time and never held
DEFAULT_MAX_PIECE_CHARS = 512


class TokenCache:
    """``encode(pieces)`` → one id list per piece, as ``tokenizer(pieces, add_special_tokens=False)`` gives.

    Holds at most ``max_entries`` pieces (0: none, every call tokenises) of at most ``max_piece_chars``
    characters each, so its memory stays bounded in a server that sees long unique prompts. It forgets
    everything when it would exceed ``max_entries`` (a corpus of unique texts then costs one extra dict lookup
    per piece) and when the tokenizer's vocabulary size changes (tokens added after the processor was made
    would change how a remembered piece splits). Safe to share between threads (the server encodes
    requests concurrently).
    """

    def __init__(
        self, tokenizer: Any, max_entries: int = DEFAULT_MAX_ENTRIES, max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 (0: remember nothing), got {max_entries}")
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_piece_chars = max_piece_chars
        self._ids: dict[str, tuple[int, ...]] = {}
        self._vocab_size = self._current_vocab_size()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # locks do not pickle (a spawned DataLoader worker gets its own)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def encode(self, pieces: Sequence[str]) -> list[list[int]]:
        with self._lock:
            return self._encode(pieces)

    def _encode(self, pieces: Sequence[str]) -> list[list[int]]:
        vocab_size = self._current_vocab_size()
        if vocab_size != self._vocab_size:
            self._ids.clear()
            self._vocab_size = vocab_size
        missing = [piece for piece in dict.fromkeys(pieces) if piece not in self._ids]
        fresh: dict[str, tuple[int, ...]] = {}
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            fresh = dict(zip(missing, map(tuple, encoded), strict=True))
        result = [list(fresh[piece] if piece in fresh else self._ids[piece]) for piece in pieces]
        keep = [(piece, ids) for piece, ids in fresh.items() if len(piece) <= self.max_piece_chars]
        if keep:
            if len(self._ids) + len(keep) > self.max_entries:
                self._ids.clear()
            self._ids.update(keep[: self.max_entries])
        self.misses += len(missing)
        self.hits += len(pieces) - len(missing)
        return result

    def _current_vocab_size(self) -> int | None:
        try:
            return len(self.tokenizer)
        except TypeError:  # a tokenizer without __len__: nothing to watch
            return None
