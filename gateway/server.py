"""The gateway process: builds everything from the config, serves, and shuts down in order.

``Gateway.start`` opens backends, loads every variant, installs the routes and starts the gRPC
server (inference, health, reflection) and the metrics endpoint. ``Gateway.stop`` is the SIGTERM
path: health turns NOT_SERVING, new calls are refused with UNAVAILABLE, in-flight calls get
``server.shutdown_grace_s`` to finish, then batchers stop and backends close. ``serve`` wires that to the signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Reflection resolves the inference service through the default descriptor pool, where
# tritonclient registers the same (wire-identical) definitions; see gateway/_proto/pool.py.
import tritonclient.grpc  # noqa: F401,E402

from infergate.backends.base import Backend, ModelSignature
from infergate.backends.onnx import OnnxBackend
from infergate.backends.refused import RefusedModel
from infergate.backends.resilience import ReadinessPoller, ResilientBackend, resilient
from infergate.backends.triton import TritonBackend
from infergate.gateway import metrics
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from infergate.gateway.auth import AuthSetupError, Authenticator
from infergate.gateway.config import GatewayConfig, ModelRouteConfig
from infergate.gateway.errors import ArtifactRejected, GatewayError
from infergate.gateway.features import FeatureStore, gateway_signature
from infergate.gateway.pipeline import ModelEndpoint, Pipeline, Variant
from infergate.gateway.servicer import InferenceServicer
from infergate.gateway.telemetry import Tracing
from infergate.router.batcher import Batcher
from infergate.router.runtime import Routing
from infergate.router.table import Route, RouteTable

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class StartupError(Exception):
    """The gateway cannot start with this config and these backends (exit code 1)."""


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, except that a Watch stream ends once shutdown has begun.

    By then the watcher has been sent NOT_SERVING; left open (gRPC client-side health checking keeps
    one per connection), its stream would hold ``server.stop(grace)`` for the whole grace period.
    The loop is the base class's, with the exit added; it uses the base's state attributes.
    """

    async def Watch(self, request, context):
        condition = self._server_watchers[request.service]
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._server_watchers.pop(request.service, None)


def build_backend(
    name: str, config, clock: Callable[[], float] = time.monotonic, digests: Mapping[str, str] | None = None
) -> Backend:
    """``digests``: expected SHA-256 per ONNX file path (``GatewayConfig.onnx_digests``)."""
    if config.kind == "onnx":
        return OnnxBackend(name, config, clock, digests)
    if config.kind == "triton":
        return TritonBackend(name, config, clock)
    raise StartupError(f"backends.{name}: unknown kind {config.kind!r}")


