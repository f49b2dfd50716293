"""The `ivl` command line. Each command imports its heavy modules inside the function, so `ivl --help` is instant.

Helpers adding a command: put the work in a library function and keep the command a thin wrapper here.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="InternVL-2.5 and Mono-InternVL toolkit.")


def main() -> None:
    app()


@app.command()
def version() -> None:
    """Print the ivl version."""
    from ivl import __version__

    typer.echo(__version__)


# ---- commands are registered below, one block per command ----


if __name__ == "__main__":  # pragma: no cover
    main()
