"""Plain dataclass configs for the InternVL family, plus a table of presets.

One config object describes a whole model; the official `config.json` (``internvl_chat``) and the
transformers-native one (``internvl``) are both translated to and from it in ``ivl.checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ivl.errors import ConfigError

TextFlavour = Literal["qwen2", "internlm2", "llama"]
VisionKind = Literal["intern_vit_6b", "intern_vit_patch"]

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass
class VisionConfig:
    """InternViT (``intern_vit_6b``: both 300M and 6B styles) or the encoder-free patch stem (``intern_vit_patch``)."""

    model_type: VisionKind = "intern_vit_6b"
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    drop_path_rate: float = 0.0
    initializer_factor: float = 0.1
    #: std of the N(0, std) init of a from-scratch encoder's matrices (official config key, default 0.02); a tiny
    #: ViT with small patches learns spatial features far sooner from a wider init (docs/benchmarks.md, "Demo")
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.model_type not in ("intern_vit_6b", "intern_vit_patch"):
            raise ConfigError(f"vision.model_type must be intern_vit_6b or intern_vit_patch, got {self.model_type!r}")
        if self.model_type == "intern_vit_6b" and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision.hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision.norm_type must be layer_norm or rms_norm, got {self.norm_type!r}")


@dataclass
class TextConfig:
    """Decoder LLM: Qwen2/2.5 (qkv bias), InternLM2/2.5 (packed wqkv on disk) or Llama.

    ``visual_experts`` gives every layer a second FFN chosen per token by a modality mask (Mono-InternVL).
    """

    flavour: TextFlavour = "qwen2"
    vocab_size: int = 151674
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    visual_experts: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.flavour not in ("qwen2", "internlm2", "llama"):
            raise ConfigError(f"text.flavour must be qwen2, internlm2 or llama, got {self.flavour!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text.num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text.hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("dynamic", "linear", "default", "llama3", None):
                raise ConfigError(f"text.rope_scaling type {kind!r} is not supported (dynamic, linear, llama3)")


@dataclass
class InternVLConfig:
    """A whole InternVL-2.5 model (and, with ``intern_vit_patch`` + visual experts, Mono-InternVL)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5
    select_layer: int = -1
    ps_version: str = "v2"
    template: str = "internvl2_5"
    image_token_id: int = 151667
    force_image_size: int = 448
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    system_message: str | None = None
    name: str = "custom"

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (S / patch)² · r² (256 for 448 px tiles)."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def connector_in_features(self) -> int:
        return int(self.vision.hidden_size * round(1 / self.downsample_ratio) ** 2)

    @property
    def is_mono(self) -> bool:
        return self.vision.model_type == "intern_vit_patch"

    def validate(self) -> InternVLConfig:
        self.vision.validate()
        self.text.validate()
        # released models use 0.5; 1/k for other integers k is the same unshuffle (the official code allows it)
        factor = round(1 / self.downsample_ratio) if self.downsample_ratio > 0 else 0
        if factor < 2 or abs(factor * self.downsample_ratio - 1) > 1e-9:
            raise ConfigError(
                f"downsample_ratio {self.downsample_ratio} is not 1/k for an integer k >= 2 (InternVL uses 0.5)"
            )
        grid = self.image_size // self.vision.patch_size
        if grid % factor:
            raise ConfigError(f"a {grid}x{grid} patch grid does not divide by 1/downsample_ratio = {factor}")
        if self.ps_version != "v2":
            raise ConfigError(f"ps_version {self.ps_version!r} is not supported (InternVL-2.5 uses v2)")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(
                f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})"
            )
        grid = self.image_size // self.vision.patch_size
        if grid % 2:
            raise ConfigError(f"patch grid {grid}x{grid} is odd; pixel unshuffle needs an even grid")
        if self.is_mono != self.text.visual_experts:
            raise ConfigError(
                "a patch-only vision stem (Mono-InternVL) requires text.visual_experts=True and vice versa"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InternVLConfig:
        data = dict(data)
        vision = VisionConfig(**data.pop("vision", {}))
        text = TextConfig(**data.pop("text", {}))
        try:
            return cls(vision=vision, text=text, **data).validate()
        except TypeError as exc:
            raise ConfigError(f"unknown InternVLConfig field: {exc}") from exc


def _mono_vision() -> VisionConfig:
    """Mono-InternVL's patch stem: 14 px conv to C = 1024 + CLS/position table; no encoder layers (spec §3, §6)."""
    return VisionConfig(model_type="intern_vit_patch", hidden_size=1024, num_hidden_layers=0, patch_size=14)


def _mono_text() -> TextConfig:
    """InternLM2-chat-1.8B with a visual FFN expert in every layer (spec mono-internvl §5)."""
    text = _internlm(2048, 24, 16, 8, 8192)
    text.visual_experts = True
    return text


@dataclass
class MonoConfig(InternVLConfig):
    """Mono-InternVL (encoder-free): an :class:`InternVLConfig` whose defaults are Mono-InternVL-2B.

    The same dataclass fields, so checkpoints, processors and the engine treat both alike; ``validate``
    additionally insists on the patch stem + visual experts pairing.
    """

    vision: VisionConfig = field(default_factory=_mono_vision)
    text: TextConfig = field(default_factory=_mono_text)
    template: str = "internlm2-chat"
    image_token_id: int = 92546
    name: str = "Mono-InternVL-2B"

    def validate(self) -> MonoConfig:
        if not self.is_mono:
            raise ConfigError(
                f"MonoConfig needs vision.model_type 'intern_vit_patch' (encoder-free stem), got {self.vision.model_type!r}"
            )
        super().validate()
        return self

    @classmethod
    def from_config(cls, config: InternVLConfig) -> MonoConfig:
        """The same settings as a MonoConfig (e.g. for a config parsed from a checkpoint); validates them."""
        values = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(InternVLConfig)}
        return cls(**values).validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonoConfig:
        """Like :meth:`InternVLConfig.from_dict`, but missing fields take Mono-InternVL-2B's values."""
        data = dict(data)
        vision = {**dataclasses.asdict(_mono_vision()), **data.pop("vision", {})}
        text = {**dataclasses.asdict(_mono_text()), **data.pop("text", {})}
        try:
            return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **data).validate()
        except TypeError as exc:
            raise ConfigError(f"unknown MonoConfig field: {exc}") from exc


