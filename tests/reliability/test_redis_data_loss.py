"""Redis loses its data (issue 9, item 8), with a real Redis and an injected wall clock.

A promoted canary (candidate at 100) went back to its first step after Redis came back empty,
sending most traffic to the old baseline. Class of defect: run state that only lives in Redis is
rebuilt from scratch after a data loss. Now the route store restores the route each replica
served (its own copy, revision kept), and the canary controller restores the run state it last
saw, so a finished run stays finished and a running one carries on where it was.
"""

from __future__ import annotations

import contextlib

import pytest
import redis

from infergate.router.canary import PROGRESSING, PROMOTED, ROLLED_BACK, CanaryController
from infergate.router.state import RouteStore
from infergate.router.table import Route, RouteTable
from tests.router.fakes import FakeClock
from tests.router.test_canary import TICK_S, canary_config, interval, model_configs

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("no_task_leaks")]

RESYNC_S = 0.2


@contextlib.asynccontextmanager
async def replica(url: str, name: str):
    configs = model_configs()
    table = RouteTable()
    table.install(Route("fraud", tuple(configs["fraud"].variants), {n: v.weight for n, v in configs["fraud"].variants.items()}))
    store = RouteStore(url, configs, table, replica_id=name, resync_interval_s=RESYNC_S)
    await store.start()
    try:
        yield store, table
    finally:
        await store.stop()


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


async def until(predicate, timeout_s: float = 10.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def route_in_redis(store: RouteStore) -> bool:
    try:
        await store.read_route("fraud")
        return True
    except Exception:
        return False


@pytest.mark.parametrize("ending", [PROMOTED, ROLLED_BACK, PROGRESSING])
async def test_a_canary_survives_redis_losing_its_data(redis_url, ending):
    wall = FakeClock(now=100_000.0)
    async with replica(redis_url, "r1") as (store, table):
        c = CanaryController("fraud", "v1", canary_config(), store, wall_clock=wall, tick_s=TICK_S)
        await c.tick()  # takes the lease, starts at 10 %
        if ending == PROMOTED:
            await interval(c, wall)  # 50 %
            await interval(c, wall)  # 100 %: promoted
        elif ending == ROLLED_BACK:
            await interval(c, wall, candidate_code="INTERNAL")
        else:
            await interval(c, wall)  # 50 %, still running
        before = await c.status()
        served = dict(table.get("fraud").weights)
        assert before.state == ending

        flush(redis_url)
        await until(lambda: route_in_redis(store))  # the store's resync puts the served route back
        await c.tick()
        after = await c.status()
        route = await store.read_route("fraud")

    assert dict(route.weights) == served
    assert after.state == before.state and after.current_percent == before.current_percent
    assert after.step_index == before.step_index
