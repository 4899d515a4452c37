"""Everything routing needs in one replica, started and stopped as one piece by the server.

``Routing`` owns the variant selector (always), the Redis route store and one canary controller
per model with a ``canary`` block (when ``redis.url`` is set), and the shadow dispatcher (for
models with a ``shadow`` block). The server installs ``selector`` as the pipeline's chooser and
``observers`` as its call observers, registers the admin servicer with ``add_admin``, and calls
``stop`` after the gRPC server has stopped taking calls and before backends close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc

from infergate.gateway import metrics
from infergate.gateway.config import GatewayConfig
from infergate.gateway.pipeline import CallObserver, CallRecord, ModelEndpoint, Pipeline
from infergate.router.audit import AuditRecord
from infergate.router.canary import CanaryController
from infergate.router.selector import RouteSelector
from infergate.router.shadow import ShadowDispatcher
from infergate.router.state import RouteStore
from infergate.router.table import Route, RouteTable

log = logging.getLogger(__name__)

FALLBACK_SERVED = "UNAVAILABLE"
"""How the canary counts a call its chosen variant could not serve although a fallback did."""


class Routing:
    def __init__(
        self,
        config: GatewayConfig,
        routes: RouteTable,
        endpoints: Mapping[str, ModelEndpoint],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._routes = routes
        self._endpoints = dict(endpoints)
        self._wall_clock = wall_clock
        self.selector = RouteSelector(routes)
        self.store: RouteStore | None = None
        self.canaries: dict[str, CanaryController] = {}
        self.shadow = ShadowDispatcher(config.server.default_deadline_ms / 1000, clock=clock)
        self._shadowed: set[str] = set()
        self._admin = None

    @property
    def observers(self) -> list[CallObserver]:
        """The pipeline's call observers: none unless a model has a canary or a shadow."""
        return [self.observe] if self.canaries or self._shadowed else []

    async def start(self) -> None:
        """Load routes (from Redis when configured), start canary controllers and shadow workers."""
        for model, config in self._config.models.items():
            self.selector.configure(model, config.routing.sticky_key, config.routing.salt)
        for route in self._routes.routes():
            self._route_changed(route, None)
        if self._config.redis.url:
            self.store = RouteStore(
                self._config.redis.url,
                self._config.models,
                self._routes,
                socket_timeout_s=self._config.redis.socket_timeout_ms / 1000,
                wall_clock=self._wall_clock,
            )
            self.store.add_listener(self._route_changed)
            await self.store.start()
        for model, config in self._config.models.items():
            if config.canary is None:
                continue
            if self.store is None:
                log.warning("model %s: the canary block needs redis.url; automated canary analysis is off", model)
                continue
            controller = CanaryController(model, config.baseline, config.canary, self.store, self._wall_clock)
            self.canaries[model] = controller
            await controller.start()
        for model, config in self._config.models.items():
            if config.shadow is not None and config.shadow.percent > 0:
                self.shadow.add(model, config.shadow, self._endpoints[model].variants[config.shadow.variant])
                self._shadowed.add(model)
        await self.shadow.start()

    async def stop(self) -> None:
        """Drop pending shadow copies, hand canary leases back, stop syncing. Safe after a failed start."""
        await self.shadow.stop()
        for controller in self.canaries.values():
            await controller.stop()
        self.canaries.clear()
        if self.store is not None:
            await self.store.stop()

    def add_admin(self, server, pipeline: Pipeline) -> str:
        """Register the RoutingAdmin servicer; returns its service name for reflection."""
        from infergate.gateway._proto.infergate.admin.v1 import admin_pb2_grpc
        from infergate.gateway.admin import SERVICE_NAME, RoutingAdminServicer

        self._admin = RoutingAdminServicer(pipeline, self._routes, self.store, self.canaries)
        admin_pb2_grpc.add_RoutingAdminServicer_to_server(self._admin, server)
        return SERVICE_NAME

    def end_watches(self) -> None:
        """End open WatchRoutes streams; call when shutdown begins, before the server's grace period."""
        if self._admin is not None:
            self._admin.end_watches()

    def observe(self, record: CallRecord) -> None:
        model = record.endpoint.name
        controller = self.canaries.get(model)
        result = record.result
        if controller is not None:
            served_elsewhere = result is not None and result.variant != record.chosen
            controller.observe(record.chosen, FALLBACK_SERVED if served_elsewhere else record.code, record.duration_s)
        if result is not None and model in self._shadowed:
            self.shadow.offer(model, result.variant, record.inputs, record.outputs, result.outputs)

    def _route_changed(self, route: Route, record: AuditRecord | None) -> None:
        self.selector.prepare(route)
        for variant, weight in route.weights.items():
            metrics.ROUTE_WEIGHT.labels(route.model, variant).set(weight)
