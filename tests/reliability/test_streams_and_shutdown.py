"""Streams, budgets and shutdown (issue 9, items 1, 2 and 7), on real gateways.

- Item 1, class: calls that need no token (health Watch, reflection) could hold every one of
  ``max_concurrent_rpcs``. Now they share a small budget (total and per connection, at most a
  quarter of the slots) and a lifetime; Health.Check and authenticated calls keep working.
- Item 2, class: a stream whose answers were not read still had its messages read and answered
  into an unbounded queue. Now a request holds its slot until its answer was written, so the
  gateway stops reading (HTTP/2 flow control then holds the client); each message after the
  first is charged to the tenant's rate.
- Item 7, class: the drain's quiet timer restarted with every refused call (so a loaded replica
  always took the whole grace) and the server was stopped with no grace left (late callers saw
  CANCELLED); one closed Watch removed the condition the other watchers waited on. Now the
  notice period is bounded, the connections are closed before grpc core stops (core drops the
  calls it holds at that instant, CANCELLED; a closed connection ends them UNAVAILABLE), and the
  condition lives while a watcher does.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.gateway.auth.conftest import gateway_config
from tests.gateway.auth.issuer import Issuer, forge_hs256
from tests.conftest import running_gateway
from tests.reliability.conftest import gateway_running, rss_bytes
from tests.support.models import FEATURES, onnx_config
from tests.support.scrape import requests_total, scrape

pytestmark = pytest.mark.reliability

MAX_CONCURRENT_RPCS = 40
BUDGET = MAX_CONCURRENT_RPCS // 4
HS256_SECRET = "streams-secret-" + "q" * 40


def linear_request(seed: int, request_id: str = "") -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).normal(size=(1, FEATURES)).astype("<f4")
    request = pb.ModelInferRequest(model_name="linear", id=request_id)
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, FEATURES])
    request.raw_input_contents.append(x.tobytes())
    return request


# -- item 1 ---------------------------------------------------------------------------------------


def test_streams_without_a_token_cannot_take_every_call_slot(model_paths, tmp_path):
    config = dict(onnx_config(model_paths), server={"max_concurrent_rpcs": MAX_CONCURRENT_RPCS})
    with gateway_running(config, tmp_path, "watch-flood") as gateway:
        channels = [grpc.insecure_channel(gateway.url) for _ in range(MAX_CONCURRENT_RPCS // 2)]
        watches, refused = [], 0
        try:
            for channel in channels:  # 2x the server's call slots, over many connections
                for _ in range(4):
                    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                    watches.append(call)
            for call in watches:
                try:
                    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
            assert len(watches) - refused <= BUDGET
            # With the flood still open: probes and inference get through.
            with grpc.insecure_channel(gateway.url) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                answer = GRPCInferenceServiceStub(channel).ModelInfer(linear_request(1), timeout=10)
                assert answer.model_name == "linear"
                # Reflection shares the budget: over it as well.
                with pytest.raises(grpc.RpcError) as err:
                    list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for call in watches:
                call.cancel()
            for channel in channels:
                channel.close()


async def test_a_watch_stream_ends_at_its_age_and_gives_its_slot_back(onnx_gateway_config):
    config = dict(onnx_gateway_config, server={"open_stream_without_auth_max_age_s": 0.5,
                                               "max_open_streams_without_auth_per_connection": 1})
    async with running_gateway(config) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(2):  # the second may only open once the first has ended
                call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
                statuses = [response.status async for response in call]
                assert statuses == [health_pb2.HealthCheckResponse.SERVING]
                assert await call.code() == grpc.StatusCode.OK


# -- item 7: the Watch condition ------------------------------------------------------------------


async def test_other_watchers_hear_not_serving_after_one_watcher_left(onnx_gateway_config):
    gateway_cm = running_gateway(onnx_gateway_config)
    gateway = await gateway_cm.__aenter__()
    stopped = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            leaving = stub.Watch(health_pb2.HealthCheckRequest(service="linear"))
            staying = stub.Watch(health_pb2.HealthCheckRequest(service="linear"))
            assert (await leaving.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert (await staying.read()).status == health_pb2.HealthCheckResponse.SERVING
            leaving.cancel()
            await asyncio.sleep(0.2)  # the server sees the cancellation
            stopping = asyncio.create_task(gateway.stop(2))
            heard = await asyncio.wait_for(staying.read(), 5)
            assert heard.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
            stopped = True
    finally:
        if not stopped:
            await gateway_cm.__aexit__(None, None, None)


# -- item 7: SIGTERM under steady traffic ---------------------------------------------------------

GRACE_S = 30.0
NOTICE_S = 1.0
CALLERS = 8
EXIT_WITHIN_S = 12.0
"""Notice period + stop grace + closing backends and interpreter exit on a busy two-core machine;
far below the 30 s grace that the old drain always took under steady traffic."""


def test_sigterm_under_steady_traffic_exits_promptly_and_never_cancels(model_paths, tmp_path):
    config = dict(onnx_config(model_paths), server={"shutdown_grace_s": GRACE_S, "drain_notice_s": NOTICE_S})
    codes: dict[str, int] = {}
    lock = threading.Lock()
    stop_calling = threading.Event()
    details: list[str] = []
    sent = float("inf")

    with gateway_running(config, tmp_path, "sigterm-steady") as gateway:
        url = gateway.url

        def caller(index: int) -> None:
            # A client that keeps calling through the shutdown, as the replica's load balancer would;
            # each on a connection of its own (grpc would otherwise share one between the channels).
            with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = GRPCInferenceServiceStub(channel)
                n = 0
                while not stop_calling.is_set():
                    n += 1
                    try:
                        stub.ModelInfer(linear_request(index * 100_000 + n), timeout=10)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                        if code != "UNAVAILABLE":
                            with lock:
                                details.append(f"{code} {time.monotonic() - sent:.3f}s after SIGTERM: {exc.details()} {exc.debug_error_string()}")
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(CALLERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while codes.get("OK", 0) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = time.monotonic()
        gateway.send(signal.SIGTERM)
        exit_code = gateway.wait(GRACE_S + 30)
        took_s = time.monotonic() - sent
        time.sleep(0.5)  # callers meet the closed port too
        stop_calling.set()
        for thread in threads:
            thread.join(30)

    assert exit_code == 0
    assert took_s < EXIT_WITHIN_S, f"exit took {took_s:.1f}s under traffic (grace {GRACE_S}s)"
    # Every call OK or UNAVAILABLE, CANCELLED never: grpc core drops (CANCELLED) the calls it holds
    # when the server stops, so the gateway closes its connections first (gateway/hangup.py).
    assert set(codes) <= {"OK", "UNAVAILABLE"}, (codes, details[:3])
    assert codes.get("UNAVAILABLE", 0) > 0


# -- item 2 ---------------------------------------------------------------------------------------

BIG_ID = "i" * 16_384
SENT_UNREAD = 5000


def test_a_stream_whose_answers_are_not_read_stops_being_read(hostile_gateway):
    """5000 requests of 16 KiB whose 16 KiB answers nobody reads: the gateway takes a few hundred."""
    sent = 0
    before = rss_bytes(hostile_gateway.process.pid)

    def requests():
        nonlocal sent
        for _ in range(SENT_UNREAD):
            sent += 1
            yield pb.ModelInferRequest(model_name="nope", id=BIG_ID)

    with grpc.insecure_channel(hostile_gateway.url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(requests(), timeout=60)
        time.sleep(8)  # never read: the gateway must stop reading
        taken = sent
        grown = rss_bytes(hostile_gateway.process.pid) - before
        call.cancel()
    assert taken < SENT_UNREAD // 2, f"{taken} of {SENT_UNREAD} requests were taken with no answer read"
    assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB"


def test_each_message_of_a_stream_is_charged_to_the_tenant(model_paths, tmp_path):
    config = gateway_config(model_paths, hs256_secret_env="INFERGATE_STREAMS_SECRET", algorithms=["HS256"],
                            rate_limit_per_tenant_rps=2, rate_limit_burst=5)
    token = forge_hs256({"alg": "HS256", "typ": "JWT"}, Issuer().claims(), HS256_SECRET.encode())
    with gateway_running(config, tmp_path, "stream-rate", extra_env={"INFERGATE_STREAMS_SECRET": HS256_SECRET}) as gateway:
        with grpc.insecure_channel(gateway.url) as channel:
            stub = GRPCInferenceServiceStub(channel)
            answers = list(stub.ModelStreamInfer(iter([linear_request(i, str(i)) for i in range(40)]),
                                                 metadata=[("authorization", f"Bearer {token}")], timeout=30))
        samples = scrape(gateway.metrics_port)
    limited = [a for a in answers if a.error_message == "tenant over its request rate"]
    served = [a for a in answers if not a.error_message]
    assert len(answers) == 40
    assert 1 <= len(served) <= 10 and len(limited) >= 30
    # each refused message is a refused call in the metrics (before routing: no variant)
    assert requests_total(samples, "linear", "", "RESOURCE_EXHAUSTED") == len(limited)
    assert requests_total(samples, "linear", "v1", "OK") == len(served)
