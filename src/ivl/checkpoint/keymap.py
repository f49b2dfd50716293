"""Parameter-name maps between our model, the official ``internvl_chat`` layout and transformers' ``internvl``.

A :class:`KeyMap` is a list of rules (rename, split one tensor into several, merge several into one, drop).
It converts whole state dicts, and also streams key by key (:meth:`KeyMap.stream`) so that a loader can map
shard by shard and never hold a checkpoint twice; merges whose parts sit in different shards are buffered
until their last part arrives. Rules only reshape and slice, so they work on ``meta`` tensors too, which
lets the loader check names and shapes from safetensors headers before reading any data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ivl.checkpoint.layouts import Layout
from ivl.config import InternVLConfig
from ivl.errors import CheckpointError

Tensor = torch.Tensor
SplitFn = Callable[[str, Tensor], list[Tensor]]
MergeFn = Callable[[str, list[Tensor]], Tensor]

_LLM = r"language_model\.model\.layers\.(?P<l>\d+)\."
_VIT = r"vision_model\.encoder\.layers\.(?P<l>\d+)\."
_HF_VIT = r"model\.vision_tower\.encoder\.layer\.(?P<l>\d+)\."
#: Rotary caches some official LLM code saves; they are recomputed, never loaded.
_ROTARY_BUFFERS = r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)$"


# ---------------------------------------------------------------------------------------------------------
# tensor surgery


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy: split pieces must not share storage (safetensors refuses shared tensors)."""
    return t.clone(memory_format=torch.contiguous_format)


def _meta_like(like: Tensor, *shape: int) -> Tensor:
    """A meta tensor of ``shape``: planning from headers uses only factories, because meta *ops* run Python
    reference kernels whose first use imports torch._dynamo (seconds, hundreds of MB)."""
    return torch.empty(shape, dtype=like.dtype, device="meta")


def split_wqkv(w: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, key: str = "wqkv") -> list[Tensor]:
    """InternLM2 packed ``wqkv`` -> ``[q, k, v]``.

    Rows are kv-group major: each of the ``num_kv_heads`` groups holds ``g = num_heads / num_kv_heads`` query
    heads, then one key head, then one value head, each ``head_dim`` rows (spec §3.3). Works for weights
    ``[rows, hidden]`` and biases ``[rows]``.
    """
    g = num_heads // num_kv_heads
    rows = num_kv_heads * (g + 2) * head_dim
    if w.shape[0] != rows:
        raise CheckpointError(
            f"{key}: expected {rows} rows (kv_heads {num_kv_heads} x (g {g} + 2) x head_dim {head_dim}), "
            f"found shape {tuple(w.shape)}"
        )
    rest = tuple(w.shape[1:])
    if w.is_meta:
        kv_rows = num_kv_heads * head_dim
        return [
            _meta_like(w, num_heads * head_dim, *rest),
            _meta_like(w, kv_rows, *rest),
            _meta_like(w, kv_rows, *rest),
        ]
    grouped = w.reshape(num_kv_heads, g + 2, head_dim, *rest)
    q = grouped[:, :g].reshape(num_heads * head_dim, *rest)
    k = grouped[:, g].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, g + 1].reshape(num_kv_heads * head_dim, *rest)
    return [_copy(q), _copy(k), _copy(v)]


