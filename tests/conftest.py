"""Fixtures shared by every test area: real Redis, real Triton, ONNX model files, gateways.

Session-scoped servers are shared to keep the suite fast; a test that kills or restarts a server
starts its own. Every fixture checks on the way out that its process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infergate.gateway.config import parse_config
from infergate.gateway.local_redis import LocalRedis
from infergate.gateway.server import Gateway
from tests.support.models import onnx_config, write_models
from tests.support.processes import GatewayProcess, TritonProcess


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def redis_server() -> LocalRedis:
    server = LocalRedis().start()
    yield server
    process = server.process
    server.stop()
    assert process is not None and process.poll() is not None, "redis-server leaked"


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """A clean database on the shared Redis for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> TritonProcess:
    """A real Triton shared by the session; do not kill it (start your own TritonProcess for that)."""
    server = TritonProcess(tmp_path_factory.mktemp("triton")).start()
    yield server
    server.stop()
    assert not server.alive(), "Triton leaked"


@pytest.fixture
def gateway_process(tmp_path):
    """Factory: ``gateway_process(config_dict)`` starts ``infergate serve``; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def start(config: dict, name: str = "gateway", **kwargs) -> GatewayProcess:
        process = GatewayProcess(config, tmp_path, name=f"{name}-{len(started)}", **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        assert not process.alive()


@contextlib.asynccontextmanager
async def running_gateway(config: dict, **gateway_kwargs) -> AsyncIterator[Gateway]:
    """An in-process gateway on a free port in the current loop (for .aio clients)."""
    raw = dict(config)
    raw.setdefault("server", {})
    raw["server"] = {"listen": "127.0.0.1:0", "metrics_listen": "", **raw["server"]}
    gateway = Gateway(parse_config(raw), **gateway_kwargs)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(0.5)


@pytest.fixture
def onnx_gateway_config(model_paths) -> dict:
    return onnx_config(model_paths)


@pytest.fixture
async def no_task_leaks():
    """Fails a test that leaves asyncio tasks behind."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0.05)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not leaked, f"leaked tasks: {leaked}"
