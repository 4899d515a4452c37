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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from infergate.backends.base import Backend, ModelSignature
from infergate.backends.resilience import CircuitBreaker
from infergate.gateway import metrics
from infergate.gateway.config import ModelRouteConfig
from infergate.gateway.errors import BackendUnavailable, GatewayError, Internal, NotFound
from infergate.gateway.identity import ANONYMOUS, Identity
from infergate.gateway.telemetry import outgoing_headers
from infergate.router.batcher import Batcher
from infergate.router.table import RouteTable, weighted_choice

if TYPE_CHECKING:
    from infergate.gateway.features import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallContext:
    """What the gateway knows about one call besides its tensors."""

    metadata: Mapping[str, str]
    """Invocation metadata, keys lower-case (``x-infergate-variant``, ``traceparent``...)."""
    parameters: Mapping[str, Any]
    """Request parameters, already checked for reserved names."""
    deadline: float
    """Absolute, on ``time.monotonic``."""
    identity: Identity = ANONYMOUS
    """Who is calling (set by the auth layer)."""


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    variant: str
    """The variant that actually answered (a fallback's name when one served)."""


class Variant:
    """One variant of a model: a backend and the model name (or file) there.

    The server gives it a ``ResilientBackend`` (breaker, in-flight limit, retries, backend timing)
    and, when the model has a ``batching`` block and a batched signature, a ``Batcher`` around it.
    """

    def __init__(
        self,
        model: str,
        name: str,
        backend: Backend,
        target: str,
        fallback: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.backend = backend
        self.target = target
        self.fallback = fallback
        self.breaker = breaker
        self.signature: ModelSignature | None = None
        self.batcher: Batcher | None = None
        """Set by the server after ``load`` when this variant batches."""
        self.ready = True
        """The backend's last readiness answer for this model (kept by the server's poller)."""

    async def load(self) -> ModelSignature:
        self.signature = await self.backend.load(self.target)
        return self.signature

    def available(self) -> bool:
        """False while the model reports not ready or its backend is ejected: use the fallback at once."""
        return self.ready and (self.breaker is None or self.breaker.accepting())

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request on this variant: through its batcher when it has one."""
        if self.batcher is not None:
            return await self.batcher.infer(inputs, outputs, deadline, headers)
        return await self.backend.infer(self.target, inputs, outputs, deadline, headers)


@dataclass
class ModelEndpoint:
    """A model as callers see it."""

    name: str
    config: ModelRouteConfig
    variants: dict[str, Variant]
    signature: ModelSignature
    """The signature requests are validated against: the baseline variant's (with the entity input
    in place of the feature input when the model has online features)."""
    stats: "ModelStats" = field(default_factory=lambda: ModelStats())
    feature_store: "FeatureStore | None" = None
    """Where this model's online features come from (None when it has none)."""
    refusal: str = ""
    """Why the model cannot serve at all (every variant's file was refused at load); "" when it can."""

    @property
    def max_batch_size(self) -> int:
        if self.config.batching is not None:
            return self.config.batching.max_batch_size
        return self.signature.max_batch_size


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


VariantChooser = Callable[[ModelEndpoint, CallContext], str]


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


CallObserver = Callable[[CallRecord], None]
"""Called after each call on the event loop; must be cheap and must not raise."""


def choose_by_weight(routes: RouteTable) -> VariantChooser:
    """The simplest chooser: weighted random over the route's current weights."""

    def choose(endpoint: ModelEndpoint, ctx: CallContext) -> str:
        return weighted_choice(routes.get(endpoint.name))

    return choose


class Pipeline:
    """Routes validated calls to variants and records the outcome."""

    def __init__(
        self,
        endpoints: Mapping[str, ModelEndpoint],
        routes: RouteTable,
        chooser: VariantChooser | None = None,
        observers: Sequence[CallObserver] = (),
    ):
        self.endpoints = dict(endpoints)
        self.routes = routes
        self.choose = chooser or choose_by_weight(routes)
        self.observers = tuple(observers)

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
        started = time.perf_counter_ns()
        chosen = variant_name = self.choose(endpoint, ctx)
        code = "OK"
        result: InferResult | None = None
        try:
            headers = _forwarded_headers(ctx.metadata)
            if endpoint.feature_store is not None and endpoint.config.features is not None:
                inputs = await endpoint.feature_store.enrich(endpoint.config.features, inputs, ctx.deadline)
            tried: set[str] = set()
            while True:  # the chosen variant, then its fallback chain while backends are down
                variant = endpoint.variants[variant_name]
                tried.add(variant_name)
                fallback = variant.fallback if variant.fallback not in tried else ""
                if fallback and not variant.available():
                    variant_name = fallback
                    continue
                try:
                    answer = await variant.infer(inputs, outputs, ctx.deadline, headers)
                except BackendUnavailable:
                    if not fallback or time.monotonic() >= ctx.deadline:
                        raise
                    variant_name = fallback
                    continue
                if variant_name != chosen:
                    metrics.FALLBACKS.labels(endpoint.name, chosen, variant_name).inc()
                result = InferResult(answer, variant_name)
                return result
        except GatewayError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"  # the caller went away; not a success, not the backend's fault
            raise
        except Exception as exc:
            code = "INTERNAL"
            log.exception("model %s variant %s failed", endpoint.name, variant_name)
            raise Internal("internal error while serving the request") from exc
        finally:
            duration = time.perf_counter_ns() - started
            endpoint.stats.record(code == "OK", duration, rows)
            metrics.REQUESTS.labels(endpoint.name, variant_name, code).inc()
            if code == "OK":
                metrics.REQUEST_DURATION.labels(endpoint.name, variant_name).observe(duration / 1e9)
            if self.observers:
                record = CallRecord(endpoint, chosen, code, duration / 1e9, inputs, outputs, result)
                for observe in self.observers:
                    observe(record)


_FORWARDED = ("traceparent", "tracestate")


def _forwarded_headers(metadata: Mapping[str, str]) -> dict[str, str] | None:
    """Trace context for the backend: the gateway's own span when tracing is on, else the caller's."""
    headers = outgoing_headers()
    if headers is None:
        headers = {key: metadata[key] for key in _FORWARDED if key in metadata} or None
    return headers