def merge_wqkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """Inverse of :func:`split_wqkv`: interleave back to ``[kv group, (g queries, k, v), head_dim, ...]``."""
    g = num_heads // num_kv_heads
    rest = tuple(q.shape[1:])
    expected = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != expected[name] or tuple(t.shape[1:]) != rest:
            raise CheckpointError(
                f"{name}_proj has shape {tuple(t.shape)}, expected ({expected[name]}, {', '.join(map(str, rest))})"
            )
    if q.is_meta:
        return _meta_like(q, num_kv_heads * (g + 2) * head_dim, *rest)
    parts = [
        q.reshape(num_kv_heads, g, head_dim, *rest),
        k.reshape(num_kv_heads, 1, head_dim, *rest),
        v.reshape(num_kv_heads, 1, head_dim, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(num_kv_heads * (g + 2) * head_dim, *rest)


def split_thirds(w: Tensor, key: str = "qkv") -> list[Tensor]:
    """InternViT fused ``qkv`` rows ``[q | k | v]`` -> three equal blocks."""
    if w.shape[0] % 3:
        raise CheckpointError(f"{key}: first dimension {w.shape[0]} of shape {tuple(w.shape)} is not divisible by 3")
    if w.is_meta:
        return [_meta_like(w, w.shape[0] // 3, *w.shape[1:]) for _ in range(3)]
    return [_copy(part) for part in torch.chunk(w, 3, dim=0)]


def merge_thirds(parts: list[Tensor], key: str = "qkv") -> Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise CheckpointError(f"{key}: q/k/v parts have different shapes {sorted(shapes)}")
    if parts[0].is_meta:
        return _meta_like(parts[0], 3 * parts[0].shape[0], *parts[0].shape[1:])
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class Rename:
    """One key to one key; ``dst`` is a ``re`` replacement template (``\\g<l>``)."""

    src: str
    dst: str


@dataclass(frozen=True)
class Split:
    """One key to several; ``fn(src_key, tensor)`` returns the pieces in ``dst`` order."""

    src: str
    dst: tuple[str, ...]
    fn: SplitFn


@dataclass(frozen=True)
class Merge:
    """Several keys (``parts``, in order) to one; all parts must produce the same destination name."""

    parts: tuple[str, ...]
    dst: str
    fn: MergeFn


@dataclass(frozen=True)
class Drop:
    """Keys that are deliberately ignored (rotary caches)."""

    src: str


Rule = Rename | Split | Merge | Drop


@dataclass
class KeyStream:
    """Push ``(key, tensor)`` pairs, receive mapped pairs; remembers partial merges and unmatched keys."""

    keymap: KeyMap
    pending: dict[str, list[Tensor | None]] = field(default_factory=dict)
    pending_sources: dict[str, list[str | None]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def push(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        match = self.keymap.match(key)
        if match is None:
            self.unmatched.append(key)
            return []
        rule, m, slot = match
        if isinstance(rule, Drop):
            self.dropped.append(key)
            return []
        if isinstance(rule, Rename):
            return [(_expand(rule.dst, m), tensor)]
        if isinstance(rule, Split):
            pieces = rule.fn(key, tensor)
            return [(_expand(dst, m), piece) for dst, piece in zip(rule.dst, pieces, strict=True)]
        dst = _expand(rule.dst, m)
        parts = self.pending.setdefault(dst, [None] * len(rule.parts))
        sources = self.pending_sources.setdefault(dst, [None] * len(rule.parts))
        if parts[slot] is not None:
            raise CheckpointError(f"duplicate tensor {key!r} for {dst!r}")
        parts[slot], sources[slot] = tensor, key
        if any(p is None for p in parts):
            return []
        del self.pending[dst], self.pending_sources[dst]
        return [(dst, rule.fn(dst, [p for p in parts if p is not None]))]

    def incomplete(self) -> dict[str, list[str]]:
        """Destination keys still waiting for parts -> the source keys that did arrive."""
        return {dst: [s for s in srcs if s is not None] for dst, srcs in self.pending_sources.items()}

    def finish(self) -> None:
        """Raise if a merge never completed (a q/k/v part is missing from the checkpoint)."""
        if self.pending:
            items = [f"{dst} (have {', '.join(srcs)})" for dst, srcs in sorted(self.incomplete().items())]
            raise CheckpointError(f"incomplete tensor groups, parts missing: {truncated(items)}")


_GROUP = re.compile(r"\\g<(\w+)>")


def _expand(template: str, match: re.Match[str]) -> str:
    """``re.Match.expand`` for templates that only use ``\\g<name>`` (re-parsing templates is slow)."""
    parts = _TEMPLATES.get(template)
    if parts is None:
        parts = _TEMPLATES[template] = _GROUP.split(template)
    groups = match.groupdict()
    return "".join(groups[p] if i % 2 else p for i, p in enumerate(parts))


_TEMPLATES: dict[str, list[str]] = {}


class KeyMap:
    """An ordered rule list; the first rule whose pattern fully matches a key wins."""

    def __init__(self, rules: Iterable[Rule], normalize: Callable[[str], str] | None = None) -> None:
        self.rules = list(rules)
        self.normalize = normalize
        self._index: list[tuple[re.Pattern[str], Rule, int]] = []
        for rule in self.rules:
            patterns = rule.parts if isinstance(rule, Merge) else (rule.src,)
            self._index.extend((re.compile(p), rule, slot) for slot, p in enumerate(patterns))

    def match(self, key: str) -> tuple[Rule, re.Match[str], int] | None:
        """The first rule claiming ``key``, its match, and (for merges) which part the key is."""
        name = self.normalize(key) if self.normalize else key
        for pattern, rule, slot in self._index:
            m = pattern.fullmatch(name)
            if m is not None:
                return rule, m, slot
        return None

    def stream(self) -> KeyStream:
        return KeyStream(self)

    def convert(self, state: Mapping[str, Tensor], *, strict: bool = True) -> dict[str, Tensor]:
        """Map a whole state dict; ``strict`` raises on keys no rule claims and on incomplete merges."""
        stream = self.stream()
        out: dict[str, Tensor] = {}
        for key, tensor in state.items():
            for name, value in stream.push(key, tensor):
                if name in out:
                    raise CheckpointError(f"two source tensors map to {name!r}")
                out[name] = value
        if strict:
            if stream.unmatched:
                raise CheckpointError(f"no mapping for keys: {truncated(stream.unmatched)}")
            stream.finish()
        return out

    def map_stream(self, items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """Lazy mapping of an iterable of pairs (e.g. a shard reader); raises at the end if a merge is partial."""
        stream = self.stream()
        for key, tensor in items:
            yield from stream.push(key, tensor)
        stream.finish()


def truncated(items: list[str], limit: int = 12) -> str:
    """A readable list of names for error messages: the first ``limit`` and a count of the rest."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more, {len(items)} in all)"


# ---------------------------------------------------------------------------------------------------------
# official <-> ours


def _llm_heads(config: InternVLConfig) -> tuple[int, int, int]:
    text = config.text
    return text.num_attention_heads, text.num_key_value_heads, text.resolved_head_dim


_INTERNLM2_RENAMES = (
    # (official suffix inside a decoder layer, our suffix)
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention.wo.bias", "self_attn.o_proj.bias"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward_ve.w1.weight", "mlp_visual.gate_proj.weight"),
    ("feed_forward_ve.w3.weight", "mlp_visual.up_proj.weight"),
    ("feed_forward_ve.w2.weight", "mlp_visual.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_INTERNLM2_TOP = (
    ("language_model.model.tok_embeddings.weight", "language_model.model.embed_tokens.weight"),
    ("language_model.output.weight", "language_model.lm_head.weight"),
)


def _identity(prefixes: Iterable[str]) -> list[Rule]:
    return [Rename(rf"(?P<k>{re.escape(p)}.+)", r"\g<k>") for p in prefixes]


def official_to_ours_map(config: InternVLConfig) -> KeyMap:
    """Official ``internvl_chat`` names -> ours (identity except for InternLM2's names and packed ``wqkv``)."""
    rules: list[Rule] = [Drop(_ROTARY_BUFFERS)]
    if config.text.flavour == "internlm2":
        heads, kv, hd = _llm_heads(config)
        for kind in ("weight", "bias"):
            rules.append(
                Split(
                    rf"{_LLM}attention\.wqkv\.{kind}",
                    tuple(rf"language_model.model.layers.\g<l>.self_attn.{p}_proj.{kind}" for p in "qkv"),
                    lambda key, t: split_wqkv(t, heads, kv, hd, key),
                )
            )
        for official, ours in _INTERNLM2_RENAMES:
            rules.append(Rename(_LLM + re.escape(official), rf"language_model.model.layers.\g<l>.{ours}"))
        rules += [Rename(re.escape(a), b) for a, b in _INTERNLM2_TOP]
        rules += _identity(["language_model.model.norm."])
    else:
        rules += _identity(["language_model."])
    rules += _identity(["vision_model.", "mlp1."])
    return KeyMap(rules)


def ours_to_official_map(config: InternVLConfig) -> KeyMap:
    """Ours -> official names (inverse of :func:`official_to_ours_map`)."""
    rules: list[Rule] = []
    if config.text.flavour == "internlm2":
        heads, kv, hd = _llm_heads(config)
        for kind in ("weight", "bias"):
            rules.append(
                Merge(
                    tuple(rf"{_LLM}self_attn\.{p}_proj\.{kind}" for p in "qkv"),
                    rf"language_model.model.layers.\g<l>.attention.wqkv.{kind}",
                    lambda _key, parts: merge_wqkv(*parts, heads, kv, hd),
                )
            )
        for official, ours in _INTERNLM2_RENAMES:
            rules.append(Rename(_LLM + re.escape(ours), rf"language_model.model.layers.\g<l>.{official}"))
        rules += [Rename(re.escape(b), a) for a, b in _INTERNLM2_TOP]
        rules += _identity(["language_model.model.norm."])
    else:
        rules += _identity(["language_model."])
    rules += _identity(["vision_model.", "mlp1."])
    return KeyMap(rules)


# ---------------------------------------------------------------------------------------------------------
# transformers-native <-> ours

_HF_VIT_RENAMES = (
    # (our suffix inside a ViT layer, HF suffix)
    ("attn.q_norm.weight", "attention.q_norm.weight"),
    ("attn.k_norm.weight", "attention.k_norm.weight"),
    ("attn.proj.weight", "attention.projection_layer.weight"),
    ("attn.proj.bias", "attention.projection_layer.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
    ("norm1.weight", "layernorm_before.weight"),
    ("norm1.bias", "layernorm_before.bias"),
    ("norm2.weight", "layernorm_after.weight"),
    ("norm2.bias", "layernorm_after.bias"),
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
)
_HF_TOP = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        "vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight",
    ),
    ("vision_model.embeddings.patch_embedding.bias", "model.vision_tower.embeddings.patch_embeddings.projection.bias"),
    ("mlp1.0.weight", "model.multi_modal_projector.layer_norm.weight"),
    ("mlp1.0.bias", "model.multi_modal_projector.layer_norm.bias"),
    ("mlp1.1.weight", "model.multi_modal_projector.linear_1.weight"),
    ("mlp1.1.bias", "model.multi_modal_projector.linear_1.bias"),
    ("mlp1.3.weight", "model.multi_modal_projector.linear_2.weight"),
    ("mlp1.3.bias", "model.multi_modal_projector.linear_2.bias"),
    ("language_model.lm_head.weight", "lm_head.weight"),
)

#: transformers keeps legacy top-level prefixes in files it writes (save_pretrained reverses its load-time
#: renaming); module names are the ``model.``-prefixed ones. (file prefix, module prefix), checked in order.
_HF_FILE_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
_HF_WRITE_PREFIXES = tuple(pair for pair in _HF_FILE_PREFIXES if pair[0] != "language_model.")


def hf_module_name(key: str) -> str:
    """Normalise a key of an HF-native file (either spelling) to transformers' module name."""
    for file_prefix, module_prefix in _HF_FILE_PREFIXES:
        if key.startswith(file_prefix):
            return module_prefix + key[len(file_prefix) :]
    return key


def hf_file_name(key: str) -> str:
    """The spelling transformers' ``save_pretrained`` writes for a module name (so files match its own)."""
    for file_prefix, module_prefix in _HF_WRITE_PREFIXES:
        if key.startswith(module_prefix):
            return file_prefix + key[len(module_prefix) :]
    return key


def _require_hf_support(config: InternVLConfig) -> None:
    if config.is_mono or config.text.visual_experts:
        raise CheckpointError(
            "Mono-InternVL (visual FFN experts, patch-only vision stem) has no transformers-native layout; "
            "save it with layout='official'"
        )


def hf_to_ours_map(config: InternVLConfig) -> KeyMap:
    """transformers-native names (module or file spelling) -> ours; the ViT's q/k/v are fused into ``qkv``."""
    _require_hf_support(config)
    rules: list[Rule] = [Drop(_ROTARY_BUFFERS)]
    for kind in ("weight", "bias"):
        rules.append(
            Merge(
                tuple(rf"{_HF_VIT}attention\.{p}_proj\.{kind}" for p in "qkv"),
                rf"vision_model.encoder.layers.\g<l>.attn.qkv.{kind}",
                lambda key, parts: merge_thirds(parts, key),
            )
        )
    for ours, hf in _HF_VIT_RENAMES:
        rules.append(Rename(_HF_VIT + re.escape(hf), rf"vision_model.encoder.layers.\g<l>.{ours}"))
    rules += [Rename(re.escape(hf), ours) for ours, hf in _HF_TOP]
    rules.append(Rename(r"model\.language_model\.(?P<k>.+)", r"language_model.model.\g<k>"))
    return KeyMap(rules, normalize=hf_module_name)


def ours_to_hf_map(config: InternVLConfig) -> KeyMap:
    """Ours -> transformers module names (use :func:`hf_file_name` for the spelling written to disk)."""
    _require_hf_support(config)
    rules: list[Rule] = []
    for kind in ("weight", "bias"):
        rules.append(
            Split(
                rf"{_VIT}attn\.qkv\.{kind}",
                tuple(rf"model.vision_tower.encoder.layer.\g<l>.attention.{p}_proj.{kind}" for p in "qkv"),
                lambda key, t: split_thirds(t, key),
            )
        )
    for ours, hf in _HF_VIT_RENAMES:
        rules.append(Rename(_VIT + re.escape(ours), rf"model.vision_tower.encoder.layer.\g<l>.{hf}"))
    rules += [Rename(re.escape(ours), hf) for ours, hf in _HF_TOP]
    rules.append(Rename(r"language_model\.model\.(?P<k>.+)", r"model.language_model.\g<k>"))
    return KeyMap(rules)


# ---------------------------------------------------------------------------------------------------------
# convenience


def to_ours_map(layout: Layout, config: InternVLConfig) -> KeyMap:
    if layout == "official":
        return official_to_ours_map(config)
    if layout == "hf":
        return hf_to_ours_map(config)
    raise CheckpointError(f"unknown layout {layout!r} (expected 'official' or 'hf')")


def from_ours_map(layout: Layout, config: InternVLConfig) -> KeyMap:
    if layout == "official":
        return ours_to_official_map(config)
    if layout == "hf":
        return ours_to_hf_map(config)
    raise CheckpointError(f"unknown layout {layout!r} (expected 'official' or 'hf')")


def official_to_ours(state: Mapping[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    return official_to_ours_map(config).convert(state)


def ours_to_official(state: Mapping[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    return ours_to_official_map(config).convert(state)


def hf_to_ours(state: Mapping[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    return hf_to_ours_map(config).convert(state)


def ours_to_hf(state: Mapping[str, Tensor], config: InternVLConfig) -> dict[str, Tensor]:
    return ours_to_hf_map(config).convert(state)
