"""``ivl mono init``: turn a plain InternLM2 (or Qwen2) checkpoint into a Mono-InternVL starting point.

What it does (spec mono-internvl §5.7, §6; internvl-2.5 §6.9):

* the decoder keeps every language weight bit for bit, and each layer gains a visual FFN expert that is a
  copy of its text FFN, so text-only outputs are exactly the source LLM's;
* the patch embedding (conv + CLS + position table) and ``mlp1`` are freshly initialised (seeded);
* the nine InternVL tokens are added to the tokenizer if missing; the vocabulary is resized to the
  tokenizer's length; new output rows get the mean of the other output rows, new input rows the mean input row;
* the result is written in the official Mono layout (``InternVLChatModel`` + ``InternLM2VEForCausalLM``,
  ``intern_vit_patch``), with the tokenizer files.

A Qwen2 source becomes the ``internlm2`` decoder flavour with q/k/v biases (the only official expert layout);
its tied embeddings are untied (the InternLM2 layout has a separate ``output`` head).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivl.checkpoint import configs
from ivl.config import InternVLConfig, MonoConfig, VisionConfig
from ivl.errors import CheckpointError, ConfigError

#: Source LLM architectures (config.json ``architectures[0]``) -> our decoder flavour.
SOURCE_ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2"}
#: The chat template a Mono model gets by default, per source flavour.
DEFAULT_TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "internvl2_5"}
#: Remote modelling code of the source LLM no longer describes the written model; tokenizer code is kept.
_DROPPED_FILES = ("modeling_", "configuration_")


@dataclass
class MonoInitReport:
    """What ``init_mono_from_llm`` wrote."""

    out_dir: Path
    source_architecture: str
    vocab_size: int
    added_tokens: list[str]
    image_token_id: int
    vision_width: int
    dtype: torch.dtype
    parameters: int


# --------------------------------------------------------------------------------------------------------
# reading the source LLM


def read_llm_config(llm_dir: str | Path) -> tuple[dict[str, Any], str]:
    """(config.json of a plain LLM checkpoint, its architecture); CheckpointError for other kinds."""
    path = Path(llm_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{llm_dir}: no config.json (expected a plain InternLM2 or Qwen2 checkpoint)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    archs = data.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SOURCE_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not a plain LLM ivl can start Mono-InternVL from; "
            f"supported: {', '.join(SOURCE_ARCHITECTURES)}"
        )
    if data.get("use_sliding_window"):
        raise CheckpointError(f"{path}: use_sliding_window=true is not supported (full attention only)")
    return data, arch


def load_llm_state(llm_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a plain LLM checkpoint: sharded or single safetensors, else PyTorch ``.bin`` files."""
    from safetensors.torch import load_file

    directory = Path(llm_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        index = directory / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid weight index ({exc})") from exc
        elif (directory / single).is_file():
            files = [single]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for name in files:
            file = directory / name
            if not file.is_file():
                raise CheckpointError(f"{directory}: weight file {name} listed in {index_name} is missing")
            if name.endswith(".safetensors"):
                state.update(load_file(str(file)))
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    raise CheckpointError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_source_tokenizer(llm_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds here (missing files, remote code refused)
        hint = "" if trust_remote_code else " (a tokenizer with its own code needs --trust-remote-code)"
        raise CheckpointError(f"{llm_dir}: cannot load the tokenizer: {exc}{hint}") from exc


def add_internvl_tokens(tokenizer: Any) -> list[str]:
    """Append the missing InternVL tokens (spec order) as special tokens; returns the ones added."""
    from ivl.processing.tokenizer import INTERNVL_TOKENS

    vocab = tokenizer.get_vocab()
    missing = [t for t in INTERNVL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


# --------------------------------------------------------------------------------------------------------
# config and weights


def mono_config_for(
    llm_config: dict[str, Any],
    architecture: str,
    *,
    vocab_size: int,
    image_token_id: int,
    vision_width: int = 1024,
    template: str | None = None,
    name: str = "mono-init",
) -> MonoConfig:
    """The Mono config around a source LLM config (its numbers parsed by the official-config reader)."""
    flavour = SOURCE_ARCHITECTURES[architecture]
    if vision_width < 1:
        raise ConfigError(f"vision width must be positive, got {vision_width}")
    wrapper = {
        # a placeholder vision section only so that the official reader accepts the LLM part
        "vision_config": {"model_type": "intern_vit_6b", "hidden_size": vision_width, "num_attention_heads": 1},
        "llm_config": {**llm_config, "vocab_size": vocab_size},
        "ps_version": "v2",
    }
    parsed = configs.official_to_config(wrapper, image_token_id=image_token_id)
    text = dataclasses.replace(parsed.text, flavour="internlm2", visual_experts=True, tie_word_embeddings=False)
    return MonoConfig(
        vision=VisionConfig(model_type="intern_vit_patch", hidden_size=vision_width, num_hidden_layers=0),
        text=text,
        image_token_id=image_token_id,
        template=template or DEFAULT_TEMPLATES[flavour],
        name=name,
    ).validate()


def _source_config(config: InternVLConfig, flavour: str) -> InternVLConfig:
    """The config the source weights' names follow (for the key map): no experts, the source flavour."""
    text = dataclasses.replace(config.text, flavour=flavour, visual_experts=False)
    return InternVLConfig(vision=VisionConfig(), text=text, image_token_id=config.image_token_id)


def _resize_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Keep the first rows; rows beyond the old size get the mean old row (computed in fp32)."""
    old = weight.shape[0]
    out = weight.new_empty(rows, weight.shape[1])
    keep = min(old, rows)
    out[:keep] = weight[:keep]
    if rows > old:
        out[old:] = weight.float().mean(0).to(weight.dtype)
    return out


def language_state(
    source: dict[str, torch.Tensor],
    config: MonoConfig,
    flavour: str,
    new_token_ids: list[int],
    tied: bool,
) -> dict[str, torch.Tensor]:
    """Source LLM tensors -> the Mono ``language_model`` state: renamed, resized, untied, experts = text FFN."""
    from ivl.checkpoint.keymap import official_to_ours

    prefixed = {f"language_model.{k}": v for k, v in source.items()}
    try:
        mapped = official_to_ours(prefixed, _source_config(config, flavour))
    except CheckpointError as exc:
        raise CheckpointError(f"source LLM weights do not follow the {flavour} layout: {exc}") from exc
    state = {k.removeprefix("language_model."): v for k, v in mapped.items()}
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    if embed_key not in state:
        raise CheckpointError(f"source LLM weights have no token embedding ({embed_key} after renaming)")
    if head_key not in state:
        if not tied:
            raise CheckpointError("source LLM weights have no output head and its config does not tie embeddings")
        state[head_key] = state[embed_key].clone()  # untie: the InternLM2 layout stores `output` separately
    vocab = config.text.vocab_size
    state[embed_key] = _resize_rows(state[embed_key], vocab)
    head = _resize_rows(state[head_key], vocab)
    if new_token_ids:  # spec §6.9: output rows of new tokens := mean of all other output rows
        new = torch.tensor(sorted(new_token_ids))
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[new] = False
        head[new] = head[keep].float().mean(0).to(head.dtype)
    state[head_key] = head
    for key in [k for k in state if ".mlp." in k]:
        state[key.replace(".mlp.", ".mlp_visual.")] = state[key].clone()
    return state


@torch.no_grad()
def _fresh_visual_embedding(model: nn.Module, seed: int, dtype: torch.dtype) -> None:
    """Materialise and initialise the patch stem and mlp1 (seeded, independent of the global RNG state)."""
    from ivl.models.decoder import init_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in (model.vision_model, model.mlp1):
            module.to_empty(device="cpu")
            init_weights(module)
        model.vision_model.embeddings.reset_parameters()
    model.vision_model.to(dtype)
    model.mlp1.to(dtype)


def _main_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts:
        raise CheckpointError("source LLM checkpoint holds no floating-point tensors")
    return max(counts, key=counts.__getitem__)


# --------------------------------------------------------------------------------------------------------
# the command


def build_mono_from_llm(
    llm_dir: str | Path,
    *,
    vision_width: int = 1024,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    template: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, MonoInitReport]:
    """(MonoInternVL, tokenizer with the InternVL tokens, report) built in memory from a plain LLM checkpoint."""
    from ivl.checkpoint.io import empty_model
    from ivl.models.mono import MonoInternVL, load_state_strict

    llm_dir = Path(llm_dir)
    llm_config, arch = read_llm_config(llm_dir)
    flavour = SOURCE_ARCHITECTURES[arch]
    tokenizer = load_source_tokenizer(llm_dir, trust_remote_code=trust_remote_code)
    added = add_internvl_tokens(tokenizer)
    image_token_id = int(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    source_vocab = int(llm_config.get("vocab_size", 0))
    vocab_size = len(tokenizer) if added or len(tokenizer) > source_vocab else source_vocab
    new_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in added]

    config = mono_config_for(
        llm_config, arch, vocab_size=vocab_size, image_token_id=image_token_id, vision_width=vision_width,
        template=template, name=llm_dir.name,
    )  # fmt: skip
    source = load_llm_state(llm_dir)
    target = configs.parse_dtype(dtype, "dtype") if dtype is not None else _main_dtype(source)
    tied = bool(llm_config.get("tie_word_embeddings", False))
    state = language_state(source, config, flavour, new_ids, tied)
    del source
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}

    model = empty_model(config)
    load_state_strict(model.language_model, state, f"{llm_dir} (language model)")
    _fresh_visual_embedding(model, seed, target)
    leftovers = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if leftovers:  # every tensor is loaded or initialised above; guard against future model additions
        raise CheckpointError(f"tensors left uninitialised: {leftovers[:8]}")
    mono = MonoInternVL.from_internvl(model.eval())
    report = MonoInitReport(
        out_dir=Path("."),
        source_architecture=arch,
        vocab_size=vocab_size,
        added_tokens=added,
        image_token_id=image_token_id,
        vision_width=vision_width,
        dtype=target,
        parameters=sum(p.numel() for p in mono.parameters()),
    )
    return mono, tokenizer, report


def init_mono_from_llm(
    llm_dir: str | Path,
    out_dir: str | Path,
    *,
    vision_width: int = 1024,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    template: str | None = None,
    trust_remote_code: bool = False,
    max_shard_size: str | int = "5GB",
) -> MonoInitReport:
    """Build a Mono-InternVL from ``llm_dir`` and write it to ``out_dir`` (official layout, atomic, + tokenizer)."""
    from ivl.checkpoint.io import copy_auxiliary_files, save_model

    if Path(out_dir).resolve() == Path(llm_dir).resolve():
        raise CheckpointError(f"--out {out_dir} is the source directory; write the Mono model elsewhere")
    model, tokenizer, report = build_mono_from_llm(
        llm_dir, vision_width=vision_width, seed=seed, dtype=dtype, template=template,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as aux_dir:
        aux = Path(aux_dir)
        copy_auxiliary_files(llm_dir, aux)
        for file in aux.iterdir():
            if file.is_file() and file.suffix == ".py" and file.name.startswith(_DROPPED_FILES):
                file.unlink()
        tokenizer.save_pretrained(str(aux))
        save_model(model, out_dir, layout="official", max_shard_size=max_shard_size, copy_files_from=aux)
    report.out_dir = Path(out_dir)
    return report
