"""``config.json`` of both layouts <-> :class:`ivl.config.InternVLConfig`.

* official (``model_type: internvl_chat``): ``vision_config`` + ``llm_config`` (Qwen2 / InternLM2 /
  InternLM2VE (Mono-InternVL) / Llama);
* transformers-native (``model_type: internvl``): ``vision_config`` (``internvl_vision``) + ``text_config``
  (``qwen2`` or ``llama``; InternLM2 becomes Llama).

Converting one layout's dict to the other (:func:`official_to_hf_dict`, :func:`hf_to_official_dict`) stashes
whatever the target cannot represent (``auto_map``, ``pad2square``, llm_config extras, key order, ...) under
``ivl_official_extras`` / ``ivl_hf_extras``, so a round trip restores the original file byte for byte.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from ivl.config import InternVLConfig, TextConfig, VisionConfig
from ivl.errors import CheckpointError, ConfigError

OFFICIAL_EXTRAS = "ivl_official_extras"
HF_EXTRAS = "ivl_hf_extras"

#: llm_config architecture -> (our text flavour, visual experts)
LLM_ARCHITECTURES = {
    "Qwen2ForCausalLM": ("qwen2", False),
    "InternLM2ForCausalLM": ("internlm2", False),
    "InternLM2VEForCausalLM": ("internlm2", True),
    "LlamaForCausalLM": ("llama", False),
}
_TEXT_MODEL_TYPES = {"qwen2": "qwen2", "internlm2": "internlm2", "llama": "llama"}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# helpers


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of ``torch_dtype`` in config.json)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Any, where: str = "torch_dtype") -> torch.dtype | None:
    """A dtype given as ``torch.dtype``, ``"bfloat16"``, ``"torch.float16"``, ``"bf16"``, ``"fp32"`` or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.").lower()
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )
    if name not in _DTYPE_NAMES:
        raise CheckpointError(f"{where}: unsupported dtype {value!r} (use float32, bfloat16 or float16)")
    return _DTYPE_NAMES[name]


def config_dtype(data: dict[str, Any]) -> torch.dtype | None:
    """The checkpoint dtype a config.json declares (``torch_dtype``, or transformers 5's ``dtype``)."""
    value = data.get("torch_dtype", data.get("dtype"))
    return parse_dtype(value, "config.json torch_dtype")


def dump_json(data: dict[str, Any]) -> str:
    """transformers' own config.json formatting (sorted keys, indent 2, trailing newline)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise CheckpointError(f"{where} has no {key!r}")
    return section[key]


def _as_int_size(value: Any, where: str) -> int:
    """HF stores image/patch sizes as ``[h, w]``; we support square ones only."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where} {value} is not square; only square tiles are supported")
        value = value[0]
    return int(value)


