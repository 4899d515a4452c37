"""Fixtures shared by every test area: real Redis, real Triton, ONNX model files, gateways.

Session-scoped servers are shared to keep the suite fast; a test that kills or restarts a server
starts its own. Every fixture checks on the way out that its process is gone.

Tiers: every test is marked from what it uses, never by hand. ``redis`` when it uses the Redis
fixtures, ``triton`` when it uses Triton's (also as the parameter of a fixture that fetches the
fixture it names), ``subprocess`` when it starts processes: a process
fixture (``gateway_process``, the shared e2e gateways) or, read from the source, a call to
``subprocess``, a ``...Process(`` class, or a helper of the test tree that does either. ``make
test-fast`` runs the rest (``-m "not redis and not triton and not subprocess"``) in seconds.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infergate.gateway.config import parse_config
from infergate.gateway.local_redis import LocalRedis
from infergate.gateway.server import Gateway
from tests.support.models import onnx_config, write_models
from tests.support.processes import GatewayProcess, TritonProcess


TIER_FIXTURES = {
    "redis": {"redis_server", "redis_url"},
    "triton": {"triton_server", "triton_gateway", "traced_triton"},
    "subprocess": {"gateway_process", "onnx_gateway", "triton_gateway", "triton_server", "traced_triton", "redis_server"},
}
_SPAWNS = re.compile(r"\bsubprocess\.(run|Popen|check_output|check_call)\b|\b(?!Completed)[A-Z]\w*Process\(|create_subprocess_exec")


def _spawning_helpers(tree: Path) -> set[str]:
    """Names of functions under ``tree`` that start a process, directly or through one another."""
    bodies: dict[str, str] = {}
    for path in tree.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("test_"):
                bodies[node.name] = ast.get_source_segment(source, node) or ""
    spawning = {name for name, body in bodies.items() if _SPAWNS.search(body)}
    while True:
        calls = re.compile(r"\b(" + "|".join(map(re.escape, sorted(spawning))) + r")\(") if spawning else None
        more = {name for name, body in bodies.items() if name not in spawning and calls and calls.search(body)}
        if not more:
            return spawning
        spawning |= more


def pytest_collection_modifyitems(config, items):
    helpers = _spawning_helpers(Path(__file__).parent)
    calls = re.compile(r"\b(" + "|".join(map(re.escape, sorted(helpers))) + r")\(") if helpers else None
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        # A parametrized fixture whose parameter names the fixture it fetches (request.getfixturevalue):
        # e.g. tests/e2e/test_serving.py's backend kinds. The parameter counts as a fixture used.
        callspec = getattr(item, "callspec", None)
        used |= {value for value in (callspec.params.values() if callspec else ()) if isinstance(value, str)}
        marks = {tier for tier, fixtures in TIER_FIXTURES.items() if used & fixtures}
        function = getattr(item, "function", None)
        if "subprocess" not in marks and function is not None:
            source = inspect.getsource(function)
            if _SPAWNS.search(source) or (calls and calls.search(source)):
                marks.add("subprocess")
        for tier in sorted(marks):
            item.add_marker(getattr(pytest.mark, tier))


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
