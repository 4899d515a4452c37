"""The routing admin servicer: ``infergate.admin.v1.RoutingAdmin`` over the route store.

Each method checks that the caller may administer routes (``Identity.may_admin``: the
``admin:routes`` scope once auth is on; PERMISSION_DENIED otherwise), converts the message, calls
the route store and converts back. The caller's token subject is what the audit log records.

Changes need Redis (``redis.url``): without it the routes are the config's and change calls fail
with FAILED_PRECONDITION. With Redis configured but unreachable, changes, the audit log and watches
fail UNAVAILABLE while the replica keeps serving its last known routes; ListRoutes and GetRoute
answer with those routes from memory, each marked ``stale`` with the time the store was lost, since
that is when an operator most needs to see what a replica serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from infergate.backends.refused import RefusedModel
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2_grpc as pb_grpc
from infergate.gateway.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from infergate.gateway.identity import Identity, current_identity
from infergate.gateway.pipeline import ModelEndpoint, Pipeline
from infergate.gateway.servicer import status_boundary
from infergate.router.audit import AuditRecord
from infergate.router.canary import CanaryController, CanaryState, VariantStats
from infergate.router.state import RouteStore
from infergate.router.table import Route, RouteTable

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RoutingAdmin"].full_name
MAX_WEIGHTS = 64
"""Entries a SetWeights may carry (each must name a variant of the model anyway)."""
WATCH_BUFFER = 256
"""Route changes buffered per watcher; a watcher that falls this far behind is ended (RESOURCE_EXHAUSTED)."""


def route_to_pb(route: Route, endpoint: ModelEndpoint, canary: pb.CanaryStatus | None = None) -> pb.Route:
    config = endpoint.config
    variants = [
        pb.VariantState(
            name=name,
            weight=route.weights.get(name, 0),
            backend=endpoint.variants[name].backend.name,
            health=_health(endpoint, name),
            fallback=config.variants[name].fallback,
        )
        for name in route.variants
    ]
    message = pb.Route(
        model=route.model,
        variants=variants,
        revision=route.revision,
        baseline=route.baseline,
        shadow_variant=config.shadow.variant if config.shadow else "",
        shadow_percent=round(config.shadow.percent) if config.shadow else 0,
        updated_at_unix_s=route.updated_at_unix_s,
        updated_by=route.updated_by,
    )
    if canary is not None:
        message.canary.CopyFrom(canary)
    return message


def canary_to_pb(controller: CanaryController, state: CanaryState | None, leader: str) -> pb.CanaryStatus:
    """The run's status; steps counted from 1 (``step: 2, steps: 4`` is the text's "step 2/4")."""
    config = controller.config
    message = pb.CanaryStatus(
        enabled=True,
        candidate=config.candidate,
        state="idle",
        leader=leader,
        last_reason="not started yet",
        steps=len(config.steps_percent),
        limits=pb.CanaryLimits(
            min_requests=config.min_requests,
            max_error_rate_increase=config.max_error_rate_increase,
            max_p99_latency_ratio=config.max_p99_latency_ratio,
            min_labels=config.min_labels,
            max_accuracy_decrease=config.max_accuracy_decrease,
        ),
    )
    if state is None:
        return message
    message.candidate = state.candidate or config.candidate
    message.state = state.state
    message.step = state.step
    message.current_percent = state.current_percent
    message.last_reason = state.last_reason
    if state.baseline_stats is not None and state.candidate_stats is not None and state.stats_window >= 0:
        message.last_window.CopyFrom(pb.CanaryWindow(
            start_unix_s=state.stats_window * config.interval_s,
            length_s=config.interval_s,
            baseline=_stats_to_pb(controller.baseline, state.baseline_stats),
            candidate=_stats_to_pb(config.candidate, state.candidate_stats),
            verdict=state.verdict,
        ))
    return message


def _stats_to_pb(variant: str, stats: VariantStats) -> pb.CanaryVariantStats:
    return pb.CanaryVariantStats(
        variant=variant,
        requests=stats.requests,
        errors=stats.errors,
        error_ratio=stats.error_rate,
        p99_ms=(stats.p99_s or 0.0) * 1000,
        labelled=stats.labelled,
        accuracy=stats.accuracy or 0.0,
    )


def audit_to_pb(record: AuditRecord) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=record.id,
        time_unix_s=record.time_unix_s,
        subject=record.subject,
        action=record.action,
        old_weights=dict(record.old_weights),
        new_weights=dict(record.new_weights),
        reason=record.reason,
        revision=record.revision,
        model=record.model,
    )


def _health(endpoint: ModelEndpoint, name: str) -> str:
    """``ok``; ``down`` while the model reports not ready or its backend's breaker is open;
    ``refused: <why>`` when its model file was refused at load (a digest mismatch)."""
    variant = endpoint.variants[name]
    if isinstance(variant.backend, RefusedModel):
        return f"refused: {variant.backend.reason}"
    return "ok" if variant.available() else "down"


def _log_change(action: str, identity: Identity, route: Route, reason: str) -> None:
    """One log line per admin change (the audit log in Redis is the record; this is for log search)."""
    weights = dict(route.weights)
    log.info(
        "admin %s on %s by %s: weights %s, revision %d, reason %r", action, route.model, identity.subject, weights,
        route.revision, reason,
        extra={"fields": {"action": action, "model": route.model, "by": identity.subject, "weights": weights,
                          "revision": route.revision, "reason": reason}},
    )


def _admin() -> Identity:
    identity = current_identity.get()
    if not identity.may_admin():
        raise PermissionDenied("routing admin calls need the admin:routes scope")
    return identity


class RoutingAdminServicer(pb_grpc.RoutingAdminServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        routes: RouteTable,
        store: RouteStore | None,
        canaries: Mapping[str, CanaryController],
    ) -> None:
        self._pipeline = pipeline
        self._routes = routes
        self._store = store
        self._canaries = canaries
        self._watches: set[asyncio.Queue] = set()

    def end_watches(self) -> None:
        """Shutdown has begun: end every WatchRoutes stream (UNAVAILABLE) so none holds the grace period."""
        for changes in self._watches:
            with contextlib.suppress(asyncio.QueueFull):
                changes.put_nowait(None)

    async def ListRoutes(self, request, context):
        async with status_boundary(context):
            _admin()
            return pb.ListRoutesResponse(routes=[await self._read(model) for model in self._pipeline.endpoints])

    async def GetRoute(self, request, context):
        async with status_boundary(context):
            _admin()
            self._pipeline.endpoint(request.model)
            return pb.GetRouteResponse(route=await self._read(request.model))

    async def SetWeights(self, request, context):
        async with status_boundary(context):
            identity = _admin()
            if len(request.weights) > MAX_WEIGHTS:
                raise InvalidArgument(f"{len(request.weights)} weights given; a route has at most {MAX_WEIGHTS} variants")
            route = await self._writer().set_weights(
                request.model, dict(request.weights), identity.subject, request.reason, request.expected_revision,
                request_id=request.request_id,
            )
            _log_change("set_weights", identity, route, request.reason)
            return pb.RouteChangeResponse(route=await self._route(route.model, route))

    async def Promote(self, request, context):
        async with status_boundary(context):
            identity = _admin()
            route = await self._writer().promote(
                request.model, request.variant, identity.subject, request.reason, request_id=request.request_id
            )
            _log_change("promote", identity, route, request.reason)
            return pb.RouteChangeResponse(route=await self._route(route.model, route))

    async def Rollback(self, request, context):
        async with status_boundary(context):
            identity = _admin()
            route = await self._writer().rollback(request.model, identity.subject, request.reason,
                                                  request_id=request.request_id)
            _log_change("rollback", identity, route, request.reason)
            return pb.RouteChangeResponse(route=await self._route(route.model, route))

    async def GetAuditLog(self, request, context):
        async with status_boundary(context):
            _admin()
            if request.model:
                self._pipeline.endpoint(request.model)
            records = await self._writer().audit_log(request.model, request.limit)
            return pb.GetAuditLogResponse(entries=[audit_to_pb(record) for record in records])

    async def WatchRoutes(self, request, context):
        """The current routes first, then one event per change until the caller goes away."""
        async with status_boundary(context):
            _admin()
            if request.model:
                self._pipeline.endpoint(request.model)
            store = self._writer()
            store.require_connected("watch routes")
            changes: asyncio.Queue[tuple[Route, AuditRecord | None] | None] = asyncio.Queue(maxsize=WATCH_BUFFER)
            overflow = asyncio.Event()

            def listen(route: Route, record: AuditRecord | None) -> None:
                if request.model and route.model != request.model:
                    return
                try:
                    changes.put_nowait((route, record))
                except asyncio.QueueFull:
                    overflow.set()

            store.add_listener(listen)
            self._watches.add(changes)
            try:
                models = [request.model] if request.model else list(self._pipeline.endpoints)
                for model in models:
                    yield pb.RouteEvent(route=await self._route(model))
                while True:
                    change = await changes.get()
                    if change is None:
                        raise Unavailable("the gateway is shutting down; watch another replica")
                    route, record = change
                    if overflow.is_set():
                        raise ResourceExhausted(f"watcher fell more than {WATCH_BUFFER} changes behind; watch again")
                    event = pb.RouteEvent(route=await self._route(route.model, route))
                    if record is not None:
                        event.change.CopyFrom(audit_to_pb(record))
                    yield event
            finally:
                store.remove_listener(listen)
                self._watches.discard(changes)

    # -- helpers -------------------------------------------------------------------------------

    def _writer(self) -> RouteStore:
        if self._store is None:
            raise FailedPrecondition("route changes need Redis: set redis.url (this gateway serves the config's routes)")
        return self._store

    async def _read(self, model: str) -> pb.Route:
        """The route this replica serves; from memory and marked stale while Redis is unreachable."""
        if self._store is not None and not self._store.connected:
            return self._stale_route(model, self._store)
        try:
            return await self._route(model)
        except Unavailable:
            if self._store is None:
                raise
            return self._stale_route(model, self._store)  # Redis went away between the check and the read

    def _stale_route(self, model: str, store: RouteStore) -> pb.Route:
        controller = self._canaries.get(model)
        canary = canary_to_pb(controller, controller.last_known, "") if controller is not None else None
        message = route_to_pb(self._routes.get(model), self._pipeline.endpoint(model), canary)
        message.stale = True
        message.stale_since_unix_s = store.unreachable_since or 0.0
        message.replica = store.replica_id
        return message

    async def _route(self, model: str, route: Route | None = None) -> pb.Route:
        endpoint = self._pipeline.endpoint(model)
        route = route or self._routes.get(model)
        controller = self._canaries.get(model)
        canary = None
        if controller is not None:
            canary = canary_to_pb(controller, await controller.status(), await controller.leader())
        return route_to_pb(route, endpoint, canary)
