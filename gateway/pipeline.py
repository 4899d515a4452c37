"""The serving pipeline behind the inference servicer: route, run, record.

``ModelEndpoint`` is one model as callers see it (its name, its signature, its variants);
``Variant`` is one way to serve it (a backend and a model there). ``Pipeline.infer`` picks a
variant for a validated request, runs it and reports which variant answered. Servicers only
convert messages and call into here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from infergate.backends.base import Backend, ModelSignature
from infergate.backends.resilience import CircuitBreaker
from infergate.gateway import metrics
from infergate.gateway.config import ModelRouteConfig
from infergate.gateway.errors import BackendUnavailable, GatewayError, Internal, NotFound
from infergate.gateway.identity import ANONYMOUS, Identity
from infergate.gateway.telemetry import BACKEND_SPAN, FEATURES_SPAN, ROUTE_SPAN, outgoing_headers, stage_span
from infergate.router.batcher import Batcher
from infergate.router.selector import VariantSelector

if TYPE_CHECKING:
    from infergate.gateway.features import FeatureStore

log = logging.getLogger(__name__)


class CallContext:
    """What the gateway knows about one call besides its tensors."""

    __slots__ = ("metadata", "parameters", "deadline", "identity", "headers", "request_id")

    def __init__(
        self,
        metadata: Mapping[str, str],
        parameters: Mapping[str, Any],
        deadline: float,
        identity: Identity = ANONYMOUS,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> None:
        self.metadata = metadata
        """Invocation metadata, keys lower-case (``x-infergate-variant``, ``traceparent``...)."""
        self.parameters = parameters
        """Request parameters, already checked for reserved names."""
        self.deadline = deadline
        """Absolute, on ``time.monotonic``."""
        self.identity = identity
        """Who is calling (set by the auth layer)."""
        self.headers = headers
        """Trace context to pass to the backend (None: none)."""
        self.request_id = request_id
        """The request's ``id`` (what feedback labels are joined on); may be empty."""


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    variant: str
    """The variant that actually answered (a fallback's name when one served)."""


