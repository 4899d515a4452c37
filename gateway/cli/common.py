"""What every command shares: exit codes, one-line failures, logging set-up, loading a config.

Every command prints a readable result by default; a failure prints one line,
``infergate: <what went wrong>``, and exits non-zero (2 for a bad config, bad arguments or a
missing extra, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from infergate.gateway.config import ConfigError, GatewayConfig, load_config

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``infergate: message`` on stderr; returns the Exit to raise (``raise fail(...)``)."""
    typer.echo(f"infergate: {message}", err=True)
    return typer.Exit(code)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format`` (text or json), secrets redacted (gateway/logs.py)."""
    from infergate.gateway.logs import configure_logging

    configure_logging(level, log_format)


def load_config_or_exit(config_path: Path | None) -> GatewayConfig:
    """The validated config, or ``infergate: config error: ...`` and exit 2."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise fail(f"config error: {exc}", EXIT_CONFIG) from None


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Exit 2 with one line naming the extra to install when ``module`` is missing; call before any work."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise fail(f"{purpose} needs {module}, which is not installed: pip install 'infergate[{extra}]'")
