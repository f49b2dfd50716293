"""Training recipes: YAML files (with ``inherit:``) plus ``key=value`` command-line overrides.

A recipe has six sections — ``model``, ``data``, ``stage`` (the freeze plan), ``optim``, ``train``, ``lora``
— each a dataclass below, so every field has a default, a type and a docstring-like comment. Unknown keys
are errors that name the key and the file, so a typo never silently trains with a default.

    recipe = load_recipe("recipes/internvl2_5/stage2_8b.yaml", ["optim.lr=1e-5", "train.max_steps=100"])
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ivl.errors import ConfigError


@dataclass
class ModelSection:
    preset: str | None = None  # a config preset (``ivl info`` lists them); random init
    checkpoint: str | None = None  # a checkpoint directory to start from (official or hf layout)
    config: dict[str, Any] = field(default_factory=dict)  # nested overrides, e.g. {text: {hidden_size: 128}}
    tokenizer: str | None = None  # tokenizer directory (default: the checkpoint directory)
    init_new_tokens: bool = False  # spec §6.9: output rows of the InternVL special tokens := mean row
    visual_experts_from_text: bool = False  # Mono-InternVL: copy each text FFN into its visual expert at start
    seed: int = 0  # random init of a preset model


@dataclass
class DataSection:
    meta: str | None = None  # official meta JSON ({name: {root, annotation, repeat_time, ...}})
    max_packed_tokens: int = 16384
    max_packed_tiles: int = 48
    max_buffer_size: int = 20
    max_length: int | None = None  # per-sample truncation (default: max_packed_tokens)
    overlong: Literal["truncate", "reject"] = "truncate"
    loss_reduction: Literal["token", "sample", "square"] = "square"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12  # n_max unless the meta entry sets max_dynamic_patch
    use_thumbnail: bool = True
    augment: bool = True  # honour the meta ``data_augment`` flags (random JPEG)
    weighting: Literal["length", "sqrt"] = "length"
    subsample: Literal["random", "prefix"] = "random"
    num_epochs: int | None = 1  # passes over the mixture; None = endless (stop at train.max_steps)
    min_num_frames: int = 8  # video frames drawn per sample (uniform in [min, max])
    max_num_frames: int = 32
    num_workers: int = 0  # DataLoader worker processes per stream
    skip_bad_records: bool = False  # skip (and log) unreadable records instead of failing
    media_cache_mb: int = 0  # keep decoded images/videos in memory up to this size (per worker); 0: off
    seed: int = 0


@dataclass
class StageSection:
    name: str = "stage2"  # stage1 | stage1_5 | stage2 | lm_warmup | mono_s1_1 | mono_s1_2 | mono_s1_3 | mono_sft
    vision: bool | None = None  # overrides of the named freeze plan (None: the plan's value)
    mlp: bool | None = None
    llm: bool | None = None
    unfreeze_vit_layers: int | None = None
    vision_patterns: list[str] | None = None
    llm_patterns: list[str] | None = None
    vision_drop_path: float | None = None

    def plan_overrides(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        out = {k: v for k, v in out.items() if v is not None}
        for key in ("vision_patterns", "llm_patterns"):
            if key in out:
                out[key] = tuple(out[key])
        return out


@dataclass
class OptimSection:
    lr: float = 4e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int | None = None  # explicit warm-up steps win over warmup_ratio
    warmup_ratio: float | None = 0.03
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr (official: 0)
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping


@dataclass
class TrainSection:
    output_dir: str = "runs/train"
    max_steps: int = 1000  # optimizer steps; the cosine schedule spans them
    global_batch_size: int | None = None  # micro-batches per step over all ranks (default: world × accum)
    grad_accum: int | None = None  # micro-batches per rank per step (default from global_batch_size, else 1)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 mixed precision on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda
    fsdp: Literal["auto", "on", "off"] = "auto"  # auto: FSDP2 when more than one rank
    save_steps: int | None = None  # checkpoint every N steps (and at the end)
    save_total_limit: int | None = 2  # resumable checkpoints kept
    save_final: bool = True  # final model in the official layout (DIR/final)
    log_steps: int = 1
    resume: str | None = "auto"  # auto: latest checkpoint in output_dir if any; a path; or none
    seed: int = 0
    progress: bool = True  # rich progress bar
    threads: int | None = None  # torch CPU threads (None: torch's default)
    #: end within this many seconds of the run's start: fewer steps than max_steps if the measured speed says
    #: they will not fit, over a cosine schedule re-spanned to match (ivl.training.time_budget); fresh runs only
    time_budget_s: float | None = None


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int | None = None  # default 2·r (official)
    dropout: float = 0.05
    llm: bool = True
    vision: bool = False
    llm_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    vision_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    stage: StageSection = field(default_factory=StageSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = "<memory>"  # where it was read from (not a recipe key)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def validate(self) -> Recipe:
        where = self.source
        if self.model.preset is None and self.model.checkpoint is None:
            raise ConfigError(f"{where}: model.preset or model.checkpoint is required")
        if self.train.max_steps < 1:
            raise ConfigError(f"{where}: train.max_steps must be >= 1, got {self.train.max_steps}")
        if self.data.media_cache_mb < 0:
            raise ConfigError(f"{where}: data.media_cache_mb must be >= 0, got {self.data.media_cache_mb}")
        if self.data.num_workers < 0:
            raise ConfigError(f"{where}: data.num_workers must be >= 0, got {self.data.num_workers}")
        budget = self.train.time_budget_s
        if budget is not None and not (budget > 0 and math.isfinite(budget)):
            raise ConfigError(f"{where}: train.time_budget_s must be > 0 seconds and finite, got {budget}")
        for key in ("grad_accum", "global_batch_size", "save_steps"):
            value = getattr(self.train, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}: train.{key} must be >= 1, got {value}")
        if self.optim.lr <= 0:
            raise ConfigError(f"{where}: optim.lr must be > 0, got {self.optim.lr}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"{where}: optim.betas must be two numbers, got {self.optim.betas}")
        if self.lora.enabled and self.lora.r < 1:
            raise ConfigError(f"{where}: lora.r must be >= 1, got {self.lora.r}")
        from ivl.training.stages import plan_for

        plan_for(self.stage.name, **self.stage.plan_overrides())
        return self

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        if self.train.grad_accum is not None:
            if (
                self.train.global_batch_size is not None
                and self.train.global_batch_size != self.train.grad_accum * world_size
            ):
                raise ConfigError(
                    f"{self.source}: train.global_batch_size {self.train.global_batch_size} != grad_accum "
                    f"{self.train.grad_accum} x world size {world_size}"
                )
            return self.train.grad_accum
        if self.train.global_batch_size is None:
            return 1
        if self.train.global_batch_size % world_size:
            raise ConfigError(
                f"{self.source}: train.global_batch_size {self.train.global_batch_size} is not a multiple of the "
                f"world size {world_size}"
            )
        return self.train.global_batch_size // world_size


_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "stage": StageSection,
    "optim": OptimSection,
    "train": TrainSection,
    "lora": LoraSection,
}


# --------------------------------------------------------------------------------------------------------
# building dataclasses from plain data, with type checks


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {names}")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**values)


def recipe_from_dict(data: dict[str, Any], source: str = "<memory>") -> Recipe:
    """Build and validate a recipe from a plain mapping (sections may be omitted)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    allowed = {"name", *_SECTIONS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown recipe section(s) {unknown}; known: {sorted(allowed)}")
    sections = {name: _build(cls, data.get(name) or {}, f"{source}: {name}") for name, cls in _SECTIONS.items()}
    name = data.get("name", Path(source).stem if source != "<memory>" else "recipe")
    return Recipe(name=str(name), source=source, **sections).validate()


# --------------------------------------------------------------------------------------------------------
# files, inheritance, overrides


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursively for nested mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe mapping of a YAML file with its ``inherit:`` chain resolved (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"{path}: recipe inheritance loops through {' -> '.join(map(str, _chain))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: recipe file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    parents = data.pop("inherit", None)
    if parents is None:
        return data
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else list(parents):
        merged = deep_merge(merged, read_recipe_file(path.parent / parent, (*_chain, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` → (["optim", "lr"], 1e-4); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return parts, value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in a copy of ``data`` (intermediate mappings are created)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _fix_numbers(data: Any, hint: Any = None) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: turn numeric strings into floats where a number is expected."""
    if isinstance(data, dict):
        return {k: _fix_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_numbers(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and any(c in data.lower() for c in "e."):
        return float(data)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (resolving ``inherit:``), apply ``key=value`` overrides, validate."""
    data = read_recipe_file(path)
    data = apply_overrides(data, list(overrides or []))
    return recipe_from_dict(_fix_numbers(data), str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe (every default spelled out) next to a run, for reproducibility."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