# --------------------------------------------------------------------------------------------------------
# presets

VIT_300M = VisionConfig()
VIT_6B = VisionConfig(
    hidden_size=3200,
    num_hidden_layers=45,
    num_attention_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    qkv_bias=False,
    qk_normalization=True,
)

QWEN_SPECIAL = {"image_token_id": 151667, "vocab_size": 151674}
INTERNLM_SPECIAL = {"image_token_id": 92546, "vocab_size": 92553}


def _qwen(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> TextConfig:
    return TextConfig(
        flavour="qwen2",
        vocab_size=151674,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        attention_bias=True,
        bos_token_id=None,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def _internlm(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> TextConfig:
    return TextConfig(
        flavour="internlm2",
        vocab_size=92553,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=92542,
        pad_token_id=2,
    )


def _preset(name: str, vision: VisionConfig, text: TextConfig) -> InternVLConfig:
    image_token_id = 151667 if text.flavour == "qwen2" else 92546
    return InternVLConfig(vision=vision, text=text, image_token_id=image_token_id, name=name)


def _tiny(mono: bool = False) -> InternVLConfig:
    vision = VisionConfig(
        model_type="intern_vit_patch" if mono else "intern_vit_6b",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
    )
    text = TextConfig(
        flavour="internlm2" if mono else "qwen2",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=not mono,
        visual_experts=mono,
        max_position_embeddings=4096,
    )
    return InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=500,
        force_image_size=56,
        template="internlm2-chat" if mono else "internvl2_5",
        name="mono-tiny" if mono else "tiny",
    )


_PRESETS = {
    "internvl2_5-1b": lambda: _preset("InternVL2_5-1B", VIT_300M, _qwen(896, 24, 14, 2, 4864)),
    "internvl2_5-2b": lambda: _preset("InternVL2_5-2B", VIT_300M, _internlm(2048, 24, 16, 8, 8192)),
    "internvl2_5-4b": lambda: _preset("InternVL2_5-4B", VIT_300M, _qwen(2048, 36, 16, 2, 11008)),
    "internvl2_5-8b": lambda: _preset("InternVL2_5-8B", VIT_300M, _internlm(4096, 32, 32, 8, 14336)),
    "internvl2_5-26b": lambda: _preset("InternVL2_5-26B", VIT_6B, _internlm(6144, 48, 48, 8, 16384)),
    "internvl2_5-38b": lambda: _preset("InternVL2_5-38B", VIT_6B, _qwen(5120, 64, 40, 8, 27648)),
    "internvl2_5-78b": lambda: _preset("InternVL2_5-78B", VIT_6B, _qwen(8192, 80, 64, 8, 29568)),
    "tiny": lambda: _tiny(mono=False),
    "mono-internvl-2b": MonoConfig,
    "mono-tiny": lambda: MonoConfig.from_config(_tiny(mono=True)),
}

#: Published parameter totals in billions (spec §2), used by tests and `ivl info`.
PUBLISHED_TOTALS_B = {
    "internvl2_5-1b": 0.938,
    "internvl2_5-2b": 2.21,
    "internvl2_5-4b": 3.71,
    "internvl2_5-8b": 8.08,
    "internvl2_5-26b": 25.5,
    "internvl2_5-38b": 38.4,
    "internvl2_5-78b": 78.4,
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def register_preset(name: str, factory: Any) -> None:
    """Let other model families (Mono-InternVL) add presets without this module importing them."""
    _PRESETS[name.lower()] = factory


def get_preset(name: str) -> InternVLConfig:
    """Return a fresh config for a preset name such as ``internvl2_5-8b`` (case-insensitive)."""
    key = name.lower().replace("internvl2.5", "internvl2_5")
    if key not in _PRESETS and f"internvl2_5-{key}" in _PRESETS:
        key = f"internvl2_5-{key}"
    if key not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return copy.deepcopy(_PRESETS[key]()).validate()
