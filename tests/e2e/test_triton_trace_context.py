"""Triton receives the trace context the gateway passes on, checked against Triton's own traces.

A real Triton (nvidia-pytriton's binary) runs in its OpenTelemetry trace mode and exports its spans
over OTLP/HTTP to a real receiver in the test (``tests/support/otlp_http.py``); the gateway exports
its own spans over OTLP/gRPC to the receiver of ``test_tracing``. For a call made with a
``traceparent``, Triton's request span (``InferRequest``) must sit in the caller's trace with the
gateway's ``infergate/backend`` span as its parent: the context Triton continued is the one the
gateway injected, not the caller's and not a new trace.

Triton 2.51 (the one in nvidia-pytriton 0.7.0) does not continue every context it receives: for
some gRPC requests that carry a valid ``traceparent`` it starts a new trace with no parent (26 of
200 sequential calls made straight to it with tritonclient's stub, no gateway involved). So each
check makes several calls and asserts that every Triton request is either in its caller's trace
with the expected parent or a new root of Triton's own (nothing else), and that at least
``MIN_CONTINUED`` of ``CALLS`` (or ``BATCHES``) were continued: at the loss rate measured, a floor
missed by chance less than once in 10^5 runs.
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
CALLS = 8
BATCH_CALLERS = 3
BATCHES = 8
MIN_CONTINUED = 2


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
    trace_id, span_id = f"{0xA000 + index:032x}", f"{0xB000 + index:016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _gateway_config(triton_url: str, otlp_port: int | None, batching: dict | None = None) -> dict:
    config = triton_config(triton_url)
    if batching is not None:
        config["models"]["linear"]["batching"] = batching
    if otlp_port is not None:
        config["telemetry"] = {"service_name": "gw", "otlp_endpoint": f"http://127.0.0.1:{otlp_port}"}
    return config


def _triton_requests(receiver: OtlpHttpReceiver, after: int, count: int, trace_ids: set[str]) -> list:
    """The ``count`` Triton request spans exported after the receiver's first ``after`` spans,
    once each has arrived with its model span; checks that each is in one of ``trace_ids`` or a new
    root of Triton's own, and returns those in ``trace_ids`` (at least ``MIN_CONTINUED``)."""

    def arrived():
        spans = [span for resource, span in receiver.spans[after:] if resource.get("service.name") == TRITON_SERVICE_NAME]
        requests = [span for span in spans if span.name == TRITON_REQUEST_SPAN]
        models = {span.parent_span_id for span in spans if span.name == TRITON_MODEL}
        return requests if len(requests) >= count and all(r.span_id in models for r in requests) else None

    requests = wait_until(arrived, SPANS_TIMEOUT_S, interval_s=0.1, what=f"{count} Triton request spans")
    assert len(requests) == count
    continued = [r for r in requests if r.trace_id.hex() in trace_ids]
    restarted = [r for r in requests if r.trace_id.hex() not in trace_ids]
    assert all(r.parent_span_id == b"" for r in restarted)  # Triton's loss: a new root, never a wrong parent
    assert len(continued) >= MIN_CONTINUED, f"only {len(continued)} of {count} continued"
    return continued


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


def _gateway_spans(receiver, name: str) -> dict[str, object]:
    """The gateway's spans called ``name``, by trace id (one per trace)."""
    spans = [span for _, span in receiver.spans if span.name == name]
    by_trace = {span.trace_id.hex(): span for span in spans}
    assert len(by_trace) == len(spans)
    return by_trace


async def test_triton_continues_the_trace_under_the_gateways_backend_span(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, port = otlp_receiver
    callers = [_traceparent(i) for i in range(CALLS)]
    after = len(triton_spans.spans)
    async with running_gateway(_gateway_config(triton.url, port)) as gateway:
        for _, _, traceparent in callers:  # one at a time: one Triton request each
            await _infer(gateway.port, [traceparent])
    # Gateway.stop flushed the gateway's exporter; Triton exports every 100 ms.
    continued = _triton_requests(triton_spans, after, CALLS, {trace_id for trace_id, _, _ in callers})
    servers = _gateway_spans(gateway_spans, "infergate/ModelInfer")
    backends = _gateway_spans(gateway_spans, "infergate/backend")
    for trace_id, caller_span, _ in callers:
        assert servers[trace_id].parent_span_id.hex() == caller_span
        backend = backends[trace_id]
        assert backend.parent_span_id == servers[trace_id].span_id and backend.kind == backend.SPAN_KIND_CLIENT
        attributes = {a.key: a.value for a in backend.attributes}
        assert attributes["infergate.backend.kind"].string_value == "triton"
        # the RPC semantic conventions of a gRPC client span, naming the Triton it called
        assert {key: attributes[key].string_value for key in ("rpc.system", "rpc.service", "rpc.method", "server.address")} == {
            "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
            "server.address": "127.0.0.1"}
        assert attributes["server.port"].int_value == triton.grpc_port
    for request in continued:
        # What Triton received: the caller's trace id, the gateway's backend span as parent.
        assert request.parent_span_id == backends[request.trace_id.hex()].span_id


async def test_a_batch_reaches_triton_as_one_request_under_the_batchs_backend_span(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, port = otlp_receiver
    batches = [[_traceparent(100 + BATCH_CALLERS * b + i) for i in range(BATCH_CALLERS)] for b in range(BATCHES)]
    trace_ids = {trace_id for batch in batches for trace_id, _, _ in batch}
    after = len(triton_spans.spans)
    # A long delay and a full batch of BATCH_CALLERS rows: each group of callers shares one Triton call.
    batching = {"max_batch_size": BATCH_CALLERS, "dispatch": "delay", "max_delay_us": 5_000_000}
    async with running_gateway(_gateway_config(triton.url, port, batching)) as gateway:
        for batch in batches:
            await _infer(gateway.port, [traceparent for _, _, traceparent in batch])
    continued = _triton_requests(triton_spans, after, BATCHES, trace_ids)  # one Triton request per batch
    backends = _gateway_spans(gateway_spans, "infergate/backend")
    assert len(backends) == BATCHES  # one backend span per batch, in the trace of its first traced request
    for backend in backends.values():
        attributes = {a.key: a.value for a in backend.attributes}
        assert attributes["infergate.batch.rows"].int_value == BATCH_CALLERS
        assert attributes["rpc.system"].string_value == "grpc" and attributes["server.port"].int_value == triton.grpc_port
    for request in continued:
        assert request.parent_span_id == backends[request.trace_id.hex()].span_id


async def test_with_tracing_off_triton_gets_the_callers_context_as_it_came(traced_triton, otlp_receiver):
    triton, triton_spans = traced_triton
    gateway_spans, _port = otlp_receiver
    callers = [_traceparent(200 + i) for i in range(CALLS)]
    after = len(triton_spans.spans)
    async with running_gateway(_gateway_config(triton.url, None)) as gateway:
        assert not gateway.tracing.enabled
        for _, _, traceparent in callers:
            await _infer(gateway.port, [traceparent])
    continued = _triton_requests(triton_spans, after, CALLS, {trace_id for trace_id, _, _ in callers})
    parents = {trace_id: caller_span for trace_id, caller_span, _ in callers}
    for request in continued:
        assert request.parent_span_id.hex() == parents[request.trace_id.hex()]  # forwarded untouched
    assert gateway_spans.spans == []
