"""Static, preallocated key/value cache: one ``[B, Hkv, max_length, d]`` pair per decoder layer.

All rows share one ``length``; left padding is expressed by the attention mask, not by per-row lengths.
"""

from __future__ import annotations

import torch

from ivl.config import TextConfig
from ivl.errors import ModelInputError


class KVCache:
    """Keys/values written in place at ``[length, length + t)``; the decoder calls ``advance`` once per forward."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        self.length = 0

    @classmethod
    def allocate(
        cls,
        text_config: TextConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> KVCache:
        if batch_size < 1 or max_length < 1:
            raise ModelInputError(f"KV cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        shape = (batch_size, text_config.num_key_value_heads, max_length, text_config.resolved_head_dim)
        layers = text_config.num_hidden_layers
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        return cls(keys, values)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def check_room(self, new_tokens: int) -> None:
        """Fail early (before any layer writes) when ``new_tokens`` would not fit."""
        if self.length + new_tokens > self.max_length:
            raise ModelInputError(
                f"KV cache overflow: {self.length} stored + {new_tokens} new tokens > max_length {self.max_length}"
            )

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, Hkv, t, d]`` after the current ``length``; return views of everything stored."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_length:
            self.check_room(t)
        key_buf, value_buf = self.keys[layer_idx], self.values[layer_idx]
        if k.shape[0] != key_buf.shape[0]:
            raise ModelInputError(f"KV cache holds {key_buf.shape[0]} rows but the input has {k.shape[0]}")
        key_buf[:, :, self.length : end] = k
        value_buf[:, :, self.length : end] = v
        return key_buf[:, :, :end], value_buf[:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. drop finished sequences); ``length`` is unchanged."""
        rows = torch.as_tensor(rows, device=self.keys[0].device, dtype=torch.long).reshape(-1)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def crop(self, length: int) -> None:
        """Forget everything after ``length`` tokens (stale data beyond it is overwritten later)."""
        if not 0 <= length <= self.length:
            raise ModelInputError(f"cannot crop a KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
