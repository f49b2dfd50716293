"""Parameter counts and memory estimates from a config alone, so users learn what fits before they load anything.

The closed-form counts here are also an independent check of the model code: tests compare them with the
parameters of a model instantiated on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ivl.config import InternVLConfig, TextConfig, VisionConfig

GIB = 1024**3


def vision_parameters(cfg: VisionConfig) -> int:
    d, i, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    stem = d * cfg.num_channels * p * p + d + d + (1 + cfg.num_patches) * d
    if cfg.model_type == "intern_vit_patch":
        return stem
    norm = 2 * d if cfg.norm_type == "layer_norm" else d
    layer = (
        3 * d * d
        + (3 * d if cfg.qkv_bias else 0)
        + (2 * d if cfg.qk_normalization else 0)
        + d * d
        + d  # proj
        + i * d
        + i
        + d * i
        + d  # mlp
        + 2 * norm
        + 2 * d  # layer scale
    )
    return stem + cfg.num_hidden_layers * layer


def connector_parameters(cfg: InternVLConfig) -> int:
    c, h = cfg.connector_in_features, cfg.text.hidden_size
    return 2 * c + c * h + h + h * h + h


def language_parameters(cfg: TextConfig) -> dict[str, int]:
    h, hd = cfg.hidden_size, cfg.resolved_head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if cfg.attention_bias else 0)
    ffn = 3 * h * cfg.intermediate_size
    experts = ffn if cfg.visual_experts else 0
    per_layer = attn + ffn + experts + 2 * h
    embed = cfg.vocab_size * h
    return {
        "embeddings": embed,
        "layers": cfg.num_hidden_layers * per_layer,
        "visual_experts": cfg.num_hidden_layers * experts,
        "final_norm": h,
        "lm_head": 0 if cfg.tie_word_embeddings else embed,
    }


def parameter_counts(cfg: InternVLConfig) -> dict[str, int]:
    """Counts per component; ``language`` includes embeddings, layers (with experts), final norm and lm_head."""
    lang = language_parameters(cfg.text)
    language = lang["embeddings"] + lang["layers"] + lang["final_norm"] + lang["lm_head"]
    counts = {
        "vision": vision_parameters(cfg.vision),
        "connector": connector_parameters(cfg),
        "language": language,
        "language.embeddings": lang["embeddings"],
        "language.layers": lang["layers"],
        "language.visual_experts": lang["visual_experts"],
        "language.lm_head": lang["lm_head"],
    }
    counts["total"] = counts["vision"] + counts["connector"] + counts["language"]
    return counts


@dataclass
class MemoryEstimate:
    """Bytes needed per device; activations are workload-dependent and reported separately."""

    weights: int
    gradients: int
    optimizer: int
    kv_cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.kv_cache


def kv_cache_bytes(cfg: TextConfig, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    return (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.resolved_head_dim * tokens * batch * bytes_per_value
    )


def inference_memory(cfg: InternVLConfig, *, context_tokens: int = 8192, batch: int = 1) -> MemoryEstimate:
    """bf16 weights plus a bf16 KV cache for ``batch`` sequences of ``context_tokens``."""
    total = parameter_counts(cfg)["total"]
    return MemoryEstimate(
        weights=2 * total, gradients=0, optimizer=0, kv_cache=kv_cache_bytes(cfg.text, context_tokens, batch)
    )


def training_memory(cfg: InternVLConfig, *, trainable: int | None = None, shards: int = 1) -> MemoryEstimate:
    """Mixed-precision AdamW: bf16 weights, fp32 master copy + fp32 grads + two fp32 moments per trainable parameter.

    ``shards`` > 1 models FSDP full sharding over that many ranks (every state divided evenly).
    """
    total = parameter_counts(cfg)["total"]
    trainable = total if trainable is None else trainable
    weights = 2 * total + 4 * trainable  # bf16 compute copy + fp32 master weights
    return MemoryEstimate(
        weights=weights // shards,
        gradients=4 * trainable // shards,
        optimizer=8 * trainable // shards,
    )
