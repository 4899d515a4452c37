"""Fixtures of the reliability suite: real ``infergate serve`` processes over ONNX Runtime and a real
Redis, raw gRPC calls that send whatever bytes a hostile client would, and RSS readings.

Every module here carries the ``reliability`` marker (``pytest -m reliability`` runs the suite on
its own); the fast cases also run in the normal suite. The soak is ``python -m
tests.reliability.soak``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as inference_pb
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2
from tests.support.models import onnx_config
from tests.support.processes import GatewayProcess

RAW_TIMEOUT_S = 10.0


def every_method() -> list[tuple[str, bool, bool]]:
    """``(path, client_streaming, server_streaming)`` of every RPC the gateway serves."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    services = [
        inference_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        admin_pb2.DESCRIPTOR.services_by_name["RoutingAdmin"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return [
        (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
        for service in services
        for method in service.methods
    ]


def raw_call(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool, payload: bytes,
             timeout_s: float = RAW_TIMEOUT_S) -> grpc.StatusCode:
    """Send ``payload`` undecoded as the request (one message) of ``path``; the status it ends with.

    A server stream is read to its end; one that stays open past ``timeout_s`` ends DEADLINE_EXCEEDED.
    """
    try:
        if client_streaming and server_streaming:
            for _ in channel.stream_stream(path)(iter([payload]), timeout=timeout_s):
                pass
        elif client_streaming:
            channel.stream_unary(path)(iter([payload]), timeout=timeout_s)
        elif server_streaming:
            for _ in channel.unary_stream(path)(payload, timeout=timeout_s):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=timeout_s)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def gateway_running(config: dict, workdir: Path, name: str, debug: bool = False, **kwargs) -> Iterator[GatewayProcess]:
    process = GatewayProcess(config, workdir, name=name, **kwargs)
    if debug:
        process.argv += ["--log-level", "debug"]
    process.start()
    try:
        yield process
    finally:
        process.stop()
        assert not process.alive(), f"{name} leaked"


@pytest.fixture(scope="module")
def hostile_gateway(model_paths, redis_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """One gateway over ONNX Runtime and Redis (admin calls work), no auth, 1 MiB message limit."""
    config = dict(onnx_config(model_paths), redis={"url": redis_server.url}, server={"max_message_bytes": 1 << 20})
    with gateway_running(config, tmp_path_factory.mktemp("hostile"), "hostile-gateway") as process:
        yield process


@pytest.fixture
def channel(hostile_gateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile_gateway.url) as channel:
        yield channel
