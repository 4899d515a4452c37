"""The ``infergate`` command line: one package, one way to register a command.

Each module of this package holds a ``commands`` Typer whose commands (and groups) are merged into
the root ``app`` below, in ``COMMAND_MODULES`` order:

- ``serve``: serve, demo, check-config, health
- ``admin``: routes, audit, canary set|promote|rollback|status (the RoutingAdmin API)
- ``features``: features load
- ``monitor``: monitor profile (drift reference profiles)
- ``tokens``: token, jwks (development tokens)
- ``bench``: bench (the measuring itself lives in ``infergate.benchmarks``)

``common`` holds what they share (exit codes, one-line failures, loading a config). Every command
prints a readable result; a user mistake prints one line and exits non-zero, never a traceback.
Shell completion: ``infergate --install-completion`` (bash, zsh, fish, PowerShell).
"""

from __future__ import annotations

from typing import Optional

import typer

from infergate.gateway import __version__
from infergate.gateway.cli import admin, bench, features, monitor, serve, tokens

COMMAND_MODULES = (serve, admin, features, monitor, tokens, bench)

app = typer.Typer(no_args_is_help=True, help="infergate: a Triton-compatible gRPC model gateway.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"infergate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """infergate: a Triton-compatible gRPC model gateway."""


for _module in COMMAND_MODULES:
    app.add_typer(_module.commands)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
