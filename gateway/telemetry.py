"""OpenTelemetry traces: one SERVER span per inference call, continued from the caller's W3C
``traceparent`` and passed on to Triton.

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
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from infergate.gateway.config import TelemetryConfig
from infergate.gateway.redaction import redact_url

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The gateway's tracer; ``start`` builds the exporter, ``shutdown`` flushes it."""

    def __init__(self, config: TelemetryConfig) -> None:
        self._config = config
        self._provider = None
        self.tracer: trace.Tracer = NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

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
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=500))
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


def mark_error(span: trace.Span, code_name: str, message: str) -> None:
    """Record a failed call on its span (status name and the caller-visible message only)."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code_name)
        span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message}"))


def outgoing_headers() -> dict[str, str] | None:
    """W3C trace headers for a call made in the current span, or None when there is none."""
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=otel_context.get_current())
    return carrier or None
