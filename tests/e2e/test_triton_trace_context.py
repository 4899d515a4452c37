"""Triton receives the trace context the gateway passes on, checked against Triton's own traces.

A real Triton (nvidia-pytriton's binary) runs in its OpenTelemetry trace mode and exports its spans
over OTLP/HTTP to a real receiver in the test (``tests/support/otlp_http.py``); the gateway exports
its own spans over OTLP/gRPC to the receiver of ``test_tracing``. For a call made with a
``traceparent``, Triton's request span (``InferRequest``) must sit in the caller's trace with the
gateway's ``infergate/backend`` span as its parent: the context Triton continued is the one the
gateway injected, not the caller's and not a new trace.
"""

from __future__ import annotations

import asyncio

import pytest
import tritonclient.grpc.aio as grpcclient

from tests.conftest import running_gateway
from tests.e2e.conftest import linear_input, rows_for, triton_config
from tests.gateway.test_tracing import otlp_receiver  # noqa: F401 (fixture: the gateway's OTLP/gRPC receiver)
from tests.support.otlp_http import OtlpHttpReceiver
from tests.support.processes import TritonProcess, wait_until
from tests.support.triton_models import TRITON_SERVICE_NAME

TRITON_REQUEST_SPAN = "InferRequest"
"""Triton's span for one inference request; its children are the model's span and ``compute``."""
TRITON_MODEL = "linear_v1"
SPANS_TIMEOUT_S = 30.0
BATCH_CALLERS = 3


@pytest.fixture(scope="module")
def traced_triton(tmp_path_factory):
    """A real Triton tracing every request to a real OTLP/HTTP receiver: ``(triton, receiver)``."""
    receiver = OtlpHttpReceiver().start()
    triton = TritonProcess(tmp_path_factory.mktemp("traced-triton"), otlp_traces_url=receiver.url)
    try:
        triton.start()
        yield triton, receiver
    finally:
        triton.stop()
        receiver.stop()
    assert not triton.alive(), "Triton leaked"
    assert receiver.errors == [], receiver.errors  # every export Triton sent was decoded


def _traceparent(index: int) -> tuple[str, str, str]:
    trace_id, span_id = f"{0xA0 + index:032x}", f"{0xB0 + index:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _gateway_config(triton_url: str, otlp_port: int | None, batching: dict | None = None) -> dict:
    config = triton_config(triton_url)
    if batching is not None:
        config["models"]["linear"]["batching"] = batching
    if otlp_port is not None:
        config["telemetry"] = {"service_name": "gw", "otlp_endpoint": f"http://127.0.0.1:{otlp_port}"}
    return config


def _triton_requests(receiver: OtlpHttpReceiver, trace_ids: set[str], count: int) -> list:
    """Triton's request spans in ``trace_ids``, once ``count`` have arrived with their model span."""

    def arrived():
        spans = [s for s in receiver.spans_of(TRITON_SERVICE_NAME) if s.trace_id.hex() in trace_ids]
        requests = [s for s in spans if s.name == TRITON_REQUEST_SPAN]
        models = {s.parent_span_id for s in spans if s.name == TRITON_MODEL}
        return requests if len(requests) >= count and all(r.span_id in models for r in requests) else None

    return wait_until(arrived, SPANS_TIMEOUT_S, interval_s=0.1, what=f"{count} Triton request span(s)")


async def _infer(port: int, traceparents: list[str]) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        results = await asyncio.gather(*(
            client.infer("linear", [linear_input(rows_for(i, rows=1))], headers={"traceparent": tp}, client_timeout=60)
            for i, tp in enumerate(traceparents)
        ))
    finally:
        await client.close()
    assert all(result.as_numpy("PROBS").shape == (1, 4) for result in results)


async def test_triton_continues_the_trace_under_the_gateways_backend_span(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, port = otlp_receiver
    trace_id, caller_span, traceparent = _traceparent(1)
    async with running_gateway(_gateway_config(triton.url, port)) as gateway:
        await _infer(gateway.port, [traceparent])
    # Gateway.stop flushed the gateway's exporter; Triton exports every 100 ms.
    (request,) = _triton_requests(triton_spans, {trace_id}, 1)
    spans = [span for _, span in gateway_spans.spans if span.trace_id.hex() == trace_id]
    (server,) = [span for span in spans if span.name == "infergate/ModelInfer"]
    (backend,) = [span for span in spans if span.name == "infergate/backend"]
    assert server.parent_span_id.hex() == caller_span
    assert backend.parent_span_id == server.span_id and backend.kind == backend.SPAN_KIND_CLIENT
    assert {a.key: a.value.string_value for a in backend.attributes}["infergate.backend.kind"] == "triton"
    # What Triton received: the caller's trace id, the gateway's backend span as parent.
    assert request.trace_id.hex() == trace_id
    assert request.parent_span_id == backend.span_id
    assert request.parent_span_id.hex() != caller_span
    # Triton's own timeline sits inside the gateway's backend call (same host, same clock).
    assert backend.start_time_unix_nano <= request.start_time_unix_nano <= request.end_time_unix_nano <= backend.end_time_unix_nano


async def test_a_batch_reaches_triton_as_one_request_under_the_batchs_backend_span(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, port = otlp_receiver
    callers = [_traceparent(10 + i) for i in range(BATCH_CALLERS)]
    trace_ids = {trace_id for trace_id, _, _ in callers}
    # A long delay and a full batch of BATCH_CALLERS rows: the callers share one Triton call.
    batching = {"max_batch_size": BATCH_CALLERS, "dispatch": "delay", "max_delay_us": 5_000_000}
    async with running_gateway(_gateway_config(triton.url, port, batching)) as gateway:
        await _infer(gateway.port, [traceparent for _, _, traceparent in callers])
    (request,) = _triton_requests(triton_spans, trace_ids, 1)
    (backend,) = [span for _, span in gateway_spans.spans if span.name == "infergate/backend" and span.trace_id.hex() in trace_ids]
    assert {a.key: a.value.int_value for a in backend.attributes}["infergate.batch.rows"] == BATCH_CALLERS
    assert request.trace_id == backend.trace_id  # the trace of the batch's first traced request
    assert request.parent_span_id == backend.span_id
    await asyncio.sleep(0.5)  # two export periods: no second Triton request shows up for the other callers
    assert len([s for s in triton_spans.spans_of(TRITON_SERVICE_NAME)
                if s.name == TRITON_REQUEST_SPAN and s.trace_id.hex() in trace_ids]) == 1


async def test_with_tracing_off_triton_gets_the_callers_context_as_it_came(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, _port = otlp_receiver
    trace_id, caller_span, traceparent = _traceparent(20)
    async with running_gateway(_gateway_config(triton.url, None)) as gateway:
        assert not gateway.tracing.enabled
        await _infer(gateway.port, [traceparent])
    (request,) = _triton_requests(triton_spans, {trace_id}, 1)
    assert request.trace_id.hex() == trace_id
    assert request.parent_span_id.hex() == caller_span  # forwarded untouched: the gateway made no span
    assert gateway_spans.spans == []
