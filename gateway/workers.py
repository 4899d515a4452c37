"""``server.workers > 1``: several gateway processes sharing one port, supervised as one service.

Each worker is a full replica in a process of its own (``spawn``), bound to the same gRPC port
through SO_REUSEPORT, with its own metrics endpoint on ``metrics_listen``'s port + its index
(Prometheus scrapes each; port 0 stays 0). SIGTERM and SIGINT are forwarded to every worker. A
worker that exits on its own with an error (a start-up failure, a crash) takes the others down, so
that the process manager above sees one failed service rather than a silently smaller one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys

from infergate.gateway.config import GatewayConfig, load_config


def run_replica(config: GatewayConfig) -> int:
    """One gateway in this process until SIGTERM or SIGINT; its exit code."""
    from infergate.gateway.server import serve as serve_forever

    return asyncio.run(serve_forever(config))


def run_workers(config_path: str, log_level: str, count: int, say=print) -> int:
    """Start ``count`` workers on the config at ``config_path`` and supervise them; the worst exit code."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(config_path, log_level, index), daemon=False) for index in range(count)]
    for process in processes:
        process.start()

    def forward(signum, _frame):
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    stopping = False
    while any(process.is_alive() for process in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=1.0)
        failed = [p for p in processes if not p.is_alive() and p.exitcode not in (0, None)]
        if failed and not stopping:
            stopping = True
            say(f"infergate: worker exited with code {failed[0].exitcode}; stopping the others")
            forward(signal.SIGTERM, None)
    for process in processes:
        process.join()
    return max((p.exitcode or 0) for p in processes)


def _worker_main(config_path: str, log_level: str, index: int = 0) -> None:
    from infergate.gateway.cli.common import setup_logging

    setup_logging(log_level)
    sys.exit(run_replica(worker_config(load_config(config_path), index)))


def worker_config(config: GatewayConfig, index: int) -> GatewayConfig:
    """Worker ``index`` serves its own metrics on ``metrics_listen``'s port + index."""
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
