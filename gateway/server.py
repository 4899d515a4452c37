"""The gateway process: builds everything from the config, serves, and shuts down in order.

``Gateway.start`` opens backends, loads every variant, installs the routes and starts the gRPC
server (inference, health, reflection) and the metrics endpoint. ``Gateway.stop`` is the SIGTERM
path: health turns NOT_SERVING, new calls are refused with UNAVAILABLE, in-flight calls get
``server.shutdown_grace_s`` to finish, then batchers stop and backends close. ``serve`` wires that to the signals.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

# Reflection resolves the inference service through the default descriptor pool, where
# tritonclient registers the same (wire-identical) definitions; see gateway/_proto/pool.py.
import tritonclient.grpc  # noqa: F401,E402

from infergate.backends.base import Backend, ModelSignature
from infergate.backends.onnx import OnnxBackend
from infergate.backends.refused import RefusedModel
from infergate.backends.resilience import ReadinessPoller, ResilientBackend, resilient
from infergate.backends.triton import TritonBackend
from infergate.gateway import __version__, metrics
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from infergate.gateway.auth import AuthSetupError, Authenticator
from infergate.gateway.config import GatewayConfig, ModelRouteConfig, cpus_available
from infergate.gateway.errors import ArtifactRejected, BackendUnavailable, GatewayError
from infergate.gateway.features import FeatureStore, gateway_signature
from infergate.gateway.feedback import add_feedback
from infergate.gateway.hangup import hang_up
from infergate.gateway.logs import AccessLog, RefusedCalls
from infergate.gateway.monitor import ModelMonitor, build_monitor
from infergate.gateway.pipeline import ModelEndpoint, Pipeline, Variant
from infergate.gateway.servicer import InferenceServicer
from infergate.gateway.telemetry import Tracing
from infergate.gateway.admission import MemoryBudget, limit_malloc_arenas
from infergate.gateway.open_services import BudgetedReflectionServicer, DrainingHealthServicer, OpenStreamBudget
from infergate.gateway.wire import DecodingRegistry
from infergate.router.batcher import Batcher
from infergate.gateway.routing import Routing
from infergate.router.table import Route, RouteTable

log = logging.getLogger(__name__)

STOP_GRACE_MIN_S = 1.0
"""The least time ``server.stop`` gives calls in progress; they are refusals or ending streams by then."""
WATCHES_END_WITHIN_S = 1.0
"""On shutdown, how long Health.Watch streams get to write NOT_SERVING and end before connections close."""
FLUSH_BEFORE_HANGUP_S = 0.05
"""Then this long for grpc core to send the last answers and statuses before the connections close."""
KEEPALIVE_OPTIONS = (
    # A client may ping while it has calls open at most every 10 s (grpc's default is 5 min, which
    # cuts off clients that keep long streams alive), and not at all while it has none (grpc: 2 h).
    # Strikes reset whenever the gateway sends data; the third ping too soon is answered GOAWAY
    # ENHANCE_YOUR_CALM "too_many_pings" and the connection is closed, so a PING flood costs a
    # connection, not the gateway (tests/reliability/test_frame_floods.py).
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # The gateway's own keepalive pings to its clients: grpc's server defaults, stated.
    ("grpc.keepalive_time_ms", 2 * 3600 * 1000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)
"""HTTP/2 keepalive and ping-abuse settings of the gateway's server (explicit, not left to grpc)."""
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class StartupError(Exception):
    """The gateway cannot start with this config and these backends (exit code 1)."""


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
        """Run before the auth check (which runs in each method's handler wrapper, gateway/wire.py)."""
        logging_config = config.logging
        self.access_log = (
            AccessLog(logging_config.access_log_sample_ratio, log_failed=logging_config.log_failed_calls)
            if logging_config.access_log_sample_ratio > 0 or logging_config.log_failed_calls
            else None
        )
        self.refused_calls = RefusedCalls(config.models, self.access_log)
        """Calls refused before routing: counted and, with the access log, logged (auth, servicer, pipeline)."""
        self.auth = Authenticator(config.auth, on_refused=self.refused_calls.auth_refused) if config.auth.mode == "jwt" else None
        self._clock = clock
        self.backends: dict[str, Backend] = {}
        self.resilient: dict[str, ResilientBackend] = {}
        """The same backends behind their breaker, in-flight limit and retries; variants call these."""
        self._batchers: list[Batcher] = []
        self._pollers: list[ReadinessPoller] = []
        self._late_loads: set[asyncio.Task] = set()
        """Variants whose backend was unreachable at start, being loaded once it answers."""
        self._metrics_flush: asyncio.Task | None = None
        """A worker of several applies its deferred metric updates on a timer (``metrics.flush_periodically``)."""
        self._reference: dict[str, Variant] = {}
        """Per model, the variant whose signature the model serves (the others must be compatible)."""
        self.routes = RouteTable()
        self.routing: Routing | None = None
        """Selector, Redis route store, canary controllers and shadow copies (created in start)."""
        self.pipeline: Pipeline | None = None
        self.monitor: ModelMonitor | None = None
        """Drift, class shares and feedback accuracy (``monitoring.enabled``)."""
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
        metrics.BUILD_INFO.labels(__version__).set(1)
        if metrics.multiprocess_mode():
            self._metrics_flush = asyncio.create_task(metrics.flush_periodically(), name="metrics-flush")
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
        observers = list(self.routing.observers)
        if self.config.monitoring.enabled:
            try:
                self.monitor = build_monitor(self.config.monitoring, endpoints, self.routing.canaries)
            except ValueError as exc:
                raise StartupError(str(exc)) from exc
            observers.append(self.monitor.observe)
        if self.access_log is not None:
            observers.append(self.access_log.observe)
        self.pipeline = Pipeline(endpoints, self.routing.selector, observers, self._tracer(), self.refused_calls.record)
        await self._start_server()
        if self.config.server.metrics_listen:
            try:
                self.metrics_port = metrics.serve_metrics(self.config.server.metrics_listen)
            except OSError as exc:
                raise StartupError(f"server.metrics_listen: cannot bind {self.config.server.metrics_listen}: {exc.strerror or exc}") from exc
        self._ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _tracer(self):
        """The tracer for stage spans; None while tracing is off (then no span code runs per call)."""
        return self.tracing.tracer if self.tracing.enabled else None

    async def _load_model(self, model_name: str, model_config: ModelRouteConfig) -> ModelEndpoint:
        """Build every variant. One whose backend cannot be reached now (a Triton that is down) does
        not stop the start: it stands in unavailable (its fallback serves; UNAVAILABLE without one)
        and is built again, complete, once its backend is reachable (``_load_when_reachable``)."""
        variants: dict[str, Variant] = {}
        unreachable: list[str] = []
        for name, variant_config in model_config.variants.items():
            try:
                variants[name] = await self._build_variant(model_name, name, model_config)
            except BackendUnavailable as exc:
                resilient_backend = self.resilient[variant_config.backend]
                log.warning("models.%s.variants.%s: backend %s not reachable (%s); serving without it until it is",
                            model_name, name, resilient_backend.name, exc.message)
                variants[name] = _unreachable_variant(model_name, name, variant_config, resilient_backend)
                unreachable.append(name)
            except ArtifactRejected as exc:
                # Kept in the route, never ready: the refusal shows in ModelReady, health and the admin API.
                log.error("models.%s.variants.%s: %s", model_name, name, exc.message)
                refused = RefusedModel(self.resilient[variant_config.backend], exc.message)
                target = str(variant_config.path)
                variants[name] = Variant(model_name, name, refused, target, None, variant_config.fallback)
                variants[name].ready = False
        loaded = [v for v in variants.values() if v.signature is not None]
        # The baseline's signature, else (its backend is down) the first loaded variant's.
        baseline = variants[model_config.baseline]
        reference = baseline if baseline.signature is not None else (loaded or [None])[0]
        for variant in loaded:
            assert reference is not None and reference.signature is not None
            _check_compatible(model_name, reference.name, reference.signature, variant.name, variant.signature)
        feature_store = self.feature_store if model_config.features is not None else None
        endpoint = ModelEndpoint(model_name, model_config, variants, None, feature_store=feature_store)  # type: ignore[arg-type]
        if reference is not None:
            self._learn_signature(endpoint, reference)
        elif not unreachable:  # every file refused: the model is listed, never ready, its calls UNAVAILABLE
            endpoint.refusal = "; ".join(v.backend.reason for v in variants.values() if isinstance(v.backend, RefusedModel))
        for name in unreachable:
            task = asyncio.create_task(self._load_when_reachable(endpoint, name), name=f"load-{model_name}-{name}")
            self._late_loads.add(task)
            task.add_done_callback(self._late_loads.discard)
        return endpoint

    def _learn_signature(self, endpoint: ModelEndpoint, reference: Variant) -> None:
        """Give ``endpoint`` the signature callers see, from ``reference``'s (features added)."""
        model_config = endpoint.config
        signature = reference.signature
        assert signature is not None
        if model_config.features is not None:
            view = self.config.feature_views[model_config.features.view]
            try:
                signature = gateway_signature(signature, model_config.features, view.dim)
            except ValueError as exc:
                raise StartupError(f"models.{endpoint.name}.features: {exc}") from exc
        self._reference[endpoint.name] = reference
        endpoint.signature = signature

    async def _load_when_reachable(self, endpoint: ModelEndpoint, name: str) -> None:
        """Try to build variant ``name`` every ``readiness_poll_s`` until its backend answers; then
        check it against the signature the model serves (or learn that signature from it) and put
        it in place of its unavailable stand-in."""
        variant_config = endpoint.config.variants[name]
        interval_s = self.config.backends[variant_config.backend].readiness_poll_s
        reported = ""
        while True:
            await asyncio.sleep(interval_s)
            try:
                variant = await self._build_variant(endpoint.name, name, endpoint.config)
                break
            except BackendUnavailable:
                continue
            except (GatewayError, StartupError) as exc:  # e.g. Triton answers but is still loading its models
                message = getattr(exc, "message", str(exc))
                if message != reported:
                    log.warning("models.%s.variants.%s: backend answers but the model does not load yet (%s); retrying",
                                endpoint.name, name, message)
                    reported = message
        reference = self._reference.get(endpoint.name)
        try:
            if reference is None:
                self._learn_signature(endpoint, variant)
            else:
                assert reference.signature is not None
                _check_compatible(endpoint.name, reference.name, reference.signature, variant.name, variant.signature)
        except StartupError as exc:
            log.error("%s; the variant stays unavailable", exc)
            return
        endpoint.variants[name] = variant
        log.warning("models.%s.variants.%s: backend %s reachable, variant loaded and serving",
                    endpoint.name, name, variant_config.backend)
        if self._health is not None and self._ready:
            await self._health.set(endpoint.name, health_pb2.HealthCheckResponse.SERVING)

    async def _build_variant(self, model_name: str, name: str, model_config: ModelRouteConfig) -> Variant:
        """One variant, complete: its stack (``Batcher(ResilientBackend(...))`` when the model
        batches and its signature allows), its signature, and a readiness poller for Triton."""
        variant_config = model_config.variants[name]
        backend_config = self.config.backends[variant_config.backend]
        resilient_backend = self.resilient[variant_config.backend]
        target = str(variant_config.path) if backend_config.kind == "onnx" else variant_config.model
        try:
            signature = await resilient_backend.load(target)
        except (BackendUnavailable, ArtifactRejected):
            raise  # the caller decides: a stand-in for the variant (built later when its backend answers)
        except GatewayError as exc:
            raise StartupError(f"models.{model_name}.variants.{name}: {exc.message}") from exc
        stack: Backend = resilient_backend
        if model_config.batching is not None:
            if signature.batched:
                limits = [model_config.batching.max_batch_size, signature.max_batch_size]
                batcher = Batcher(
                    resilient_backend,
                    target,
                    model_config.batching,
                    max_rows=min(limit for limit in limits if limit > 0),
                    max_inflight=backend_config.max_inflight_batches,
                    model=model_name,
                    variant=name,
                    clock=self._clock,
                    tracer=self._tracer(),
                )
                self._batchers.append(batcher)
                metrics.QUEUE_CAPACITY.labels(model_name, name).set(model_config.batching.max_queue)
                await batcher.start()
                stack = batcher
            else:
                log.warning("model %s variant %s: not batched, batching is off for it", model_name, name)
        variant = Variant(
            model_name, name, stack, target, signature, variant_config.fallback, resilient_backend.breaker
        )
        if backend_config.kind == "triton":

            def note(ready: bool) -> None:
                variant.ready = ready

            poller = ReadinessPoller(lambda: resilient_backend.ready(target), backend_config.readiness_poll_s, note)
            self._pollers.append(poller)
            await poller.start()
        return variant

    async def _start_server(self) -> None:
        limit = self.config.server.max_message_bytes
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 1 if self.config.server.workers > 1 else 0),
            *KEEPALIVE_OPTIONS,
        ]
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=options,
            maximum_concurrent_rpcs=self.config.server.max_concurrent_rpcs,
        )
        assert self.pipeline is not None
        memory = MemoryBudget(self.config.server.max_inflight_request_bytes)
        limiter = self.auth.limiter if self.auth is not None else None
        self._servicer = InferenceServicer(
            self.pipeline, self.config.server.default_deadline_ms, lambda: self._ready, self.tracing,
            # each message of a stream is charged to its tenant, not only the stream's opening
            admit_message=(lambda identity: limiter.allow(identity.tenant)) if limiter is not None else None,
            memory=memory,
            refused=self.refused_calls,
        )
        # A message that does not parse: INVALID_ARGUMENT on every RPC; unary requests admitted by size.
        # The auth check runs there too, first: a refused call reaches no decoder and no handler.
        registry = DecodingRegistry(
            server, memory, self.auth.interceptor if self.auth is not None else None, self.refused_calls.auth_refused
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, registry)
        open_streams = OpenStreamBudget.from_config(self.config.server)  # Watch and reflection need no token
        self._health = DrainingHealthServicer(open_streams)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registry)
        services = [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        services.extend(self.extra_services(registry))
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(BudgetedReflectionServicer(services, open_streams), registry)
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

    def extra_services(self, server: DecodingRegistry) -> list[str]:
        """Hook for more services on the same server; returns their full names for reflection."""
        assert self.pipeline is not None and self.routing is not None
        services = [self.routing.add_admin(server, self.pipeline)]
        if self.monitor is not None:
            services.append(add_feedback(server, self.monitor))
        return services

    async def _set_health(self, status) -> None:
        if self._health is None:
            return
        await self._health.set("", status)
        await self._health.set(INFERENCE_SERVICE, status)
        if self.pipeline is not None:
            for model, endpoint in self.pipeline.endpoints.items():
                served = not endpoint.refusal and endpoint.signature is not None and any(v.available() for v in endpoint.variants.values())
                # A model none of whose variants could be loaded yet is not serving, honestly.
                await self._health.set(model, status if served else health_pb2.HealthCheckResponse.NOT_SERVING)

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
                await self._servicer.drain(grace, self.config.server.drain_notice_s)
            # grpc core drops the calls it holds when it stops (clients see CANCELLED) and sends GOAWAY
            # only after; shutting the listener and then the connections first ends them UNAVAILABLE
            # (gateway/hangup.py). No await before the stop: nothing may run in between.
            closed = (0, 0)
            if self._health is not None:  # watchers hear NOT_SERVING and their stream's end before the close
                await self._health.watches_ended(WATCHES_END_WITHIN_S)
            await asyncio.sleep(FLUSH_BEFORE_HANGUP_S)
            if self.port and not self.config.server.listen.startswith("unix:"):
                closed = hang_up(self.port)
            await self._server.stop(max(STOP_GRACE_MIN_S, grace - (time.monotonic() - drain_started)))
            log.info("drain over: listener and %d client connection(s) closed before the server stopped", closed[1])
            self._server = None
        self.tracing.shutdown()
        if self.routing is not None:  # before backends close: shadow copies use them
            await self.routing.stop()
        if self.auth is not None:
            await self.auth.close()
        if self.feature_store is not None:
            await self.feature_store.close()
        for task in list(self._late_loads):
            task.cancel()
        await asyncio.gather(*self._late_loads, return_exceptions=True)
        for poller in self._pollers:
            await poller.stop()
        for batcher in self._batchers:  # in-flight calls are done: nothing is waiting on these
            await batcher.close()
        for backend in self.resilient.values():  # each closes the backend it wraps
            try:
                await backend.close()
            except Exception:
                log.exception("closing backend %s failed", backend.name)
        if self._metrics_flush is not None:  # flushes once more as it ends
            self._metrics_flush.cancel()
            await asyncio.gather(self._metrics_flush, return_exceptions=True)
            self._metrics_flush = None
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()


def _unreachable_variant(model: str, name: str, config, backend: ResilientBackend) -> Variant:
    """The stand-in for a variant whose backend could not be reached at start: never available."""
    target = str(config.path) if backend.kind == "onnx" else config.model
    variant = Variant(model, name, backend, target, None, config.fallback, backend.breaker)
    variant.ready = False
    return variant


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


def log_started(gateway: Gateway) -> None:
    """The start-up line, in the log's format: version, ports, workers, models with their variants and backends."""
    config = gateway.config
    models = {
        name: {variant: f"{v.backend}:{v.model or (v.path.name if v.path else '')}" for variant, v in model.variants.items()}
        for name, model in config.models.items()
    }
    backends = {name: backend.kind for name, backend in config.backends.items()}
    log.info(
        "infergate %s serving %d model(s) on port %s, metrics port %s, %d worker(s)",
        __version__, len(models), gateway.port, gateway.metrics_port or "-", config.server.workers,
        extra={"fields": {"version": __version__, "port": gateway.port, "metrics_port": gateway.metrics_port or 0,
                          "workers": config.server.workers, "models": models, "backends": backends}},
    )


async def serve(config: GatewayConfig, gateway_factory: Callable[[GatewayConfig], Gateway] = Gateway) -> int:
    """Run one replica until SIGTERM or SIGINT; return the process exit code."""
    # Before grpc's server threads exist: fewer arenas keep large request buffers from staying resident.
    limit_malloc_arenas(max(2, cpus_available()))
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
    # What start-up built (modules, configs, sessions, handlers) lives as long as the process: moved
    # out of the collector's reach, a full collection scans only what serving allocated since. On
    # the pinned plain gateway, one full collection in 47 000 calls stopped the loop for 66 ms; with
    # the freeze there was none (BENCHMARKS.md, "Garbage collection").
    gc.collect()
    gc.freeze()
    print(f"infergate listening on port {gateway.port} metrics_port {gateway.metrics_port or 0}", flush=True)
    log_started(gateway)
    if config.auth.mode == "none":
        log.warning("auth.mode is none: every caller may call every model")
    await stop_requested.wait()
    log.info("shutting down: refusing new calls, %.1fs for in-flight ones", config.server.shutdown_grace_s)
    await gateway.stop()
    return 0
