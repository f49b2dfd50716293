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
