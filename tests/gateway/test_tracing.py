"""Traces arrive at a real OTLP/gRPC receiver, continuing the caller's W3C trace context."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from tests.conftest import running_gateway
from tests.gateway.test_features import scorer_path  # noqa: F401 (fixture: the scorer model that takes online features)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace collector endpoint that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver():
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0).wait()


def _attributes(span) -> dict:
    return {a.key: a.value.string_value for a in span.attributes}


async def test_spans_continue_the_callers_trace(onnx_gateway_config, otlp_receiver):
    receiver, port = otlp_receiver
    config = dict(onnx_gateway_config, telemetry={"service_name": "gw-under-test", "otlp_endpoint": f"http://127.0.0.1:{port}"})
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            tensor = InferInput("INPUT", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            await client.infer("linear", [tensor], headers={"traceparent": traceparent})
            with pytest.raises(InferenceServerException) as missing:
                await client.infer("no_such_model", [tensor], headers={"traceparent": traceparent})
        finally:
            await client.close()
    # Gateway.stop flushed the exporter: the spans are at the receiver now.
    assert "NOT_FOUND" in missing.value.status()
    spans = [(service, span) for service, span in receiver.spans if span.name == "infergate/ModelInfer"]
    assert len(spans) == 2
    by_model = {_attributes(span)["infergate.model"]: (service, span) for service, span in spans}
    service, ok = by_model["linear"]
    assert service["service.name"] == "gw-under-test"
    assert ok.trace_id.hex() == TRACE_ID
    assert ok.parent_span_id.hex() == PARENT_SPAN_ID
    assert ok.kind == ok.SPAN_KIND_SERVER
    assert _attributes(ok)["infergate.variant"] == "v1"
    _, failed = by_model["no_such_model"]
    assert failed.status.code == failed.status.STATUS_CODE_ERROR
    assert failed.attributes and {a.key: a.value.int_value for a in failed.attributes}["rpc.grpc.status_code"] == 5  # NOT_FOUND


async def test_no_endpoint_means_no_export(onnx_gateway_config, otlp_receiver):
    receiver, _port = otlp_receiver
    async with running_gateway(onnx_gateway_config) as gateway:
        assert not gateway.tracing.enabled
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            tensor = InferInput("INPUT", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            result = await client.infer("linear", [tensor])
        finally:
            await client.close()
    assert result.as_numpy("PROBS").shape == (1, 4)
    assert receiver.spans == []


# -- a span per stage ----------------------------------------------------------------------------

CALLERS = 6


def _traceparent(index: int) -> tuple[str, str, str]:
    trace_id = f"{index + 1:032x}"
    span_id = f"{index + 1:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _row(value: float) -> list[InferInput]:
    tensor = InferInput("INPUT", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), value, np.float32))
    return [tensor]


def _tracing(port: int, **overrides) -> dict:
    return {"service_name": "gw", "otlp_endpoint": f"http://127.0.0.1:{port}", **overrides}


async def test_batched_calls_get_stage_spans_and_one_backend_span_linked_to_each(onnx_gateway_config, otlp_receiver):
    receiver, port = otlp_receiver
    config = dict(onnx_gateway_config, telemetry=_tracing(port))
    # dispatch: delay with a long delay and a full batch of CALLERS rows: all callers share one batch.
    config["models"]["linear"]["batching"] = {"max_batch_size": CALLERS, "dispatch": "delay", "max_delay_us": 5_000_000}
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            await asyncio.gather(
                *(client.infer("linear", _row(i), headers={"traceparent": _traceparent(i)[2]}) for i in range(CALLERS))
            )
        finally:
            await client.close()
    spans = [span for _service, span in receiver.spans]
    servers = {span.trace_id.hex(): span for span in spans if span.name == "infergate/ModelInfer"}
    assert sorted(servers) == sorted(_traceparent(i)[0] for i in range(CALLERS))
    for i in range(CALLERS):
        trace_id, caller_span, _ = _traceparent(i)
        server = servers[trace_id]
        assert server.parent_span_id.hex() == caller_span
        assert {a.key: a.value.string_value for a in server.attributes}["rpc.system"] == "grpc"
        children = {span.name: span for span in spans if span.trace_id.hex() == trace_id and span.parent_span_id == server.span_id}
        assert {"infergate/route", "infergate/queue"} <= set(children), sorted(children)
        route = _attributes(children["infergate/route"])
        assert route["infergate.variant"] == "v1" and route["infergate.route.reason"] == "weighted"
        assert children["infergate/queue"].end_time_unix_nano >= children["infergate/queue"].start_time_unix_nano
    (backend,) = [span for span in spans if span.name == "infergate/backend"]
    assert backend.kind == backend.SPAN_KIND_CLIENT
    assert {link.span_id for link in backend.links} == {server.span_id for server in servers.values()}
    assert backend.parent_span_id in {server.span_id for server in servers.values()}
    assert {a.key: a.value.int_value for a in backend.attributes}["infergate.batch.rows"] == CALLERS


async def test_an_authenticated_call_gets_auth_route_and_backend_spans(onnx_gateway_config, otlp_receiver, tmp_path):
    from tests.gateway.auth.conftest import auth_block
    from tests.gateway.auth.issuer import Issuer

    issuer = Issuer()
    receiver, port = otlp_receiver
    jwks = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    config = dict(onnx_gateway_config, telemetry=_tracing(port), auth=auth_block(jwks_file=str(jwks)))
    trace_id, caller_span, traceparent = _traceparent(40)
    token = issuer.token(scope="infer:linear")
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            await client.infer("linear", _row(1.0), headers={"traceparent": traceparent, "authorization": f"Bearer {token}"})
        finally:
            await client.close()
    spans = [span for _service, span in receiver.spans if span.trace_id.hex() == trace_id]
    (server,) = [span for span in spans if span.name == "infergate/ModelInfer"]
    assert server.parent_span_id.hex() == caller_span
    children = {span.name: span for span in spans if span.parent_span_id == server.span_id}
    assert set(children) == {"infergate/auth", "infergate/route", "infergate/backend"}
    assert children["infergate/auth"].start_time_unix_nano <= server.start_time_unix_nano + 1_000_000_000
    backend = {a.key: a.value for a in children["infergate/backend"].attributes}
    assert backend["infergate.backend.kind"].string_value == "onnx"
    assert "rpc.system" not in backend  # ONNX Runtime runs in process: no RPC to describe
    assert all("linear" not in span.name for span in spans)  # span names never carry a model name


async def test_sample_ratio_zero_sends_no_spans_and_a_dead_collector_fails_no_call(onnx_gateway_config, otlp_receiver):
    from infergate.gateway.local_redis import free_port

    receiver, port = otlp_receiver
    unsampled = dict(onnx_gateway_config, telemetry=_tracing(port, sample_ratio=0.0))
    dead = dict(onnx_gateway_config, telemetry=_tracing(free_port()))  # nothing listens there
    answers = []
    # Ratio 0: calls that bring no sampled trace context are not traced (ParentBased still follows a
    # caller that says "sampled"). A dead collector: every call is traced and exported into the void.
    for config, traced in ((unsampled, False), (dead, True)):
        async with running_gateway(config) as gateway:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
            try:
                for i in range(20):
                    headers = {"traceparent": _traceparent(60 + i)[2]} if traced else None
                    result = await client.infer("linear", _row(float(i)), headers=headers)
                    answers.append(result.as_numpy("PROBS"))
            finally:
                await client.close()
    assert receiver.spans == []
    assert len(answers) == 40 and all(a.shape == (1, 4) for a in answers)


def test_the_sampling_decision_is_taken_before_any_span_and_follows_the_caller():
    from infergate.gateway.config import TelemetryConfig
    from infergate.gateway.telemetry import Tracing

    never = Tracing(TelemetryConfig(sample_ratio=0.0))
    always = Tracing(TelemetryConfig(sample_ratio=1.0))
    sampled, unsampled = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"
    assert never.sampled({"traceparent": sampled}) and not always.sampled({"traceparent": unsampled})
    assert always.sampled({}) and not never.sampled({})
    assert not always.sampled({"traceparent": "garbage-zz"})
    some = Tracing(TelemetryConfig(sample_ratio=0.25))
    share = sum(some.sampled({}) for _ in range(20000)) / 20000
    assert abs(share - 0.25) < 0.02  # 20000 draws: sd 0.003


async def test_a_call_with_online_features_gets_a_features_span_with_entities_and_misses(scorer_path, redis_url, otlp_receiver):
    from tests.gateway.test_features import DIM, config as features_config, inputs, store

    receiver, port = otlp_receiver
    store(redis_url, {"u1": np.ones(DIM, np.float32)})
    config = dict(features_config(scorer_path, redis_url), telemetry=_tracing(port))
    trace_id, caller_span, traceparent = _traceparent(80)
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            tensors = inputs([b"u1", b"nobody", b"u1"], np.zeros((3, 2), np.float32))
            result = await client.infer("scorer", tensors, headers={"traceparent": traceparent})
        finally:
            await client.close()
    assert result.as_numpy("SCORE").shape == (3, 2)
    spans = [span for _service, span in receiver.spans if span.trace_id.hex() == trace_id]
    (server,) = [span for span in spans if span.name == "infergate/ModelInfer"]
    assert server.parent_span_id.hex() == caller_span
    children = {span.name: span for span in spans if span.parent_span_id == server.span_id}
    assert set(children) == {"infergate/route", "infergate/features", "infergate/backend"}
    features = {a.key: a.value.int_value for a in children["infergate/features"].attributes}
    assert features == {"infergate.features.entities": 3, "infergate.features.misses": 1}  # "nobody" has no row
