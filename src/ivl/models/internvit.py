"""InternViT (300M and 6B styles): pre-norm ViT with layer scale, optional QK-norm, no final norm.

Both styles come from one ``VisionConfig``: 300M = LayerNorm + qkv bias; 6B = RMSNorm + QK-norm over
the full width D (before splitting heads) and no qkv bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ivl.config import VisionConfig
from ivl.errors import ModelInputError
from ivl.models.norms import RMSNorm, make_norm
from ivl.models.patch_embed import VisionEmbeddings


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with a fused ``qkv`` (rows q|k|v, head-major inside each)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        if self.qk_normalization:  # over the full D-vector of all heads, then split
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """``h += DropPath(Attn(norm1 h) * ls1); h += DropPath(MLP(norm2 h) * ls2)``."""

    def __init__(self, config: VisionConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.ls1 = nn.Parameter(torch.full((dim,), float(config.initializer_factor)))
        self.norm2 = make_norm(config.norm_type, dim, config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.ls2 = nn.Parameter(torch.full((dim,), float(config.initializer_factor)))
        self.drop_path_rate = drop_path_rate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + drop_path(self.attn(self.norm1(h).to(h.dtype)) * self.ls1, self.drop_path_rate, self.training)
        return h + drop_path(self.mlp(self.norm2(h).to(h.dtype)) * self.ls2, self.drop_path_rate, self.training)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        count = config.num_hidden_layers
        rates = [config.drop_path_rate * i / (count - 1) if count > 1 else 0.0 for i in range(count)]  # linspace
        self.layers = nn.ModuleList(VisionLayer(config, rate) for rate in rates)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Run the first ``num_layers`` layers (all by default)."""
        for layer in self.layers[: len(self.layers) if num_layers is None else num_layers]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h


class InternViT(nn.Module):
    """pixels ``[N, 3, S, S]`` -> patch features ``[N, (S/p)^2, D]`` of ``select_layer`` (CLS dropped)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def layers_needed(self, select_layer: int) -> int:
        """Hidden-state list index 0 is the embedding output, index L the last layer; run only what is used."""
        total = len(self.encoder.layers) + 1
        if not -total <= select_layer < total:
            raise ModelInputError(f"select_layer {select_layer} is out of range for {total - 1} vision layers")
        return select_layer % total

    def forward(self, pixel_values: torch.Tensor, *, select_layer: int = -1, keep_cls: bool = False) -> torch.Tensor:
        h = self.encoder(self.embeddings(pixel_values), self.layers_needed(select_layer))
        return h if keep_cls else h[:, 1:]