class Gateway:
    """One gateway replica inside one event loop."""

    def __init__(
        self,
        config: GatewayConfig,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._interceptors = list(interceptors)
        self.auth = Authenticator(config.auth) if config.auth.mode == "jwt" else None
        if self.auth is not None:  # first: a refused call reaches no other interceptor and no handler
            self._interceptors.insert(0, self.auth.interceptor)
        self._clock = clock
        self.backends: dict[str, Backend] = {}
        self.resilient: dict[str, ResilientBackend] = {}
        """The same backends behind their breaker, in-flight limit and retries; variants call these."""
        self._batchers: list[Batcher] = []
        self._pollers: list[ReadinessPoller] = []
        self.routes = RouteTable()
        self.routing: Routing | None = None
        """Selector, Redis route store, canary controllers and shadow copies (created in start)."""
        self.pipeline: Pipeline | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: InferenceServicer | None = None
        self._health: DrainingHealthServicer | None = None
        self._ready = False
        self.tracing = Tracing(config.telemetry)
        self.feature_store: FeatureStore | None = None
        self._stopped: asyncio.Event | None = None  # created in start(), inside the loop

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Open backends, load models, start serving. Raises StartupError with a clear message."""
        self._stopped = asyncio.Event()
        self.tracing.start()
        if self.auth is not None:
            try:
                await self.auth.start()
            except AuthSetupError as exc:
                raise StartupError(str(exc)) from exc
        if any(model.features for model in self.config.models.values()):
            self.feature_store = FeatureStore(self.config.redis.url, self.config.feature_views, self._clock)
            await self.feature_store.start()
        for name, backend_config in self.config.backends.items():
            backend = build_backend(name, backend_config, self._clock, self.config.onnx_digests(name))
            self.backends[name] = backend
            self.resilient[name] = resilient(backend, backend_config, self._clock)
            await self.resilient[name].start()  # starts the backend it wraps
        endpoints = {}
        for model_name, model_config in self.config.models.items():
            endpoints[model_name] = await self._load_model(model_name, model_config)
            route = Route(
                model_name,
                tuple(model_config.variants),
                {name: v.weight for name, v in model_config.variants.items()},
                revision=0,
            )
            self.routes.install(route)
            for variant, weight in route.weights.items():
                metrics.ROUTE_WEIGHT.labels(model_name, variant).set(weight)
        self.routing = Routing(self.config, self.routes, endpoints, self._clock)
        await self.routing.start()
        self.pipeline = Pipeline(endpoints, self.routes, self.routing.selector, self.routing.observers)
        await self._start_server()
        if self.config.server.metrics_listen:
            try:
                self.metrics_port = metrics.serve_metrics(self.config.server.metrics_listen)
            except OSError as exc:
                raise StartupError(f"server.metrics_listen: cannot bind {self.config.server.metrics_listen}: {exc.strerror or exc}") from exc
        self._ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _load_model(self, model_name: str, model_config: ModelRouteConfig) -> ModelEndpoint:
        variants: dict[str, Variant] = {}
        for name, variant_config in model_config.variants.items():
            backend = self.resilient[variant_config.backend]
            target = str(variant_config.path) if backend.kind == "onnx" else variant_config.model
            variant = Variant(model_name, name, backend, target, variant_config.fallback, backend.breaker)
            try:
                await variant.load()
            except ArtifactRejected as exc:
                # Kept in the route, never ready: the refusal shows in ModelReady, health and the admin API.
                log.error("models.%s.variants.%s: %s", model_name, name, exc.message)
                variant = Variant(model_name, name, RefusedModel(backend, exc.message), target, variant_config.fallback)
                variant.ready = False
            except GatewayError as exc:
                raise StartupError(f"models.{model_name}.variants.{name}: {exc.message}") from exc
            variants[name] = variant
        # The baseline's signature, or the first loaded variant's when the baseline's file was refused.
        candidates = [variants[model_config.baseline], *variants.values()]
        baseline = next((v for v in candidates if v.signature is not None), None)
        if baseline is None:  # every file refused: the model is listed, never ready, its calls UNAVAILABLE
            refusal = "; ".join(v.backend.reason for v in variants.values() if isinstance(v.backend, RefusedModel))
            return ModelEndpoint(model_name, model_config, variants, ModelSignature((), (), batched=False), refusal=refusal)
        for name, variant in variants.items():
            _check_compatible(model_name, baseline.name, baseline.signature, name, variant.signature)
        for variant in variants.values():
            await self._start_resilience(variant, model_config)
        signature = baseline.signature
        if model_config.features is not None:
            view = self.config.feature_views[model_config.features.view]
            try:
                signature = gateway_signature(signature, model_config.features, view.dim)
            except ValueError as exc:
                raise StartupError(f"models.{model_name}.features: {exc}") from exc
        return ModelEndpoint(model_name, model_config, variants, signature, feature_store=self.feature_store)

    async def _start_resilience(self, variant: Variant, model_config: ModelRouteConfig) -> None:
        """A batcher when the model batches and the signature allows; a readiness poller for Triton."""
        backend_config = self.config.backends[variant.backend.name]
        signature = variant.signature
        if model_config.batching is not None and signature is not None:
            if signature.batched:
                limits = [model_config.batching.max_batch_size, signature.max_batch_size]
                variant.batcher = Batcher(
                    variant.backend,
                    variant.target,
                    model_config.batching,
                    max_rows=min(limit for limit in limits if limit > 0),
                    max_inflight=backend_config.max_inflight_batches,
                    model=variant.model,
                    variant=variant.name,
                    clock=self._clock,
                )
                self._batchers.append(variant.batcher)
                await variant.batcher.start()
            else:
                log.warning("model %s variant %s: not batched, batching is off for it", variant.model, variant.name)
        if backend_config.kind == "triton":

            def note(ready: bool, variant: Variant = variant) -> None:
                variant.ready = ready

            poller = ReadinessPoller(
                lambda variant=variant: variant.backend.ready(variant.target), backend_config.readiness_poll_s, note
            )
            self._pollers.append(poller)
            await poller.start()

    async def _start_server(self) -> None:
        limit = self.config.server.max_message_bytes
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 1 if self.config.server.workers > 1 else 0),
        ]
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=options,
            maximum_concurrent_rpcs=self.config.server.max_concurrent_rpcs,
        )
        assert self.pipeline is not None
        self._servicer = InferenceServicer(
            self.pipeline, self.config.server.default_deadline_ms, lambda: self._ready, self.tracing
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        self._health = DrainingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        services.extend(self.extra_services(server))
        reflection.enable_server_reflection(services, server)
        listen = self.config.server.listen
        tls = self.config.server.tls
        if tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
                require_client_auth=tls.client_ca_file is not None,
            )
        try:  # grpcio raises RuntimeError when the address is taken or cannot be bound
            if tls is not None:
                self.port = server.add_secure_port(listen, credentials)
            else:
                self.port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise StartupError(f"server.listen: cannot bind {listen} (in use or not a local address)") from exc
        if not self.port:
            raise StartupError(f"server.listen: cannot bind {listen}")
        await server.start()
        self._server = server

    def extra_services(self, server: grpc.aio.Server) -> list[str]:
        """Hook for more services on the same server; returns their full names for reflection."""
        assert self.pipeline is not None and self.routing is not None
        return [self.routing.add_admin(server, self.pipeline)]

    async def _set_health(self, status) -> None:
        if self._health is None:
            return
        await self._health.set("", status)
        await self._health.set(INFERENCE_SERVICE, status)
        if self.pipeline is not None:
            for model, endpoint in self.pipeline.endpoints.items():
                refused = endpoint.refusal and status == health_pb2.HealthCheckResponse.SERVING
                await self._health.set(model, health_pb2.HealthCheckResponse.NOT_SERVING if refused else status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, close backends."""
        grace = self.config.server.shutdown_grace_s if grace_s is None else grace_s
        self._ready = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.routing is not None:  # open WatchRoutes streams would otherwise hold the whole grace period
            self.routing.end_watches()
        if self._server is not None:
            # Drain first: the server still accepts calls and the servicer refuses new inference
            # with UNAVAILABLE while in-flight ones finish. Stopping the server at once would cut
            # off calls it had received but not yet handed to the servicer (clients see CANCELLED).
            drain_started = time.monotonic()
            if self._servicer is not None:
                await self._servicer.drain(grace)
            await self._server.stop(max(0.0, grace - (time.monotonic() - drain_started)))
            self._server = None
        self.tracing.shutdown()
        if self.routing is not None:  # before backends close: shadow copies use them
            await self.routing.stop()
        if self.auth is not None:
            await self.auth.close()
        if self.feature_store is not None:
            await self.feature_store.close()
        for poller in self._pollers:
            await poller.stop()
        for batcher in self._batchers:  # in-flight calls are done: nothing is waiting on these
            await batcher.stop()
        for backend in self.resilient.values():  # each closes the backend it wraps
            try:
                await backend.close()
            except Exception:
                log.exception("closing backend %s failed", backend.name)
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()


def _check_compatible(
    model: str, baseline: str, base: ModelSignature, name: str, other: ModelSignature | None
) -> None:
    """Every variant must accept what the baseline accepts, so routing cannot turn a valid call invalid."""
    if other is None or name == baseline:
        return
    for spec in base.inputs:
        theirs = other.input(spec.name)
        if theirs is None or theirs.datatype != spec.datatype or len(theirs.shape) != len(spec.shape):
            raise StartupError(
                f"models.{model}.variants.{name}: input {spec.name} differs from the baseline {baseline}'s "
                f"({theirs} vs {spec})"
            )
    for spec in base.outputs:
        if other.output(spec.name) is None:
            raise StartupError(f"models.{model}.variants.{name}: has no output {spec.name} (the baseline {baseline} has)")


async def serve(config: GatewayConfig, gateway_factory: Callable[[GatewayConfig], Gateway] = Gateway) -> int:
    """Run one replica until SIGTERM or SIGINT; return the process exit code."""
    gateway = gateway_factory(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await gateway.start()
    except StartupError as exc:
        print(f"infergate: cannot start: {exc}", file=sys.stderr)
        await gateway.stop(0)
        return 1
    print(f"infergate listening on port {gateway.port} metrics_port {gateway.metrics_port or 0}", flush=True)
    if config.auth.mode == "none":
        log.warning("auth.mode is none: every caller may call every model")
    await stop_requested.wait()
    log.info("shutting down: refusing new calls, %.1fs for in-flight ones", config.server.shutdown_grace_s)
    await gateway.stop()
    return 0
