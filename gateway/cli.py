"""The ``infergate`` command line.

Every command prints a readable result by default; failures print one line and exit non-zero
(2 for a bad config or bad arguments, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from infergate.gateway.config import ConfigError, GatewayConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="infergate: a Triton-compatible gRPC model gateway.")

EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    from infergate.gateway.auth.logfilter import SubjectLogFilter
    from infergate.gateway.redaction import RedactingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SubjectLogFilter())  # [subject]: who the call being served is for, "-" outside calls
    # No secret in any line, tracebacks included: URL passwords, tokens, the HS256 secret.
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s [%(subject)s]: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _load(config_path: Optional[Path]) -> GatewayConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        typer.echo(f"infergate: config error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file (see README)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    _setup_logging(log_level)
    gateway_config = _load(config)
    workers = gateway_config.server.workers
    if workers == 1:
        raise typer.Exit(_run_replica(gateway_config))
    # Several processes share the port through SO_REUSEPORT; each is a full replica.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(str(config), log_level, index), daemon=False) for index in range(workers)
    ]
    for process in processes:
        process.start()
    import signal

    def forward(signum, _frame):
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # Supervise: a worker that dies on its own (a start-up error, a crash) takes the others down,
    # so the process manager above sees one failed service rather than a silently smaller one.
    stopping = False
    while any(process.is_alive() for process in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=1.0)
        failed = [p for p in processes if not p.is_alive() and p.exitcode not in (0, None)]
        if failed and not stopping:
            stopping = True
            typer.echo(f"infergate: worker exited with code {failed[0].exitcode}; stopping the others", err=True)
            forward(signal.SIGTERM, None)
    for process in processes:
        process.join()
    raise typer.Exit(max((p.exitcode or 0) for p in processes))


def _worker_main(config_path: str, log_level: str, index: int = 0) -> None:
    _setup_logging(log_level)
    sys.exit(_run_replica(_worker_config(load_config(config_path), index)))


def _worker_config(config: GatewayConfig, index: int) -> GatewayConfig:
    """Worker ``index`` serves its own metrics on ``metrics_listen``'s port + index.

    The gRPC port is shared through SO_REUSEPORT, but each process has its own counters, so each
    needs its own metrics endpoint (Prometheus scrapes all of them); port 0 stays 0 (any free port).
    """
    from infergate.gateway.config import split_host_port

    listen = config.server.metrics_listen
    if not listen or index == 0:
        return config
    host, port = split_host_port(listen)
    if port == 0:
        return config
    host = f"[{host}]" if ":" in host else host
    server = config.server.model_copy(update={"metrics_listen": f"{host}:{port + index}"})
    return config.model_copy(update={"server": server})


def _run_replica(config: GatewayConfig) -> int:
    from infergate.gateway.server import serve as serve_forever

    return asyncio.run(serve_forever(config))


@app.command()
def demo(
    redis_url: str = typer.Option("", help="Use this Redis instead of starting a local redis-server."),
    serve_after: bool = typer.Option(False, "--serve", help="Keep the gateway running after the sample calls."),
    port: int = typer.Option(0, help="Port for the gateway (0 picks a free one)."),
) -> None:
    """Start a gateway on a bundled ONNX model, make sample calls with tritonclient, print the answers."""
    _setup_logging("warning")
    from infergate.gateway.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(redis_url=redis_url, serve_after=serve_after, port=port)))


@app.command("check-config")
def check_config(config: Path = typer.Argument(..., help="YAML config file.")) -> None:
    """Validate a config file and exit (0 when it is good, 2 with the problem when not)."""
    gateway_config = _load(config)
    typer.echo(f"ok: {len(gateway_config.models)} model(s), {len(gateway_config.backends)} backend(s)")


# `infergate bench`: the options and the implementation live in benchmarks/bench.py.
from infergate.benchmarks.bench import bench_command  # noqa: E402

app.command("bench")(bench_command)

# `infergate token` and `infergate jwks` (development tokens): gateway/auth/commands.py.
from infergate.gateway.auth.commands import jwks_command, token_command  # noqa: E402

app.command("token")(token_command)
app.command("jwks")(jwks_command)


def _register_subcommands() -> None:
    from infergate.gateway.cli_features import features_app

    app.add_typer(features_app, name="features")

    from infergate.gateway.cli_admin import register as register_admin_commands  # routes, canary, audit

    register_admin_commands(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