def _validated(config: InternVLConfig, where: str) -> InternVLConfig:
    try:
        return config.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def _rope_from(text: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 5 ``rope_parameters`` or the legacy ``rope_theta``/``rope_scaling``.

    When both are present and agree, the legacy spelling of the scaling dict is kept (it round-trips).
    """
    legacy = dict(text["rope_scaling"]) if text.get("rope_scaling") else None
    params = text.get("rope_parameters")
    if not isinstance(params, dict):
        return float(text.get("rope_theta", 10000.0)), legacy
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None if kind in (None, "default") else {k: v for k, v in params.items() if k != "rope_theta"}
    if legacy is not None and _rope_key(legacy) == _rope_key(scaling):
        return theta, legacy
    return theta, scaling


def _rope_key(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "null"
    norm = {k: v for k, v in scaling.items() if k != "type"}
    norm["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return json.dumps(norm, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# official <-> InternVLConfig


def image_token_id_from_vocab(vocab_size: int) -> int:
    """``<IMG_CONTEXT>`` is the third of the nine tokens InternVL appends to the vocabulary (spec §3.4)."""
    return vocab_size - 7


def official_to_config(data: dict[str, Any], *, image_token_id: int | None = None) -> InternVLConfig:
    """Parse an official ``internvl_chat`` config.json dict.

    ``image_token_id`` (from the tokenizer files) wins over the config's own ``image_token_id`` field, which
    only our writer adds; without either, the id follows from the vocabulary size (spec §3.4).
    """
    where = "config.json"
    vision_raw = dict(_require(data, "vision_config", where))
    llm = dict(_require(data, "llm_config", where))
    data = {k: v for k, v in data.items() if k != HF_EXTRAS}
    archs = llm.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in LLM_ARCHITECTURES:
        raise CheckpointError(
            f"{where}: unknown llm_config architecture {arch!r}; supported: {', '.join(LLM_ARCHITECTURES)}"
        )
    flavour, experts = LLM_ARCHITECTURES[arch]
    vision_kind = vision_raw.get("model_type", "intern_vit_6b")
    if vision_kind not in ("intern_vit_6b", "intern_vit_patch"):
        raise CheckpointError(f"{where}: unknown vision_config model_type {vision_kind!r}")

    defaults = VisionConfig()
    vision = VisionConfig(
        model_type=vision_kind,
        hidden_size=int(vision_raw.get("hidden_size", defaults.hidden_size)),
        num_hidden_layers=int(vision_raw.get("num_hidden_layers", defaults.num_hidden_layers)),
        num_attention_heads=int(vision_raw.get("num_attention_heads", defaults.num_attention_heads)),
        intermediate_size=int(vision_raw.get("intermediate_size", defaults.intermediate_size)),
        norm_type=vision_raw.get("norm_type", defaults.norm_type),
        layer_norm_eps=float(vision_raw.get("layer_norm_eps", defaults.layer_norm_eps)),
        qkv_bias=bool(vision_raw.get("qkv_bias", defaults.qkv_bias)),
        qk_normalization=bool(vision_raw.get("qk_normalization", defaults.qk_normalization)),
        patch_size=_as_int_size(vision_raw.get("patch_size", defaults.patch_size), "vision_config.patch_size"),
        image_size=_as_int_size(vision_raw.get("image_size", defaults.image_size), "vision_config.image_size"),
        num_channels=int(vision_raw.get("num_channels", defaults.num_channels)),
        drop_path_rate=float(vision_raw.get("drop_path_rate", defaults.drop_path_rate)),
        initializer_factor=float(vision_raw.get("initializer_factor", defaults.initializer_factor)),
        initializer_range=float(vision_raw.get("initializer_range", defaults.initializer_range)),
    )
    theta, scaling = _rope_from(llm)
    heads = int(_require(llm, "num_attention_heads", "llm_config"))
    if flavour == "qwen2":
        bias = True  # Qwen2 always has q/k/v biases; its config has no switch
    elif flavour == "internlm2":
        bias = bool(llm.get("bias", False))
    else:
        bias = bool(llm.get("attention_bias", False))
    text = TextConfig(
        flavour=flavour,
        vocab_size=int(_require(llm, "vocab_size", "llm_config")),
        hidden_size=int(_require(llm, "hidden_size", "llm_config")),
        num_hidden_layers=int(_require(llm, "num_hidden_layers", "llm_config")),
        num_attention_heads=heads,
        num_key_value_heads=int(llm.get("num_key_value_heads") or heads),
        head_dim=llm.get("head_dim"),
        intermediate_size=int(_require(llm, "intermediate_size", "llm_config")),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(llm.get("max_position_embeddings", 32768)),
        attention_bias=bias,
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        visual_experts=experts,
        bos_token_id=llm.get("bos_token_id"),
        eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"),
    )
    if image_token_id is None:
        image_token_id = data.get("image_token_id", image_token_id_from_vocab(text.vocab_size))
    force = data.get("force_image_size")
    config = InternVLConfig(
        vision=vision,
        text=text,
        downsample_ratio=float(data.get("downsample_ratio", 0.5)),
        select_layer=int(data.get("select_layer", -1)),
        ps_version=str(data.get("ps_version", "v1")),
        template=str(data.get("template") or "internvl2_5"),
        image_token_id=int(image_token_id),
        force_image_size=int(force) if force else vision.image_size,
        use_thumbnail=bool(data.get("use_thumbnail", False)),
        min_dynamic_patch=int(data.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(data.get("max_dynamic_patch", 6)),
        system_message=data.get("system_message") or None,  # null (or empty) means the template default
    )
    return _validated(config, where)


def _official_llm(text: TextConfig, dtype: str | None) -> dict[str, Any]:
    arch = {"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM", "llama": "LlamaForCausalLM"}[text.flavour]
    if text.visual_experts:
        if text.flavour != "internlm2":
            raise CheckpointError(f"visual experts exist only for the internlm2 flavour, not {text.flavour!r}")
        arch = "InternLM2VEForCausalLM"
    llm: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _TEXT_MODEL_TYPES[text.flavour],
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta,
        "rope_scaling": copy.deepcopy(text.rope_scaling),
        "tie_word_embeddings": text.tie_word_embeddings,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "use_cache": True,
    }
    if text.head_dim is not None:
        llm["head_dim"] = text.head_dim
    if text.flavour == "internlm2":
        llm["bias"] = text.attention_bias
    elif text.flavour == "llama":
        llm["attention_bias"] = text.attention_bias
    elif not text.attention_bias:
        raise CheckpointError("the qwen2 flavour always has q/k/v biases; attention_bias=False cannot be saved")
    else:
        llm["use_sliding_window"] = False
    if dtype is not None:
        llm["torch_dtype"] = dtype
    return llm


def _official_vision(vision: VisionConfig, dtype: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_type": vision.model_type,
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "hidden_act": "gelu",
        "norm_type": vision.norm_type,
        "layer_norm_eps": vision.layer_norm_eps,
        "qkv_bias": vision.qkv_bias,
        "qk_normalization": vision.qk_normalization,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "num_channels": vision.num_channels,
        "drop_path_rate": vision.drop_path_rate,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_factor": vision.initializer_factor,
        "initializer_range": vision.initializer_range,
    }
    if dtype is not None:
        out["torch_dtype"] = dtype
    return out


def config_to_official(config: InternVLConfig, *, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """An official ``internvl_chat`` config.json dict (plus ``image_token_id``, which official code ignores)."""
    name = dtype_name(parse_dtype(dtype)) if dtype is not None else None  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": _official_vision(config.vision, name),
        "llm_config": _official_llm(config.text, name),
        "downsample_ratio": config.downsample_ratio,
        "select_layer": config.select_layer,
        "ps_version": config.ps_version,
        "template": config.template,
        "force_image_size": config.force_image_size,
        "dynamic_image_size": True,
        "use_thumbnail": config.use_thumbnail,
        "min_dynamic_patch": config.min_dynamic_patch,
        "max_dynamic_patch": config.max_dynamic_patch,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "image_token_id": config.image_token_id,
    }
    if config.system_message is not None:
        out["system_message"] = config.system_message
    if name is not None:
        out["torch_dtype"] = name
    return out


# ---------------------------------------------------------------------------------------------------------
# transformers-native <-> InternVLConfig


def hf_to_config(data: dict[str, Any]) -> InternVLConfig:
    """Parse a transformers ``internvl`` config.json dict.

    When the file came from an official one (``ivl_official_extras``), the official config is rebuilt and
    parsed instead, so what HF cannot say (InternLM2 naming, template, tiling limits) survives.
    """
    plain = _hf_plain_config(data)
    extras = data.get(OFFICIAL_EXTRAS)
    if not extras:
        return plain
    official, _ = _restore(config_to_official(plain, dtype=config_dtype(data)), extras)
    official.pop(HF_EXTRAS, None)
    return official_to_config(official, image_token_id=plain.image_token_id)


def _hf_plain_config(data: dict[str, Any]) -> InternVLConfig:
    where = "config.json"
    vision_raw = dict(_require(data, "vision_config", where))
    text_raw = dict(_require(data, "text_config", where))
    text_type = text_raw.get("model_type", "qwen2")
    if text_type not in ("qwen2", "llama"):
        raise CheckpointError(f"{where}: unknown text_config model_type {text_type!r}; supported: qwen2, llama")
    if not vision_raw.get("use_mean_pooling", True):
        raise CheckpointError(f"{where}: vision_config.use_mean_pooling=false (a final ViT LayerNorm) is unsupported")
    strategy = data.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} is unsupported (need 'default')")
    for section, key, name in ((data, "projector_hidden_act", "gelu"), (vision_raw, "hidden_act", "gelu")):
        if section.get(key, name) != name:
            raise CheckpointError(f"{where}: {key} {section[key]!r} is unsupported (need {name!r})")
    layer = data.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} must be one layer index")

    defaults = VisionConfig()
    image_size = _as_int_size(vision_raw.get("image_size", defaults.image_size), "vision_config.image_size")
    vision = VisionConfig(
        model_type="intern_vit_6b",
        hidden_size=int(vision_raw.get("hidden_size", defaults.hidden_size)),
        num_hidden_layers=int(vision_raw.get("num_hidden_layers", defaults.num_hidden_layers)),
        num_attention_heads=int(vision_raw.get("num_attention_heads", defaults.num_attention_heads)),
        intermediate_size=int(vision_raw.get("intermediate_size", defaults.intermediate_size)),
        norm_type=vision_raw.get("norm_type", defaults.norm_type),
        layer_norm_eps=float(vision_raw.get("layer_norm_eps", defaults.layer_norm_eps)),
        qkv_bias=bool(vision_raw.get("attention_bias", False)),
        qk_normalization=bool(vision_raw.get("use_qk_norm", False)),
        patch_size=_as_int_size(vision_raw.get("patch_size", defaults.patch_size), "vision_config.patch_size"),
        image_size=image_size,
        num_channels=int(vision_raw.get("num_channels", defaults.num_channels)),
        drop_path_rate=float(vision_raw.get("drop_path_rate", 0.0)),
        initializer_factor=float(vision_raw.get("layer_scale_init_value", defaults.initializer_factor)),
        initializer_range=float(vision_raw.get("initializer_range", defaults.initializer_range)),
    )
    theta, scaling = _rope_from(text_raw)
    heads = int(_require(text_raw, "num_attention_heads", "text_config"))
    tie = data.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", True))  # HF's default ties
    text = TextConfig(
        flavour=text_type,
        vocab_size=int(_require(text_raw, "vocab_size", "text_config")),
        hidden_size=int(_require(text_raw, "hidden_size", "text_config")),
        num_hidden_layers=int(_require(text_raw, "num_hidden_layers", "text_config")),
        num_attention_heads=heads,
        num_key_value_heads=int(text_raw.get("num_key_value_heads") or heads),
        head_dim=_explicit_head_dim(text_raw),
        intermediate_size=int(_require(text_raw, "intermediate_size", "text_config")),
        rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(text_raw.get("max_position_embeddings", 32768)),
        attention_bias=True if text_type == "qwen2" else bool(text_raw.get("attention_bias", False)),
        tie_word_embeddings=bool(tie),
        bos_token_id=text_raw.get("bos_token_id"),
        eos_token_id=text_raw.get("eos_token_id"),
        pad_token_id=text_raw.get("pad_token_id"),
    )
    config = InternVLConfig(
        vision=vision,
        text=text,
        downsample_ratio=float(data.get("downsample_ratio", 0.5)),
        select_layer=int(layer),
        ps_version="v2",  # transformers implements v2 only
        template="internvl2_5",  # HF keeps the template in the tokenizer; these are InternVL-2.5's values
        image_token_id=int(data.get("image_token_id", 151667)),
        force_image_size=image_size,
        use_thumbnail=True,
        min_dynamic_patch=1,
        max_dynamic_patch=12,
    )
    config = _validated(config, where)
    seq = data.get("image_seq_length")
    if seq is not None and int(seq) != config.num_image_token:
        raise CheckpointError(
            f"{where}: image_seq_length {seq} disagrees with the vision geometry ({config.num_image_token} tokens "
            f"per {image_size}px tile)"
        )
    return config


def _explicit_head_dim(text_raw: dict[str, Any]) -> int | None:
    """transformers writes ``head_dim`` even when it is the default ``hidden / heads``; keep None then."""
    head_dim = text_raw.get("head_dim")
    if head_dim is None:
        return None
    if int(head_dim) * int(text_raw["num_attention_heads"]) == int(text_raw["hidden_size"]):
        return None
    return int(head_dim)


def config_to_hf(config: InternVLConfig, *, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """A transformers ``internvl`` config.json dict (``InternVLForConditionalGeneration``)."""
    if config.is_mono or config.text.visual_experts:
        raise CheckpointError("Mono-InternVL has no transformers-native layout; use layout='official'")
    if config.ps_version != "v2":
        raise CheckpointError(f"transformers implements ps_version v2 only, this model uses {config.ps_version!r}")
    name = dtype_name(parse_dtype(dtype)) if dtype is not None else None  # type: ignore[arg-type]
    vision, text = config.vision, config.text
    hf_text_type = "qwen2" if text.flavour == "qwen2" else "llama"
    rope_params: dict[str, Any] = {"rope_type": "default"}
    if text.rope_scaling:
        rope_params = {k: v for k, v in text.rope_scaling.items() if k != "type"}
        rope_params.setdefault("rope_type", text.rope_scaling.get("type", "default"))
    rope_params["rope_theta"] = text.rope_theta
    text_out: dict[str, Any] = {
        "model_type": hf_text_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        # both spellings: transformers 5 reads rope_parameters, older readers rope_theta/rope_scaling
        "rope_parameters": rope_params,
        "rope_theta": text.rope_theta,
        "rope_scaling": copy.deepcopy(text.rope_scaling),
        "tie_word_embeddings": text.tie_word_embeddings,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if hf_text_type == "llama":
        text_out["attention_bias"] = text.attention_bias
        text_out["mlp_bias"] = False
    elif not text.attention_bias:
        raise CheckpointError("the qwen2 flavour always has q/k/v biases; attention_bias=False cannot be saved")
    else:
        text_out["use_sliding_window"] = False
        text_out["sliding_window"] = None
    vision_out: dict[str, Any] = {
        "model_type": "internvl_vision",
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "hidden_act": "gelu",
        "norm_type": vision.norm_type,
        "layer_norm_eps": vision.layer_norm_eps,
        "attention_bias": vision.qkv_bias,
        "use_qk_norm": vision.qk_normalization,
        "image_size": [config.image_size, config.image_size],
        "patch_size": [vision.patch_size, vision.patch_size],
        "num_channels": vision.num_channels,
        "layer_scale_init_value": vision.initializer_factor,
        "initializer_range": vision.initializer_range,
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "attention_dropout": 0.0,
        "hidden_dropout_prob": 0.0,
        "projection_dropout": 0.0,
    }
    out: dict[str, Any] = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision_out,
        "text_config": text_out,
        "downsample_ratio": config.downsample_ratio,
        "image_token_id": config.image_token_id,
        "image_seq_length": config.num_image_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": text.tie_word_embeddings,  # HF's default is True; InternVL-2.5 is untied
    }
    if name is not None:
        out["torch_dtype"] = name
    return out


# ---------------------------------------------------------------------------------------------------------
# lossless layout-to-layout conversion of config.json


def _canon(value: Any) -> str:
    """Type-aware equality: ``1`` vs ``1.0`` vs ``True`` differ in JSON text, so they differ here."""
    return json.dumps(value, sort_keys=True)


def json_diff(original: dict[str, Any], regenerated: dict[str, Any]) -> dict[str, Any]:
    """What to apply to ``regenerated`` to get ``original`` back: ``{"set": nested values, "drop": [paths]}``."""
    set_: dict[str, Any] = {}
    drop: list[list[str]] = []

    def walk(orig: dict[str, Any], regen: dict[str, Any], path: list[str], out: dict[str, Any]) -> None:
        for key, value in orig.items():
            other = regen.get(key, _MISSING)
            if isinstance(value, dict) and isinstance(other, dict):
                child: dict[str, Any] = {}
                walk(value, other, [*path, key], child)
                if child:
                    out[key] = child
            elif other is _MISSING or _canon(value) != _canon(other):
                out[key] = {_LEAF: value} if isinstance(value, dict) else value
        drop.extend([*path, key] for key in regen if key not in orig)

    walk(original, regenerated, [], set_)
    return {"set": set_, "drop": drop}


_MISSING = object()
_LEAF = "__ivl_whole_value__"  # marks a dict value to be set as a whole (it replaced a non-dict)


def json_patch(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """Apply :func:`json_diff` output to (a copy of) ``base``."""
    out = copy.deepcopy(base)

    def apply(target: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in patch.items():
            if isinstance(value, dict) and _LEAF in value:
                target[key] = copy.deepcopy(value[_LEAF])
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                apply(target[key], value)
            else:
                target[key] = _unleaf(copy.deepcopy(value))

    apply(out, diff.get("set") or {})
    for path in diff.get("drop") or []:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def _unleaf(value: Any) -> Any:
    if isinstance(value, dict):
        if _LEAF in value:
            return value[_LEAF]
        return {k: _unleaf(v) for k, v in value.items()}
    return value


def _stash(original: dict[str, Any], regenerated: dict[str, Any], original_text: str | None) -> dict[str, Any]:
    """What ``regenerated`` lacks to become ``original`` (empty dict when nothing)."""
    extras: dict[str, Any] = {}
    diff = json_diff(original, regenerated)
    if diff["set"] or diff["drop"]:
        extras = diff
    if original_text is not None and dump_json(original) != original_text:
        extras["text"] = original_text  # non-standard formatting or key order: keep the exact bytes
    return extras


def _restore(regenerated: dict[str, Any], extras: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """Apply a stash; its exact text is used only when nothing was edited in between."""
    if not extras:
        return regenerated, dump_json(regenerated)
    restored = json_patch(regenerated, extras)
    text = extras.get("text")
    if text is not None:
        try:
            same = _canon(json.loads(text)) == _canon(restored)
        except ValueError:
            same = False
        if same:
            return restored, text
    return restored, dump_json(restored)


def _text_of(data: dict[str, Any], text: str | None) -> str | None:
    """The original file text, if it really is ``data`` (callers may pass edited dicts)."""
    if text is None:
        return None
    try:
        return text if json.loads(text) == data else None
    except ValueError:
        return None


def official_to_hf_dict(
    data: dict[str, Any],
    *,
    text: str | None = None,
    image_token_id: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[dict[str, Any], str]:
    """Official config.json -> transformers ``(dict, file text)``; what HF cannot hold goes to ``ivl_official_extras``.

    ``text`` is the original file content (to restore exotic formatting byte for byte later), ``image_token_id``
    the tokenizer's ``<IMG_CONTEXT>`` id, ``dtype`` a new ``torch_dtype`` (tensors are cast by the caller).
    """
    plain = {k: v for k, v in data.items() if k != HF_EXTRAS}
    config = official_to_config(plain, image_token_id=image_token_id)
    source = config_dtype(plain)
    target = parse_dtype(dtype) if dtype is not None else source
    hf, hf_text = _restore(config_to_hf(config, dtype=target), data.get(HF_EXTRAS))
    regenerated = config_to_official(_hf_plain_config(hf), dtype=source)
    stash = _stash(plain, regenerated, _text_of(data, text) if HF_EXTRAS not in data else None)
    if stash:
        hf[OFFICIAL_EXTRAS] = stash
        hf_text = dump_json(hf)
    return hf, hf_text


def hf_to_official_dict(
    data: dict[str, Any],
    *,
    text: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[dict[str, Any], str]:
    """Transformers config.json -> official ``(dict, file text)``; restores ``ivl_official_extras`` and stashes
    what official configs cannot hold under ``ivl_hf_extras``."""
    plain = {k: v for k, v in data.items() if k != OFFICIAL_EXTRAS}
    config = _hf_plain_config(plain)
    source = config_dtype(plain)
    target = parse_dtype(dtype) if dtype is not None else source
    official, official_text = _restore(config_to_official(config, dtype=target), data.get(OFFICIAL_EXTRAS))
    reparsed = official_to_config(official, image_token_id=config.image_token_id)
    regenerated = config_to_hf(reparsed, dtype=source)
    stash = _stash(plain, regenerated, _text_of(data, text) if OFFICIAL_EXTRAS not in data else None)
    if stash:
        official[HF_EXTRAS] = stash
        official_text = dump_json(official)
    return official, official_text
