"""The ``infergate`` command line.

Every command prints a readable result by default; failures print one line and exit non-zero
(2 for a bad config or bad arguments, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import asyncio
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


def _setup_logging(level: str, log_format: str = "text") -> None:
    from infergate.gateway.logs import configure_logging

    configure_logging(level, log_format)


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
    gateway_config = _load(config)
    _setup_logging(log_level, gateway_config.logging.format)
    workers = gateway_config.server.workers
    if workers == 1:
        raise typer.Exit(_run_replica(gateway_config))
    raise typer.Exit(_supervise(config, gateway_config, log_level))


def _supervise(config_path: Path, config: GatewayConfig, log_level: str) -> int:
    """Run ``server.workers`` replicas sharing the port (SO_REUSEPORT); return the exit code.

    The workers record metrics into a shared multiprocess directory and this process alone serves
    ``metrics_listen`` with their sum (see gateway/metrics.py). A worker that dies on its own (a
    start-up error, a crash) takes the others down, so the process manager above sees one failed
    service rather than a silently smaller one.
    """
    import shutil
    import signal
    import tempfile

    from prometheus_client import multiprocess as prometheus_multiprocess

    from infergate.gateway import metrics  # before the directory is set: this process keeps its values in memory

    own_dir = not os.environ.get(metrics.MULTIPROCESS_DIR_ENV)
    metrics_dir = os.environ.get(metrics.MULTIPROCESS_DIR_ENV) or tempfile.mkdtemp(prefix="infergate-metrics-")
    os.environ[metrics.MULTIPROCESS_DIR_ENV] = metrics_dir  # inherited by the spawned workers
    try:
        metrics_port = 0
        if config.server.metrics_listen:
            try:
                metrics_port = metrics.serve_metrics(config.server.metrics_listen, multiprocess=True)
            except OSError as exc:
                typer.echo(f"infergate: cannot start: server.metrics_listen: cannot bind "
                           f"{config.server.metrics_listen}: {exc.strerror or exc}", err=True)
                return 1
        print(f"infergate supervising {config.server.workers} workers, metrics_port {metrics_port}", flush=True)
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=_worker_main, args=(str(config_path), log_level), daemon=False)
            for _ in range(config.server.workers)
        ]
        for process in processes:
            process.start()

        def forward(signum, _frame):
            for process in processes:
                if process.pid is not None and process.is_alive():
                    os.kill(process.pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        stopping = False
        reaped: set[int] = set()
        while len(reaped) < len(processes):
            multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=1.0)
            for process in processes:
                if not process.is_alive() and process.pid not in reaped:
                    reaped.add(process.pid)
                    prometheus_multiprocess.mark_process_dead(process.pid, metrics_dir)  # its live gauges go
            failed = [p for p in processes if not p.is_alive() and p.exitcode not in (0, None)]
            if failed and not stopping:
                stopping = True
                typer.echo(f"infergate: worker exited with code {failed[0].exitcode}; stopping the others", err=True)
                forward(signal.SIGTERM, None)
        for process in processes:
            process.join()
        return 1 if any(process.exitcode != 0 for process in processes) else 0
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_main(config_path: str, log_level: str) -> None:
    config = load_config(config_path)
    _setup_logging(log_level, config.logging.format)
    sys.exit(_run_replica(_worker_config(config)))


def _worker_config(config: GatewayConfig) -> GatewayConfig:
    """A worker of several serves no metrics endpoint: the supervisor serves all workers' metrics."""
    server = config.server.model_copy(update={"metrics_listen": ""})
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

    from infergate.gateway.cli_monitor import monitor_app

    app.add_typer(monitor_app, name="monitor")

    from infergate.gateway.cli_admin import register as register_admin_commands  # routes, canary, audit

    register_admin_commands(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
