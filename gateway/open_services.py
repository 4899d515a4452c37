"""The services every caller reaches without a token: ``grpc.health.v1.Health`` and reflection.

Their streams (``Health.Watch``, ``ServerReflectionInfo``) need no token and may stay open for
ever, and each one holds one of the server's ``max_concurrent_rpcs`` slots: left unbounded, 10k
Watch streams opened by anyone turned every call away, probes included. ``OpenStreamBudget``
gives them their own small budget (in total and per connection) and a lifetime, so that they can
never take the slots of authenticated traffic; a stream over budget ends at once with
RESOURCE_EXHAUSTED and gives its slot back. ``Health.Check`` is a short unary call and needs none.

``DrainingHealthServicer`` is grpc's asyncio health servicer with two changes: a Watch stream ends
once shutdown has begun (after NOT_SERVING was sent), and the condition a service's watchers
share is removed only when its last watcher leaves (grpc's removes it when any watcher leaves, so
the others never heard a later status, NOT_SERVING included).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from infergate.gateway.config import ServerConfig
from infergate.gateway.errors import ResourceExhausted

OVER_BUDGET_MESSAGE = "too many open health or reflection streams; try again later"


class OpenStreamBudget:
    """Slots for streams that need no token: at most ``total`` open, ``per_peer`` per connection,
    each for at most ``max_age_s`` (then it ends normally and the client opens it again)."""

    def __init__(self, total: int, per_peer: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.per_peer = per_peer
        self.max_age_s = max_age_s
        self._clock = clock
        self._open = 0
        self._by_peer: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_config(cls, server: ServerConfig) -> OpenStreamBudget:
        # Never more than a quarter of all call slots, whatever the config says.
        total = max(1, min(server.max_open_streams_without_auth, server.max_concurrent_rpcs // 4))
        return cls(total, server.max_open_streams_without_auth_per_connection, server.open_stream_without_auth_max_age_s)

    @property
    def open(self) -> int:
        return self._open

    def acquire(self, peer: str) -> float:
        """Take a slot for a stream of connection ``peer``; returns when the stream must end
        (``clock``). Raises ``ResourceExhausted`` when the budget or the connection's share is used up.
        Every successful ``acquire`` is paired with one ``release``."""
        if self._open >= self.total or self._by_peer[peer] >= self.per_peer:
            raise ResourceExhausted(OVER_BUDGET_MESSAGE)
        self._open += 1
        self._by_peer[peer] += 1
        return self._clock() + self.max_age_s

    def release(self, peer: str) -> None:
        self._open -= 1
        self._by_peer[peer] -= 1
        if not self._by_peer[peer]:
            del self._by_peer[peer]

    async def admit(self, context: grpc.aio.ServicerContext) -> float:
        """``acquire`` for the call's connection, or end the call with RESOURCE_EXHAUSTED."""
        try:
            return self.acquire(context.peer())
        except ResourceExhausted as exc:
            await context.abort(exc.code, exc.message)
            raise  # abort raised already; for type checkers


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, with Watch streams budgeted, ended at shutdown, and their
    shared condition kept while any watcher remains (see the module docstring). The loop is the
    base class's; it uses the base's state attributes."""

    def __init__(self, budget: OpenStreamBudget) -> None:
        super().__init__()
        self._budget = budget
        self._watching: collections.Counter[str] = collections.Counter()

    async def watches_ended(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every Watch stream has ended; they end by themselves
        once shutdown has begun and NOT_SERVING was written. True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self._watching and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self._watching

    async def Watch(self, request, context):
        service = request.service
        ends_at = await self._budget.admit(context)
        condition = self._server_watchers[service]
        self._watching[service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if self._gracefully_shutting_down:
                        return
                    remaining = ends_at - time.monotonic()
                    if remaining <= 0:
                        return  # its lifetime is over: the client watches again
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it can lose a cancel
                            await condition.wait()
        finally:
            self._budget.release(context.peer())
            self._watching[service] -= 1
            if not self._watching[service]:  # the last watcher of the service: nothing to notify any more
                del self._watching[service]
                self._server_watchers.pop(service, None)


class BudgetedReflectionServicer(reflection.aio.ReflectionServicer):
    """Server reflection whose streams take a slot of the open-stream budget and end at its age."""

    def __init__(self, service_names, budget: OpenStreamBudget) -> None:
        super().__init__(service_names)
        self._budget = budget

    async def ServerReflectionInfo(self, request_iterator, context):
        ends_at = await self._budget.admit(context)
        try:
            async for response in super().ServerReflectionInfo(_until(request_iterator, ends_at), context):
                yield response
        finally:
            self._budget.release(context.peer())


async def _until(requests: AsyncIterator, ends_at: float) -> AsyncIterator:
    """``requests`` until the client half-closes or ``ends_at`` (time.monotonic) passes."""
    iterator = requests.__aiter__()
    while True:
        remaining = ends_at - time.monotonic()
        if remaining <= 0:
            return
        try:
            async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it can lose a cancel
                request = await iterator.__anext__()
        except (StopAsyncIteration, TimeoutError):
            return
        yield request

