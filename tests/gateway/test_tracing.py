"""Traces arrive at a real OTLP/gRPC receiver, continuing the caller's W3C trace context."""

from __future__ import annotations

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
    assert _attributes(failed)["rpc.grpc.status_code"] == "NOT_FOUND"


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