class Variant:
    """One variant of a model, built complete by the server: ``backend`` is the whole stack that
    serves ``target`` (``Batcher(ResilientBackend(OnnxBackend))``, or the ``ResilientBackend`` alone
    when the variant does not batch)."""

    __slots__ = (
        "model", "name", "backend", "target", "signature", "fallback", "breaker", "ready", "served", "duration", "batches",
    )

    def __init__(
        self,
        model: str,
        name: str,
        backend: Backend,
        target: str,
        signature: ModelSignature | None,
        fallback: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.backend = backend
        self.target = target
        self.signature = signature
        """None only for a stand-in whose backend was unreachable at start (never ready)."""
        self.fallback = fallback
        self.breaker = breaker
        self.ready = True
        """The backend's last readiness answer for this model (kept by the server's poller)."""
        self.served = metrics.REQUESTS.labels(model, name, "OK").inc
        self.duration = metrics.REQUEST_DURATION.labels(model, name).observe
        """Bound updates of this variant's served counter and duration histogram (``metrics.record``)."""
        self.batches = isinstance(backend, Batcher)
        """Whether calls go through a batcher (which makes the backend span of the batch)."""

    def available(self) -> bool:
        """False while the model reports not ready or its backend is ejected: use the fallback at once."""
        return self.ready and (self.breaker is None or self.breaker.accepting())

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> Awaitable[dict[str, np.ndarray]]:
        """Run one request on this variant's stack (returns the stack's awaitable: no frame of its own)."""
        return self.backend.infer(self.target, inputs, outputs, deadline, headers)


@dataclass
class ModelEndpoint:
    """A model as callers see it."""

    name: str
    config: ModelRouteConfig
    variants: dict[str, Variant]
    signature: ModelSignature | None
    """The signature requests are validated against: the baseline variant's (with the entity input
    in place of the feature input when the model has online features); None while no variant could
    be loaded (its backend unreachable since start: calls get UNAVAILABLE until one loads)."""
    stats: "ModelStats" = field(default_factory=lambda: ModelStats())
    feature_store: "FeatureStore | None" = None
    """Where this model's online features come from (None when it has none)."""
    refusal: str = ""
    """Why the model cannot serve at all (every variant's file was refused at load); "" when it can."""

    in_flight_inc: Any = field(init=False, repr=False)
    in_flight_dec: Any = field(init=False, repr=False)
    """This model's in-flight gauge updates, bound once (``labels()`` costs more than ``inc()``)."""

    def __post_init__(self) -> None:
        gauge = metrics.IN_FLIGHT.labels(self.name)
        self.in_flight_inc, self.in_flight_dec = gauge.inc, gauge.dec

    @property
    def max_batch_size(self) -> int:
        """Rows one call may carry (0: no limit); a model with online features at most
        ``features.max_entities`` (each row is one Redis read)."""
        if self.config.batching is not None:
            limit = self.config.batching.max_batch_size
        else:
            limit = self.signature.max_batch_size if self.signature is not None else 0
        if self.config.features is not None:
            entities = self.config.features.max_entities
            limit = min(limit, entities) if limit else entities
        return limit


@dataclass
class ModelStats:
    """Counters behind ModelStatistics (Triton's names, the gateway's view)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, duration_ns: int, rows: int) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += duration_ns
            self.inference_count += max(rows, 1)
            self.execution_count += 1
        else:
            self.fail_count += 1
            self.fail_ns += duration_ns
        self.last_inference_ms = int(time.time() * 1000)


@dataclass(frozen=True)
class CallRecord:
    """One finished call, for observers (canary analysis, shadow copies)."""

    endpoint: ModelEndpoint
    chosen: str
    """The variant routing chose (``result.variant`` differs when a fallback served)."""
    code: str
    """``OK`` or the status name the caller gets."""
    duration_s: float
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    result: InferResult | None
    """The live answer; None when the call failed."""
    context: CallContext | None = None
    """The call's context (request id, identity); None only in records built by tests."""


CallObserver = Callable[[CallRecord], None]
"""Called after each call on the event loop; must be cheap and must not raise."""


class Pipeline:
    """Routes validated calls to variants and records the outcome."""

    def __init__(
        self,
        endpoints: Mapping[str, ModelEndpoint],
        selector: VariantSelector,
        observers: Sequence[CallObserver] = (),
        tracer: trace.Tracer | None = None,
        refused: Callable[[str, str, Identity, str], None] | None = None,
    ):
        """``tracer``: the gateway's, when tracing is on (stage spans for sampled calls).
        ``refused(model, code, identity, request_id)``: told of a call routing refuses (a bad pin,
        no sticky key), which no variant's outcome records (``gateway.logs.RefusedCalls.record``)."""
        self.endpoints = dict(endpoints)
        self.selector = selector
        self.observers = tuple(observers)
        self._tracer = tracer
        self._refused = refused

    def endpoint(self, model: str) -> ModelEndpoint:
        endpoint = self.endpoints.get(model)
        if endpoint is None:
            raise NotFound(f"unknown model {model!r}")
        return endpoint

    async def infer(
        self,
        endpoint: ModelEndpoint,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        ctx: CallContext,
        rows: int = 0,
    ) -> InferResult:
        """Choose a variant, add online features, run it (its fallback chain while backends are
        down) and record the outcome; GatewayErrors pass through, anything else becomes INTERNAL."""
        started = time.perf_counter_ns()
        tracer = self._tracer
        traced = tracer is not None and trace.get_current_span().is_recording()
        if traced:
            route_ns = time.time_ns()
        try:
            chosen, reason = self.selector.select(endpoint.name, endpoint.variants, ctx.metadata, ctx.parameters)
        except GatewayError as exc:  # refused by routing, before any variant: recorded as a refusal
            if self._refused is not None:
                self._refused(endpoint.name, exc.code.name, ctx.identity, ctx.request_id)
            raise
        if traced:
            route_ns = (route_ns, time.time_ns())
        variant = endpoint.variants[chosen]
        code = "OK"
        result: InferResult | None = None
        record = metrics.record
        record(endpoint.in_flight_inc, 1)
        try:
            if endpoint.feature_store is not None:
                features_ns = time.time_ns() if traced else 0
                inputs, misses = await endpoint.feature_store.enrich(endpoint.config.features, inputs, ctx.deadline)  # type: ignore[arg-type]
                if traced:
                    attributes = {"infergate.features.entities": len(next(iter(inputs.values()))), "infergate.features.misses": misses}
                    stage_span(tracer, FEATURES_SPAN, features_ns, time.time_ns(), attributes)
            tried: tuple[str, ...] = ()
            while True:
                tried += (variant.name,)
                fallback = variant.fallback if variant.fallback not in tried else ""
                if fallback and not variant.available():
                    variant = endpoint.variants[fallback]
                    continue
                try:
                    if traced and not variant.batches:
                        attributes = {
                            "infergate.backend.kind": variant.backend.kind,
                            "infergate.backend.name": variant.backend.name,
                            "infergate.backend.target": variant.target,
                            "infergate.batch.rows": rows,
                            **variant.backend.span_attributes,
                        }
                        with tracer.start_as_current_span(BACKEND_SPAN, kind=SpanKind.CLIENT, attributes=attributes):
                            headers = outgoing_headers()
                            answer = await variant.backend.infer(variant.target, inputs, outputs, ctx.deadline, headers)
                    else:
                        answer = await variant.backend.infer(variant.target, inputs, outputs, ctx.deadline, ctx.headers)
                except BackendUnavailable:
                    if not fallback or time.monotonic() >= ctx.deadline:
                        raise
                    variant = endpoint.variants[fallback]
                    continue
                if variant.name != chosen:
                    metrics.FALLBACKS.labels(endpoint.name, chosen, variant.name).inc()
                result = InferResult(answer, variant.name)
                return result
        except GatewayError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"  # the caller went away; not a success, not the backend's fault
            raise
        except Exception as exc:
            code = "INTERNAL"
            log.exception("model %s variant %s failed", endpoint.name, variant.name)
            raise Internal("internal error while serving the request") from exc
        finally:
            duration = time.perf_counter_ns() - started
            if traced:
                attributes = {
                    "infergate.variant.chosen": chosen,
                    "infergate.variant": variant.name,
                    "infergate.route.reason": reason if variant.name == chosen else "fallback",
                }
                stage_span(tracer, ROUTE_SPAN, route_ns[0], route_ns[1], attributes)
            record(endpoint.in_flight_dec, 1)
            endpoint.stats.record(code == "OK", duration, rows)
            if code == "OK":
                record(variant.served, 1)
                record(variant.duration, duration / 1e9)
            else:
                metrics.REQUESTS.labels(endpoint.name, variant.name, code).inc()
            if self.observers:
                record = CallRecord(endpoint, chosen, code, duration / 1e9, inputs, outputs, result, ctx)
                for observe in self.observers:
                    observe(record)
