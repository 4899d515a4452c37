"""The Redis route store against a real redis-server: seeding, CAS, propagation, audit, outages."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis

from infergate.gateway.config import parse_config
from infergate.gateway.errors import Aborted, InvalidArgument, NotFound, Unavailable
from infergate.gateway.local_redis import LocalRedis
from infergate.router.audit import audit_key
from infergate.router.state import RouteStore, route_key
from infergate.router.table import Route, RouteTable
from tests.support.cancellation import stops_that_hang

pytestmark = pytest.mark.usefixtures("no_task_leaks")

PROPAGATION_LIMIT_S = 1.0


def models(**weights_by_variant: int):
    raw = {
        "backends": {"cpu": {"kind": "onnx"}},
        "models": {
            "fraud": {"variants": {n: {"backend": "cpu", "path": f"/{n}.onnx", "weight": w} for n, w in weights_by_variant.items()}},
            "other": {"variants": {"a": {"backend": "cpu", "path": "/a.onnx", "weight": 1}}},
        },
    }
    return parse_config(raw).models


def config_table(model_configs) -> RouteTable:
    table = RouteTable()
    for name, config in model_configs.items():
        table.install(Route(name, tuple(config.variants), {n: v.weight for n, v in config.variants.items()}))
    return table


@contextlib.asynccontextmanager
async def store(url: str, model_configs=None, **kwargs):
    model_configs = model_configs or models(v1=90, v2=10)
    table = config_table(model_configs)
    route_store = RouteStore(url, model_configs, table, **kwargs)
    await route_store.start()
    try:
        yield route_store, table
    finally:
        await route_store.stop()


async def eventually(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s}s")
        await asyncio.sleep(0.01)


async def test_first_replica_seeds_config_weights_and_a_later_one_loads_redis_state(redis_url):
    async with store(redis_url) as (first, first_table):
        route = first_table.get("fraud")
        assert (route.revision, dict(route.weights), route.updated_by) == (1, {"v1": 90, "v2": 10}, "config")
        await first.set_weights("fraud", {"v1": 50, "v2": 50}, "alice", "more v2")
        # A replica started afterwards serves Redis's weights, not its config's.
        async with store(redis_url) as (_late, late_table):
            late = late_table.get("fraud")
            assert (late.revision, dict(late.weights), late.updated_by) == (2, {"v1": 50, "v2": 50}, "alice")
        log = await first.audit_log("fraud")
    assert [(e.action, e.subject, e.revision) for e in log] == [("set_weights", "alice", 2), ("init", "config", 1)]
    assert log[0].old_weights == {"v1": 90, "v2": 10} and log[0].new_weights == {"v1": 50, "v2": 50}
    assert log[0].reason == "more v2" and log[0].time_unix_s > 0


async def test_a_change_reaches_another_replica_within_a_second(redis_url):
    async with store(redis_url) as (a, _), store(redis_url) as (b, b_table):
        events = []
        b.add_listener(lambda route, record: events.append((route, record)))
        changed = await a.set_weights("fraud", {"v1": 10, "v2": 90}, "bob", "flip")
        acknowledged = time.monotonic()
        await eventually(lambda: b_table.get("fraud").revision == changed.revision, 5, "propagation")
        assert time.monotonic() - acknowledged < PROPAGATION_LIMIT_S
        assert dict(b_table.get("fraud").weights) == {"v1": 10, "v2": 90}
        route, record = events[-1]
        assert route.revision == changed.revision
        assert record is not None and (record.subject, record.reason, record.action) == ("bob", "flip", "set_weights")


async def test_stale_expected_revision_is_aborted_and_changes_nothing(redis_url):
    async with store(redis_url) as (a, table):
        await a.set_weights("fraud", {"v1": 80, "v2": 20}, "alice", expected_revision=1)
        with pytest.raises(Aborted) as err:
            await a.set_weights("fraud", {"v1": 0, "v2": 100}, "bob", expected_revision=1)
        assert "revision 2" in err.value.message
        assert (table.get("fraud").revision, dict(table.get("fraud").weights)) == (2, {"v1": 80, "v2": 20})
        assert len(await a.audit_log("fraud")) == 2


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"v1": 50, "v9": 50}, "unknown variant"),
        ({"v1": 0, "v2": 0}, "must not all be zero"),
        ({"v1": 100001}, "between 0 and"),
        ({}, "must not all be zero"),
    ],
)
async def test_invalid_changes_are_rejected_whole(redis_url, weights, message):
    async with store(redis_url) as (a, table):
        with pytest.raises(InvalidArgument) as err:
            await a.set_weights("fraud", weights, "alice")
        assert message in err.value.message
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert raw.hget(route_key("fraud"), "revision") == "1"
            assert raw.xlen(audit_key("fraud")) == 1
        finally:
            raw.close()
        assert table.get("fraud").revision == 1


async def test_promote_and_rollback(redis_url):
    async with store(redis_url) as (a, table):
        promoted = await a.promote("fraud", "v2", "carol", "v2 is better")
        assert dict(promoted.weights) == {"v1": 0, "v2": 100}
        rolled = await a.rollback("fraud", "carol", "no it is not")
        assert dict(rolled.weights) == {"v1": 100, "v2": 0}
        assert rolled.revision == 3
        with pytest.raises(InvalidArgument):
            await a.promote("fraud", "v7", "carol")
        with pytest.raises(NotFound):
            await a.rollback("nope", "carol")
        actions = [entry.action for entry in await a.audit_log("fraud", limit=2)]
    assert actions == ["rollback", "promote"]


async def test_audit_log_of_all_models_is_newest_first(redis_url):
    async with store(redis_url) as (a, _):
        await a.set_weights("other", {"a": 5}, "dave", "first")
        await a.set_weights("fraud", {"v1": 1, "v2": 1}, "dave", "second")
        entries = await a.audit_log("", limit=3)
    assert [(e.model, e.reason) for e in entries][:2] == [("fraud", "second"), ("other", "first")]
    assert len(entries) == 3


async def test_deployed_config_with_other_variants_wins_once(redis_url):
    async with store(redis_url) as (old, old_table):
        await old.set_weights("fraud", {"v1": 70, "v2": 30}, "alice")
        new_models = models(v1=80, v2=10, v3=10)
        async with store(redis_url, new_models, resync_interval_s=0.1) as (new, new_table):
            route = new_table.get("fraud")
            assert (route.revision, dict(route.weights), route.updated_by) == (3, {"v1": 80, "v2": 10, "v3": 10}, "config")
            latest = (await new.audit_log("fraud", limit=1))[0]
            assert (latest.subject, latest.action, latest.old_weights) == ("config", "config", {"v1": 70, "v2": 30})
            # The replica on the old config keeps its last route and does not fight back.
            await asyncio.sleep(0.5)
            assert old_table.get("fraud").revision == 2
            assert new_table.get("fraud").revision == 3


async def test_redis_outage_keeps_routes_fails_admin_and_resynchronises():
    with LocalRedis() as server:
        async with store(server.url, retry_interval_s=0.1) as (a, a_table), store(server.url, retry_interval_s=0.1) as (b, b_table):
            await a.set_weights("fraud", {"v1": 30, "v2": 70}, "alice")
            await eventually(lambda: b_table.get("fraud").revision == 2, 5, "propagation")
            server.stop()
            await eventually(lambda: not a.connected, 5, "outage noticed")
            with pytest.raises(Unavailable):
                await a.set_weights("fraud", {"v1": 1, "v2": 1}, "alice")
            with pytest.raises(Unavailable):
                await a.audit_log("fraud")
            assert dict(b_table.get("fraud").weights) == {"v1": 30, "v2": 70}
            server.start()  # same port, empty: the replicas restore what they served
            await eventually(lambda: a.connected and b.connected, 10, "reconnect")
            assert a_table.get("fraud").revision == 2
            changed = await a.set_weights("fraud", {"v1": 100, "v2": 0}, "alice", expected_revision=2)
            assert changed.revision == 3
            await eventually(lambda: b_table.get("fraud").revision == 3, 5, "propagation after the outage")
            actions = [entry.action for entry in await b.audit_log("fraud")]
    assert actions == ["set_weights", "restore"]


async def test_lost_redis_state_is_restored_by_the_periodic_resync(redis_url):
    async with store(redis_url, resync_interval_s=0.1) as (a, table):
        await a.set_weights("fraud", {"v1": 60, "v2": 40}, "alice")
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            raw.flushall()
            await eventually(lambda: raw.hget(route_key("fraud"), "revision") == "2", 5, "restore")
            assert raw.hget(route_key("fraud"), "weights") == '{"v1": 60, "v2": 40}'
        finally:
            raw.close()
        assert table.get("fraud").revision == 2


async def test_stop_returns_wherever_the_cancel_lands_in_a_resync(redis_url):
    """Stores resynchronising back to back, each stopped as the n-th task its sync task starts finishes
    (n = 1..20: the Redis writes of its reconciles, which redis-py makes through asyncio.wait_for, and the
    rest): every stop returns. On Python 3.11 a cancel at that moment was lost and the sync task ran on."""
    model_configs = models(v1=90, v2=10)
    loops = []
    for _ in range(20):
        route_store = RouteStore(redis_url, model_configs, config_table(model_configs), resync_interval_s=0.001)
        before = asyncio.all_tasks()
        await route_store.start()
        (sync,) = [task for task in asyncio.all_tasks() - before if task.get_name() == "infergate-route-sync"]
        loops.append((sync, route_store.stop))
    hung = await stops_that_hang(loops)
    assert not hung, f"{len(hung)} of {len(loops)} stops did not return within 5 s (n = {hung})"
