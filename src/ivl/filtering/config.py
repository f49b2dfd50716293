"""The filter run's configuration (YAML ⇄ dataclasses) and the default chain of rules.

Relative paths in a YAML file are taken relative to that file, so a config travels with its data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ivl.errors import ConfigError

# Importing the rule modules registers their rules.
from ivl.filtering import heuristics, repetition, scoring  # noqa: F401
from ivl.filtering.rules import RULES, Action, Rule, build_rule

#: Order in which rules run when the config names no ``chain``: cheap structure checks first, media I/O
#: late, LLM judges last (they only see records every other rule kept).
DEFAULT_CHAIN = [
    "turn_order",
    "image_placeholders",
    "answer_length",
    "encoding",
    "zero_run",
    "char_run",
    "ngram_repetition",
    "phrase_loop",
    "substring_loop",
    "duplicate_lines",
    "sentence_length",
    "media",
    "degenerate_image",
    "llm_repetition",
    "llm_quality",
]


@dataclass
class InputSpec:
    """One annotation file; ``root`` is its media folder (default: the file's own folder)."""

    path: str
    root: str | None = None
    domain: str | None = None
    skip_rules: list[str] = field(default_factory=list)
    name: str | None = None

    @property
    def media_root(self) -> str:
        return str(Path(self.path).parent) if self.root is None else self.root

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class ScorerConfig:
    """Where LLM scores come from: an OpenAI-compatible endpoint, or a local ivl checkpoint."""

    kind: Literal["openai", "local"] = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key_env: str | None = "OPENAI_API_KEY"
    checkpoint: str | None = None
    concurrency: int = 8
    rate_limit: float | None = None
    max_retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    max_tokens: int = 64
    temperature: float = 0.0
    batch_size: int = 64
    on_error: Literal["stop", "review"] = "stop"

    def validate(self) -> None:
        if self.kind not in ("openai", "local"):
            raise ConfigError(f"scorer.kind must be openai or local, got {self.kind!r}")
        if self.kind == "local" and not self.checkpoint:
            raise ConfigError("scorer.kind local needs scorer.checkpoint (an ivl checkpoint folder)")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ConfigError(
                f"scorer.batch_size and scorer.concurrency must be >= 1, got {self.batch_size}, {self.concurrency}"
            )
        if self.on_error not in ("stop", "review"):
            raise ConfigError(f"scorer.on_error must be stop or review, got {self.on_error!r}")


@dataclass
class FilterConfig:
    """Everything one ``ivl filter`` run needs. ``rules`` holds per-rule parameters by rule name."""

    inputs: list[InputSpec]
    output_dir: str = "filtered"
    chain: list[str] | None = None
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_action: Action = "reject"
    scorer: ScorerConfig | None = None
    prompts_dir: str | None = None
    workers: int = 1
    chunk_size: int = 256
    commit_every_s: float = 1.0
    resume: bool = True
    write_scores: bool = True
    shard_index: int = 0
    num_shards: int = 1

    def validate(self) -> FilterConfig:
        if not self.inputs:
            raise ConfigError("filter config needs at least one input (inputs: or meta:)")
        if self.workers < 1 or self.chunk_size < 1:
            raise ConfigError(f"workers and chunk_size must be >= 1, got {self.workers}, {self.chunk_size}")
        if self.commit_every_s < 0:
            raise ConfigError(f"commit_every_s must be >= 0 (0 commits after every chunk), got {self.commit_every_s}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard {self.shard_index}/{self.num_shards} is invalid: need 0 <= index < count")
        if self.default_action not in ("reject", "review"):
            raise ConfigError(f"default_action must be reject or review, got {self.default_action!r}")
        unknown = sorted(set(self.rules) - set(RULES))
        if unknown:
            raise ConfigError(f"rules: unknown rule(s) {unknown}; known: {', '.join(sorted(RULES))}")
        for spec in self.inputs:
            bad = sorted(set(spec.skip_rules) - set(RULES))
            if bad:
                raise ConfigError(f"input {spec.path}: skip_rules names unknown rule(s) {bad}")
        if self.scorer is not None:
            self.scorer.validate()
        self.build_rules()
        return self

    def build_rules(self) -> list[Rule]:
        """Enabled rules in chain order, with ``default_action`` filled in where a rule sets none."""
        names = self.chain if self.chain is not None else DEFAULT_CHAIN
        if self.chain is not None:
            missing = sorted(set(self.rules) - set(names))
            if missing:
                raise ConfigError(f"rules {missing} have parameters but are not in chain {names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"chain names a rule twice: {names}")
        built = []
        for name in names:
            params = dict(self.rules.get(name) or {})
            params.setdefault("action", self.default_action)
            rule = build_rule(name, params)
            if rule.enabled:
                built.append(rule)
        return built

    def fingerprint(self, include_shard: bool = True) -> str:
        """Hash of everything that changes which output a record lands in (not workers or chunk size).

        Without the shard it identifies the filter setup, so shards of one job can be merged safely.
        """
        scorer = None
        if self.scorer is not None:
            scorer = {
                k: getattr(self.scorer, k)
                for k in ("kind", "base_url", "model", "checkpoint", "max_tokens", "temperature")
            }
        payload = {
            "inputs": [dataclasses.asdict(s) for s in self.inputs],
            "rules": [{"name": r.name, **dataclasses.asdict(r)} for r in self.build_rules()],
            "scorer": scorer,
            "prompts_dir": self.prompts_dir,
            "write_scores": self.write_scores,
            "shard": [self.shard_index, self.num_shards] if include_shard else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None) -> FilterConfig:
        """Build from a YAML mapping; relative paths are resolved against ``base_dir``."""
        if not isinstance(data, dict):
            raise ConfigError(f"filter config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        base = Path(base_dir) if base_dir is not None else Path.cwd()

        def path(value: Any, what: str) -> str:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{what} must be a non-empty path string, got {value!r}")
            return value if os.path.isabs(value) or "://" in value else str(base / value)

        inputs = [_input_spec(item, i, path) for i, item in enumerate(data.pop("inputs", None) or [])]
        meta = data.pop("meta", None)
        if meta is not None:
            from ivl.data.records import load_meta

            for entry in load_meta(path(meta, "meta")):
                inputs.append(InputSpec(path=entry.annotation, root=entry.root, name=entry.name))
        scorer_data = data.pop("scorer", None)
        scorer = None
        if scorer_data is not None:
            scorer = _dataclass_from(ScorerConfig, scorer_data, "scorer")
            if scorer.checkpoint:
                scorer.checkpoint = path(scorer.checkpoint, "scorer.checkpoint")
        shard = data.pop("shard", None)
        if shard is not None:
            data["shard_index"], data["num_shards"] = parse_shard(str(shard))
        for key in ("output_dir", "prompts_dir"):
            if data.get(key) is not None:
                data[key] = path(data[key], key)
        rules = data.get("rules") or {}
        if not isinstance(rules, dict) or not all(isinstance(v, dict | type(None)) for v in rules.values()):
            raise ConfigError("rules must map rule names to parameter mappings")
        data["rules"] = {k: dict(v or {}) for k, v in rules.items()}
        try:
            config = cls(inputs=inputs, scorer=scorer, **data)
        except TypeError as exc:
            raise ConfigError(f"unknown filter config field: {exc}") from exc
        return config.validate()


def _input_spec(item: Any, index: int, path: Any) -> InputSpec:
    if isinstance(item, str):
        return InputSpec(path=path(item, f"inputs[{index}]"))
    if not isinstance(item, dict):
        raise ConfigError(f"inputs[{index}] must be a path or a mapping, got {item!r}")
    item = dict(item)
    file = item.pop("path", None) or item.pop("annotation", None)
    spec = _dataclass_from(InputSpec, {"path": path(file, f"inputs[{index}].path"), **item}, f"inputs[{index}]")
    if spec.root:
        spec.root = path(spec.root, f"inputs[{index}].root")
    if not isinstance(spec.skip_rules, list):
        raise ConfigError(f"inputs[{index}].skip_rules must be a list of rule names")
    return spec


def _dataclass_from(cls: Any, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}") from exc
    if not 0 <= index < count:
        raise ConfigError(f"shard {text!r} is invalid: need 0 <= i < n")
    return index, count


def load_filter_config(path: str | os.PathLike[str], **overrides: Any) -> FilterConfig:
    """Read a YAML filter config; keyword overrides (e.g. ``output_dir``, ``workers``) win over the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"filter config {str(path)!r} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"filter config {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"filter config {str(path)!r} must be a mapping")
    for key, value in overrides.items():
        if value is not None:
            # Paths given on the command line are relative to the working directory, not to the YAML file.
            data[key] = str(Path(value).resolve()) if key in ("output_dir", "prompts_dir") else value
    return FilterConfig.from_dict(data, base_dir=path.parent)
