"""Running and checking a gateway: ``serve``, ``demo``, ``check-config``, ``health``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

from infergate.gateway.cli.common import EXIT_CONFIG, EXIT_ERROR, fail, load_config_or_exit, setup_logging

commands = typer.Typer()

DEFAULT_GATEWAY = "127.0.0.1:8001"


@commands.command()
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file (see README)."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the gateway until SIGTERM or SIGINT (server.workers processes sharing the port)."""
    from infergate.gateway.workers import run_replica, run_workers

    gateway_config = load_config_or_exit(config)
    setup_logging(log_level, gateway_config.logging.format)
    workers = gateway_config.server.workers
    if workers == 1:
        raise typer.Exit(run_replica(gateway_config))
    raise typer.Exit(run_workers(config, gateway_config, log_level, say=lambda line: typer.echo(line, err=True)))


@commands.command()
def demo(
    redis_url: str = typer.Option("", help="Use this Redis instead of starting a local redis-server."),
    serve_after: bool = typer.Option(False, "--serve", help="Keep the gateway running after the sample calls."),
    port: int = typer.Option(0, help="Port for the gateway (0 picks a free one)."),
    export: Optional[Path] = typer.Option(
        None, "--export", help="Write the demo's models and a commented infergate.yaml into DIR, then exit.", metavar="DIR"
    ),
    force: bool = typer.Option(False, "--force", help="With --export: overwrite an infergate.yaml you changed."),
) -> None:
    """Start a gateway on a bundled ONNX model, make sample calls with tritonclient, print the answers."""
    setup_logging("warning")
    from infergate.gateway.demo import ExportError, export_demo, run_demo

    if export is not None:
        try:
            written = export_demo(export, force)
        except ExportError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(f"--export {export}: {exc.strerror or exc}", EXIT_ERROR) from None
        typer.echo("wrote " + ", ".join(str(path) for path in written))
        typer.echo(f"next: infergate serve --config {written[0]}")
        return

    raise typer.Exit(asyncio.run(run_demo(redis_url=redis_url, serve_after=serve_after, port=port)))


@commands.command("check-config")
def check_config(config: Path = typer.Argument(..., help="YAML config file.")) -> None:
    """Validate a config file and its model files; exit 0 when good, 2 with the problem when not."""
    from infergate.gateway.config import missing_model_files

    gateway_config = load_config_or_exit(config)
    missing = missing_model_files(gateway_config)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise fail(f"config error: {missing[0]}{more}", EXIT_CONFIG)
    typer.echo(f"ok: {len(gateway_config.models)} model(s), {len(gateway_config.backends)} backend(s)")


@commands.command()
def health(
    gateway: str = typer.Option(DEFAULT_GATEWAY, "--gateway", envvar="INFERGATE_GATEWAY", help="Gateway address HOST:PORT."),
    service: str = typer.Option("", "--service", help="Service to ask about ('' is the whole server)."),
    timeout_s: float = typer.Option(3.0, "--timeout-s", min=0.01, help="Deadline of the check."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", envvar="INFERGATE_CA_FILE", help="CA of the gateway's TLS certificate (turns TLS on)."),
    cert_file: Optional[Path] = typer.Option(None, "--cert-file", envvar="INFERGATE_CERT_FILE", help="Client certificate (mutual TLS)."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", envvar="INFERGATE_KEY_FILE", help="Client private key (mutual TLS)."),
) -> None:
    """gRPC health check: prints the status; exit 0 when SERVING, 1 otherwise (for Docker HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from infergate.gateway.tls import TlsOptionsError, client_tls

    try:
        tls = client_tls(ca_file, cert_file, key_file)
    except TlsOptionsError as exc:
        raise fail(str(exc)) from None
    channel = grpc.secure_channel(gateway, tls.channel_credentials()) if tls else grpc.insecure_channel(gateway)
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise fail(f"{gateway}: {exc.code().name}: {exc.details()}", EXIT_ERROR) from None
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    typer.echo(f"{gateway}{' ' + service if service else ''}: {status}")
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(EXIT_ERROR)
