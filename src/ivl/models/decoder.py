"""Causal decoder LLM for the Qwen2/2.5, InternLM2/2.5 and Llama flavours (one implementation).

Pre-norm layers: RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU FFN. With
``TextConfig.visual_experts`` every layer also holds ``mlp_visual`` and each token goes through exactly
one of the two FFNs, chosen by a boolean modality mask (Mono-InternVL's static routing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ivl.config import TextConfig
from ivl.errors import ModelInputError
from ivl.models.attention import Attention, AttentionPlan, packed_positions, plan_attention
from ivl.models.cache import KVCache
from ivl.models.norms import RMSNorm
from ivl.models.rope import RotaryEmbedding


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Deterministic-shape random init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv2d):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor  # last layer, after the final norm, all positions


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate x) * up x)``, no biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    """Token indices per FFN for one forward (computed once, shared by all layers)."""

    mode: Literal["text", "visual", "mixed"]
    text_index: torch.Tensor | None = None
    visual_index: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, visual_mask: torch.Tensor | None) -> Routing:
        if visual_mask is None:
            return cls("text")
        flat = visual_mask.reshape(-1).bool()
        visual_index = flat.nonzero().squeeze(1)
        count = visual_index.numel()
        if count == 0:
            return cls("text")
        if count == flat.numel():
            return cls("visual")
        return cls("mixed", text_index=(~flat).nonzero().squeeze(1), visual_index=visual_index)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = MLP(hidden, config.intermediate_size)
        self.mlp_visual = MLP(hidden, config.intermediate_size) if config.visual_experts else None

    def feed_forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Send each token through exactly one FFN (gather -> FFN -> scatter), never both."""
        if self.mlp_visual is None or routing.mode == "text":
            return self.mlp(x)
        if routing.mode == "visual":
            return self.mlp_visual(x)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape)
        out.index_copy_(0, routing.text_index, self.mlp(flat.index_select(0, routing.text_index)))
        out.index_copy_(0, routing.visual_index, self.mlp_visual(flat.index_select(0, routing.visual_index)))
        return out.view_as(x)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None,
        routing: Routing,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, plan, cache)
        return h + self.feed_forward(self.post_attention_layernorm(h), routing)


class Decoder(nn.Module):
    """Token embeddings, decoder layers and the final norm (``language_model.model``)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        visual_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.ndim != 3:
            raise ModelInputError(f"decoder input must be [batch, tokens, ...], got shape {tuple(h.shape)}")
        b, t = h.shape[:2]
        past = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(t)
        if visual_mask is not None and tuple(visual_mask.shape) != (b, t):
            raise ModelInputError(f"visual_mask must be [batch, tokens] = [{b}, {t}], got {tuple(visual_mask.shape)}")
        plan = plan_attention(
            batch_size=b, q_len=t, past_len=past, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=h.device
        )
        position_ids, seq_hint = self._positions(position_ids, attention_mask, cu_seqlens, b, t, past, h.device)
        cos, sin = self.rotary_emb(position_ids, h.dtype, seq_hint)
        routing = Routing.from_mask(visual_mask if self.config.visual_experts else None)
        use_checkpoint = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                h = checkpoint(layer, h, cos, sin, plan, cache, routing, use_reentrant=False)
            else:
                h = layer(h, cos, sin, plan, cache, routing)
        if cache is not None:
            cache.advance(t)
        return self.norm(h)

    def _positions(
        self,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        b: int,
        t: int,
        past: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, int | None]:
        """Explicit ids, else per-sub-sequence (packed), else cumsum(mask) - 1, else past..past+T-1.

        Also returns a host-side bound on max position + 1 so dynamic RoPE needs no device sync.
        """
        if position_ids is not None:
            if position_ids.ndim == 1:
                position_ids = position_ids[None]
            if position_ids.shape[-1] != t:
                raise ModelInputError(f"position_ids cover {position_ids.shape[-1]} tokens, the input has {t}")
            return position_ids.to(device), None
        if cu_seqlens is not None:
            return packed_positions(cu_seqlens, t, device), None
        bound = past + t
        limit = self.rotary_emb.max_positions
        if attention_mask is not None:
            positions = (attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1).clamp(min=0)[:, -t:]
            return positions, bound if bound <= limit else None
        return torch.arange(past, past + t, device=device)[None].expand(b, t), bound


class TiedHead(nn.Module):
    """Output projection that reuses the token embedding matrix (``tie_word_embeddings=True``); owns no weights."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not registered: keeps the key out of state_dict

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding.weight)


class CausalLM(nn.Module):
    """``language_model``: ``.model`` (Decoder) and ``.lm_head``; returns logits and final hidden states."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if config.tie_word_embeddings:
            self.lm_head: nn.Module = TiedHead(self.model.embed_tokens)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        visual_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_positions: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """``logits_to_keep`` > 0: logits of the last positions only (decoding). ``logits_positions``: a bool mask
        shaped like the tokens; logits ``[N, V]`` of its True positions only, in row-major order. Training needs
        them where a target is supervised: for a 151k vocabulary the full ``[T, V]`` logits of a 16k-token pack
        are ~10 GB in float32, while the answers are a small share of the tokens."""
        if logits_positions is not None and logits_to_keep > 0:
            raise ModelInputError("pass logits_to_keep or logits_positions, not both")
        hidden = self.model(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            visual_mask=visual_mask,
            cu_seqlens=cu_seqlens,
        )
        if logits_positions is not None:
            if logits_positions.shape != hidden.shape[:-1] or logits_positions.dtype != torch.bool:
                raise ModelInputError(
                    f"logits_positions must be a bool mask of shape {tuple(hidden.shape[:-1])}, got "
                    f"{logits_positions.dtype} {tuple(logits_positions.shape)}"
                )
            kept = hidden[logits_positions]
        else:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        return CausalLMOutput(logits=self.lm_head(kept), hidden_states=hidden)

    def init_visual_experts_from_text(self) -> None:
        """Copy every text FFN into its visual expert (Mono-InternVL's expert initialisation)."""
        for layer in self.model.layers:
            if layer.mlp_visual is None:
                raise ModelInputError("this decoder has no visual experts (TextConfig.visual_experts is False)")
            layer.mlp_visual.load_state_dict(layer.mlp.state_dict())

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False
