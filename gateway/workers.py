"""``server.workers > 1``: several gateway processes sharing one port, supervised as one service.

Each worker is a full replica in a process of its own (``spawn``), bound to the same gRPC port
through SO_REUSEPORT. The workers record metrics into a shared prometheus-client multiprocess
directory and the supervisor alone serves ``metrics_listen`` with their sum (see
gateway/metrics.py), so one scrape sees the whole service. SIGTERM and SIGINT are forwarded to
every worker. A worker that exits on its own with an error (a start-up failure, a crash) takes the
others down, so that the process manager above sees one failed service rather than a silently
smaller one; the service then exits 1.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from infergate.gateway.config import GatewayConfig, load_config


def run_replica(config: GatewayConfig) -> int:
    """One gateway in this process until SIGTERM or SIGINT; its exit code."""
    from infergate.gateway.server import serve as serve_forever

    return asyncio.run(serve_forever(config))


def run_workers(config_path: Path, config: GatewayConfig, log_level: str, say: Callable[[str], None] = print) -> int:
    """Start ``server.workers`` workers on the config at ``config_path``, serve their summed metrics,
    and supervise them; 0 when all exited cleanly, else 1."""
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
                say(f"infergate: cannot start: server.metrics_listen: cannot bind "
                    f"{config.server.metrics_listen}: {exc.strerror or exc}")
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
                say(f"infergate: worker exited with code {failed[0].exitcode}; stopping the others")
                forward(signal.SIGTERM, None)
        for process in processes:
            process.join()
        return 1 if any(process.exitcode != 0 for process in processes) else 0
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker_main(config_path: str, log_level: str) -> None:
    from infergate.gateway.cli.common import setup_logging

    config = load_config(config_path)
    setup_logging(log_level, config.logging.format)
    sys.exit(run_replica(worker_config(config)))


def worker_config(config: GatewayConfig) -> GatewayConfig:
    """A worker of several serves no metrics endpoint: the supervisor serves all workers' metrics."""
    server = config.server.model_copy(update={"metrics_listen": ""})
    return config.model_copy(update={"server": server})
