"""OpenTelemetry traces: a SERVER span per inference call, continued from the caller's W3C
``traceparent``, with a child span per stage, and the trace context passed on to Triton.

Span names are few and fixed (no model names in them): ``infergate/ModelInfer`` (SERVER), and
its children ``infergate/auth``, ``infergate/route`` (chosen variant and why: pin, sticky,
weighted, fallback), ``infergate/features`` (entities, misses), ``infergate/queue`` (the wait in
the batch queue) and ``infergate/backend`` (CLIENT: backend kind, target, rows). A batch has one
backend span, a child of the first traced request in it, linked to the span of every traced
request in it. The server span carries the RPC semantic-convention attributes (``rpc.system``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``). Stage spans are only made for calls
whose server span is recording (sampled), so an unsampled call pays one check.

Export goes through a ``BatchSpanProcessor`` (bounded queue, drops with a warning when full,
export errors logged), so tracing never fails or slows a request. With no endpoint configured
(neither ``telemetry.otlp_endpoint`` nor ``OTEL_EXPORTER_OTLP_ENDPOINT``) the tracer is a no-op.
The provider is the gateway's own, not the process-global one, so several gateways (tests) and
other libraries do not interfere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from infergate.gateway.config import TelemetryConfig
from infergate.gateway.redaction import redact_url

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()

SERVER_SPAN = "infergate/ModelInfer"
AUTH_SPAN = "infergate/auth"
ROUTE_SPAN = "infergate/route"
FEATURES_SPAN = "infergate/features"
QUEUE_SPAN = "infergate/queue"
BACKEND_SPAN = "infergate/backend"
RPC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer"}


class Tracing:
    """The gateway's tracer; ``start`` builds the exporter, ``shutdown`` flushes it."""

    def __init__(self, config: TelemetryConfig) -> None:
        self._config = config
        self._ratio = config.sample_ratio
        self._provider = None
        self.tracer: trace.Tracer = NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def sampled(self, metadata: Mapping[str, str]) -> bool:
        """Whether a call is traced: the caller's W3C sampled flag when it sends a ``traceparent``,
        else a draw at ``sample_ratio`` (the SDK's ParentBased(TraceIdRatioBased) decision, taken
        before any span is made). An unsampled call then costs what it costs with tracing off: no
        span, no context, its own trace context passed on as it came."""
        traceparent = metadata.get("traceparent")
        if traceparent is not None:
            try:
                return bool(int(traceparent[-2:], 16) & 1) and len(traceparent) >= 55
            except ValueError:
                return False  # malformed: the SDK would start a new trace; treated as unsampled
        return self._ratio >= 1.0 or random.random() < self._ratio

    def start(self) -> None:
        endpoint = self._config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        if not endpoint:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": self._config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(self._config.sample_ratio)),
        )
        insecure = not endpoint.startswith("https://")
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=5)
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=4096, schedule_delay_millis=500))
        self._provider = provider
        self.tracer = provider.get_tracer("infergate")
        log.info("exporting traces to %s", redact_url(endpoint))

    def shutdown(self) -> None:
        provider, self._provider = self._provider, None
        self.tracer = NoOpTracer()
        if provider is not None:
            try:
                provider.shutdown()
            except Exception:
                log.warning("flushing traces failed", exc_info=True)

    @contextlib.contextmanager
    def server_span(self, name: str, metadata: Mapping[str, str], attributes: Mapping[str, str]) -> Iterator[trace.Span]:
        """A SERVER span continuing the caller's trace context (``traceparent``/``tracestate``).

        With tracing off this costs nothing: no span, no context switch (the caller's
        ``traceparent`` is then forwarded to the backend as it came).
        """
        if self._provider is None:
            yield trace.INVALID_SPAN
            return
        parent = _PROPAGATOR.extract(metadata) if "traceparent" in metadata else None
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes), record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span


def mark_error(span: trace.Span, code, message: str) -> None:
    """Record a failed call on its span (``code`` a ``grpc.StatusCode``; the caller-visible message only)."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


def stage_span(
    tracer: trace.Tracer,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, object] | None = None,
    parent: trace.Span | None = None,
) -> None:
    """A finished child span of ``parent`` (the current span by default) for a stage already timed."""
    context = trace.set_span_in_context(parent) if parent is not None else None
    span = tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes, record_exception=False)
    span.end(end_time=end_ns)


def outgoing_headers() -> dict[str, str] | None:
    """W3C trace headers for a call made in the current span, or None when there is none."""
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=otel_context.get_current())
    return carrier or None
