"""The `ivl` command line. Each command imports its heavy modules inside the function, so `ivl --help` is instant.

Helpers adding a command: put the work in a library function and keep the command a thin wrapper here.
"""

from __future__ import annotations

import typer

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, no_args_is_help=True, help="InternVL-2.5 and Mono-InternVL toolkit.")


def main() -> None:
    """Entry point: typed ivl errors become one readable line and exit code 2, not a traceback."""
    from ivl.errors import IvlError

    try:
        app()
    except IvlError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


@app.command()
def version() -> None:
    """Print the ivl version."""
    from ivl import __version__

    typer.echo(__version__)


# ---- commands are registered below, one block per command ----


@app.command("filter")
def filter_command(
    config: str | None = typer.Argument(None, help="filter config YAML (inputs, rules, scorer; see docs/formats.md)"),
    output: str | None = typer.Option(None, "--output", "-o", help="output folder (overrides output_dir)"),
    workers: int | None = typer.Option(None, help="worker processes for the model-free rules"),
    shard: str | None = typer.Option(None, help="run shard i/n of every input (byte ranges cut at line starts)"),
    restart: bool = typer.Option(False, help="discard a previous run in the output folder instead of resuming"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar with records/s"),
    merge: list[str] | None = typer.Option(None, "--merge", help="shard output folder to merge into --output (repeat)"),
) -> None:
    """Filter official-format JSONL into kept/rejected/review.jsonl with repetition, heuristic and LLM rules."""
    from pathlib import Path

    from ivl.errors import ConfigError
    from ivl.filtering.pipeline import format_summary, merge_outputs, run_filter

    if merge:
        if not output:
            raise ConfigError("--merge needs --output, the folder to write the merged outputs and summary to")
        summary = merge_outputs(merge, output)
        typer.echo(format_summary(summary))
        typer.echo(f"merged {len(merge)} shard folder(s) into {Path(output).resolve()}")
        return
    if not config:
        raise ConfigError("give a filter config YAML, or --merge shard folders with --output")
    from ivl.filtering.config import load_filter_config

    cfg = load_filter_config(config, output_dir=output, workers=workers, shard=shard)
    summary = run_filter(cfg, restart=restart, progress=progress)
    typer.echo(format_summary(summary))
    typer.echo(f"outputs in {cfg.output_dir}: kept.jsonl rejected.jsonl review.jsonl scores.jsonl summary.json")


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="directory to write the world to"),
    seed: int = typer.Option(0, help="same seed, same bytes"),
    train: int = typer.Option(1000, help="train records per task"),
    val: int = typer.Option(100, help="val records per task"),
    test: int = typer.Option(200, help="test records per task"),
    tasks: str = typer.Option("", help="comma-separated subset of tasks (default: all)"),
    min_size: int = typer.Option(56, help="smallest long side of an image, px"),
    max_size: int = typer.Option(224, help="largest long side of an image, px"),
    absolute_paths: bool = typer.Option(False, help="write absolute root/annotation paths in the meta files"),
    overwrite: bool = typer.Option(False, help="replace an existing synthetic world in --out"),
) -> None:
    """Generate the seeded synthetic visual world (train/val/test) in the official meta + JSONL format."""
    from ivl.data.synthetic import generate_world

    summary = generate_world(
        out,
        seed=seed,
        n_train=train,
        n_val=val,
        n_test=test,
        image_size_range=(min_size, max_size),
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] or None,
        absolute_paths=absolute_paths,
        overwrite=overwrite,
    )
    for split, per_task in summary.counts.items():
        if per_task:
            listing = " ".join(f"{t}={n}" for t, n in per_task.items())
            typer.echo(f"{split}: {sum(per_task.values())} records  {listing}")
    typer.echo("chance: " + " ".join(f"{t}={c:.3f}" for t, c in summary.chance.items()))
    typer.echo(f"wrote {summary.n_files} files to {summary.out_dir}")


@app.command()
def info(
    model: str = typer.Argument(..., help="preset name (e.g. internvl2_5-8b, tiny) or checkpoint directory"),
    context: int = typer.Option(8192, help="tokens of KV cache to budget for inference"),
    gpus: int = typer.Option(1, help="ranks that shard training state (FSDP)"),
) -> None:
    """Parameter counts per component and memory for inference and training."""
    from ivl.info import print_info

    print_info(model, context_tokens=context, gpus=gpus)


if __name__ == "__main__":  # pragma: no cover
    main()
