"""`ivl info`: parameter counts per component and the memory a model needs, printed as a table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ivl.config import InternVLConfig, get_preset
from ivl.sizing import GIB, inference_memory, parameter_counts, training_memory


def resolve_config(preset_or_path: str) -> InternVLConfig:
    """A preset name, or a checkpoint directory in either supported layout."""
    if Path(preset_or_path).is_dir():
        from ivl.checkpoint.io import read_checkpoint_config

        return read_checkpoint_config(preset_or_path)[1]
    return get_preset(preset_or_path)


def info_table(config: InternVLConfig, *, context_tokens: int = 8192, gpus: int = 1) -> tuple[Table, Table]:
    counts = parameter_counts(config)
    params = Table(title=f"{config.name}: parameters")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for key in (
        "vision",
        "connector",
        "language",
        "language.embeddings",
        "language.layers",
        "language.visual_experts",
        "language.lm_head",
        "total",
    ):
        if key == "language.visual_experts" and not counts[key]:
            continue
        value = counts[key]
        params.add_row(key.replace("language.", "  "), f"{value:,}", f"{value / counts['total']:.1%}")

    memory = Table(title=f"memory (GiB; activations excluded; training sharded over {gpus} GPU(s))")
    memory.add_column("use")
    for column in ("weights", "gradients", "optimizer", "KV cache", "total"):
        memory.add_column(column, justify="right")
    infer = inference_memory(config, context_tokens=context_tokens)
    rows = [(f"bf16 inference, {context_tokens} tokens", infer)]
    for label, trainable in (
        ("full training, AdamW", counts["total"]),
        ("stage 1 (mlp1 only)", counts["connector"]),
        ("stage 1.5 (ViT + mlp1)", counts["vision"] + counts["connector"]),
    ):
        rows.append((label, training_memory(config, trainable=trainable, shards=gpus)))
    for label, est in rows:
        memory.add_row(
            label, *(f"{v / GIB:.2f}" for v in (est.weights, est.gradients, est.optimizer, est.kv_cache, est.total))
        )
    return params, memory


def print_info(preset_or_path: str, *, context_tokens: int = 8192, gpus: int = 1) -> None:
    console = Console()
    for table in info_table(resolve_config(preset_or_path), context_tokens=context_tokens, gpus=gpus):
        console.print(table)
