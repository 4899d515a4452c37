"""Automated canary analysis against a real Redis, with an injected wall clock (no sleeping through intervals)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from infergate.gateway.config import CanaryConfig, parse_config
from infergate.router.canary import (
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    SUBJECT,
    CanaryController,
    VariantStats,
    judge,
    percentile,
)
from infergate.router.state import RouteStore
from infergate.router.table import Route, RouteTable
from tests.router.fakes import FakeClock
from tests.support.cancellation import stops_that_hang

pytestmark = pytest.mark.usefixtures("no_task_leaks")

INTERVAL_S = 10.0
TICK_S = 1.0


def canary_config(**overrides) -> CanaryConfig:
    values = dict(candidate="v2", steps_percent=[10, 50, 100], interval_s=INTERVAL_S, min_requests=20,
                  max_error_rate_increase=0.05, max_p99_latency_ratio=1.5, lease_ttl_s=5)
    values.update(overrides)
    return CanaryConfig(**values)


def model_configs():
    raw = {
        "backends": {"cpu": {"kind": "onnx"}},
        "models": {"fraud": {"variants": {
            "v1": {"backend": "cpu", "path": "/v1.onnx", "weight": 100},
            "v2": {"backend": "cpu", "path": "/v2.onnx", "weight": 0},
            "v1_cpu": {"backend": "cpu", "path": "/v1.onnx", "weight": 0},
        }}},
    }
    return parse_config(raw).models


@contextlib.asynccontextmanager
async def replica(url: str, name: str):
    configs = model_configs()
    table = RouteTable()
    table.install(Route("fraud", tuple(configs["fraud"].variants), {n: v.weight for n, v in configs["fraud"].variants.items()}))
    store = RouteStore(url, configs, table, replica_id=name)
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(now=100_000.0)  # the start of window 10000


def controller(store: RouteStore, wall: FakeClock, **overrides) -> CanaryController:
    return CanaryController("fraud", "v1", canary_config(**overrides), store, wall_clock=wall, tick_s=TICK_S)


@contextlib.asynccontextmanager
async def running_canary(url: str, wall: FakeClock):
    """One replica whose controller has taken the lease and started the run."""
    async with replica(url, "r1") as store:
        c = controller(store, wall)
        await c.tick()
        yield store, c


def traffic(c: CanaryController, baseline_calls=200, candidate_calls=40, candidate_code="OK",
            baseline_latency_s=0.010, candidate_latency_s=0.010) -> None:
    for _ in range(baseline_calls):
        c.observe("v1", "OK", baseline_latency_s)
    for _ in range(candidate_calls):
        c.observe("v2", candidate_code, candidate_latency_s)


async def next_window(c: CanaryController, wall: FakeClock) -> None:
    """Move into the next window, past the flush grace, and let the controller act."""
    await c.tick()  # flush what the window holds
    wall.now = (int(wall.now // INTERVAL_S) + 1) * INTERVAL_S + 1.5 * TICK_S + 0.01
    await c.tick()


async def interval(c: CanaryController, wall: FakeClock, **calls) -> None:
    """One whole window of traffic after the current step began, then the controller's verdict."""
    await next_window(c, wall)
    traffic(c, **calls)
    await next_window(c, wall)


async def weights(store: RouteStore) -> dict[str, int]:
    return dict((await store.read_route("fraud")).weights)


def test_judge_rules():
    config = canary_config()
    ok = VariantStats(100, 0, 0.010)
    assert judge(config, ok, VariantStats(19, 0, 0.010)).healthy is None
    assert judge(config, ok, VariantStats(20, 0, 0.014)).healthy is True
    assert judge(config, ok, VariantStats(20, 2, 0.010)).healthy is False  # 10 % > 0 % + 5 %
    assert judge(config, VariantStats(100, 10, 0.01), VariantStats(20, 2, 0.010)).healthy is True
    assert judge(config, ok, VariantStats(20, 0, 0.016)).healthy is False  # p99 ratio 1.6
    assert judge(config, VariantStats(0, 0, None), VariantStats(20, 0, 0.5)).healthy is True  # nothing to compare


def test_every_reason_ends_with_the_candidates_and_the_baselines_numbers():
    config = canary_config()
    baseline, candidate = VariantStats(300, 3, 0.010), VariantStats(20, 2, 0.0121)
    verdict = judge(config, baseline, candidate)
    assert verdict.healthy is False
    assert verdict.reason.endswith(
        "[candidate 20 calls, 2 errors (0.100), p99 12.1 ms | baseline 300 calls, 3 errors (0.010), p99 10.0 ms]")
    waiting = judge(config, baseline, VariantStats(4, 0, None, labelled=10, correct=9)).reason
    assert waiting.endswith("[candidate 4 calls, 0 errors (0.000), p99 n/a, accuracy 0.900 (9/10 labels) | "
                            "baseline 300 calls, 3 errors (0.010), p99 10.0 ms]")


def test_judge_uses_accuracy_when_both_variants_have_enough_labels():
    config = canary_config(min_labels=50, max_accuracy_decrease=0.02)
    baseline = VariantStats(100, 0, 0.010, labelled=100, correct=90)
    worse = VariantStats(20, 0, 0.010, labelled=60, correct=48)  # 0.80 < 0.90 - 0.02
    verdict = judge(config, baseline, worse)
    assert verdict.healthy is False
    assert "accuracy 0.800 (48/60 labels) below baseline 0.900" in verdict.reason
    assert judge(config, baseline, VariantStats(20, 0, 0.010, labelled=60, correct=53)).healthy is True  # 0.883
    assert judge(config, baseline, VariantStats(20, 0, 0.010, labelled=49, correct=0)).healthy is True  # too few labels
    assert judge(config, VariantStats(100, 0, 0.010), worse).healthy is True  # no baseline labels: no comparison


async def test_labels_from_feedback_roll_back_a_less_accurate_candidate(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await next_window(c, wall)
        traffic(c)
        for index in range(100):
            c.observe_label("v1", index % 10 != 0)  # 0.90
            c.observe_label("v2", index % 2 == 0)  # 0.50
        await next_window(c, wall)
        status = await c.status()
        assert await weights(store) == {"v1": 100, "v2": 0, "v1_cpu": 0}
    assert status is not None and status.state == ROLLED_BACK
    assert "candidate accuracy 0.500 (50/100 labels) below baseline 0.900" in status.last_reason


def test_percentile_takes_the_bucket_bound():
    assert percentile({}, 0.99) is None
    value = percentile({10: 99, 50: 1}, 0.99)
    assert value is not None and value < percentile({10: 98, 50: 2}, 0.99)


async def test_healthy_candidate_is_stepped_up_to_100(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        assert c.is_leader
        assert await weights(store) == {"v1": 90, "v2": 10, "v1_cpu": 0}
        await interval(c, wall)
        assert await weights(store) == {"v1": 50, "v2": 50, "v1_cpu": 0}
        await interval(c, wall)
        assert await weights(store) == {"v1": 0, "v2": 100, "v1_cpu": 0}
        status = await c.status()
        assert status is not None and (status.state, status.current_percent, status.step) == (PROMOTED, 100, 3)
        # The window that decided, both variants' numbers, kept with the run state (read back from Redis).
        assert status.verdict == "healthy" and status.stats_window == int(wall.now // INTERVAL_S) - 1
        assert (status.baseline_stats.requests, status.candidate_stats.requests) == (200, 40)
        assert status.candidate_stats.p99_s == pytest.approx(0.010, rel=0.11)
        log = await store.audit_log("fraud")
    assert [(e.subject, e.action) for e in log[:3]] == [
        (SUBJECT, "canary_step"), (SUBJECT, "canary_step"), (SUBJECT, "canary_start")]
    assert "healthy" in log[0].reason


async def test_failing_candidate_is_rolled_back_with_the_reason(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await interval(c, wall, candidate_code="INTERNAL")
        assert await weights(store) == {"v1": 100, "v2": 0, "v1_cpu": 0}
        status = await c.status()
        assert status is not None and status.state == ROLLED_BACK and status.current_percent == 0
        assert "error rate 1.000" in status.last_reason
        entry = (await store.audit_log("fraud", limit=1))[0]
    assert (entry.subject, entry.action) == (SUBJECT, "canary_rollback")
    assert entry.old_weights["v2"] == 10 and entry.new_weights == {"v1": 100, "v2": 0, "v1_cpu": 0}
    assert "error rate" in entry.reason


async def test_slow_candidate_is_rolled_back_on_p99(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await interval(c, wall, candidate_latency_s=0.050)
        status = await c.status()
    assert status is not None and status.state == ROLLED_BACK
    assert "p99" in status.last_reason


async def test_caller_errors_do_not_count_against_the_candidate(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await interval(c, wall, candidate_code="INVALID_ARGUMENT")
        assert await weights(store) == {"v1": 50, "v2": 50, "v1_cpu": 0}


async def test_too_few_calls_wait_at_the_same_step(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await interval(c, wall, candidate_calls=19)
        status = await c.status()
        assert status is not None and (status.state, status.current_percent) == (PROGRESSING, 10)
        assert "waiting for data: 19 of 20" in status.last_reason
        assert await weights(store) == {"v1": 90, "v2": 10, "v1_cpu": 0}


async def test_observations_of_every_replica_add_up(redis_url, wall):
    async with replica(redis_url, "r1") as store_a, replica(redis_url, "r2") as store_b:
        leader, follower = controller(store_a, wall), controller(store_b, wall)
        await leader.tick()
        await follower.tick()
        assert leader.is_leader and not follower.is_leader
        await next_window(leader, wall)
        traffic(leader, candidate_calls=12)  # neither replica alone reaches min_requests (20)
        traffic(follower, candidate_calls=12)
        await follower.tick()  # the follower flushes its counts
        await next_window(leader, wall)
        stats = await leader.window_stats(int(wall.now // INTERVAL_S) - 1)
        assert stats[1].requests == 24 and stats[0].requests == 400
        assert await weights(store_a) == {"v1": 50, "v2": 50, "v1_cpu": 0}
        starts = [e for e in await store_a.audit_log("fraud") if e.action == "canary_start"]
    assert len(starts) == 1, "only the leader drives"


async def test_lease_passes_on_when_the_holder_stops_renewing_or_hands_it_back(redis_url, wall):
    async with replica(redis_url, "r1") as store_a, replica(redis_url, "r2") as store_b:
        a = controller(store_a, wall, lease_ttl_s=0.3)
        b = controller(store_b, wall, lease_ttl_s=0.3)
        await a.tick()
        await b.tick()
        assert (a.is_leader, b.is_leader) == (True, False)
        assert await b.leader() == "r1"
        await asyncio.sleep(0.45)  # a "dies": no renewal; the lease expires in Redis's own time
        await b.tick()
        assert b.is_leader and await a.leader() == "r2"
        await a.tick()
        assert not a.is_leader
        await b.stop()  # a clean shutdown hands the lease back at once
        await a.tick()
        assert a.is_leader


async def test_a_manual_change_ends_the_run(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await store.set_weights("fraud", {"v1": 70, "v2": 30}, "alice", "holding at 30 by hand")
        await c.tick()
        status = await c.status()
        assert status is not None and status.state == "idle"
        assert "alice" in status.last_reason
        await interval(c, wall)
        assert await weights(store) == {"v1": 70, "v2": 30, "v1_cpu": 0}


async def test_a_finished_run_is_not_restarted_but_a_new_canary_block_is(redis_url, wall):
    async with running_canary(redis_url, wall) as (store, c):
        await interval(c, wall, candidate_code="UNAVAILABLE")
        await c.stop()
        again = controller(store, wall)  # a replica restart with the same config
        await again.tick()
        status = await again.status()
        assert status is not None and status.state == ROLLED_BACK
        assert await weights(store) == {"v1": 100, "v2": 0, "v1_cpu": 0}
        await again.stop()
        fresh = controller(store, wall, steps_percent=[20, 100])  # a new canary block: a new run
        await fresh.tick()
        status = await fresh.status()
        assert status is not None and (status.state, status.current_percent) == (PROGRESSING, 20)
        await fresh.stop()


async def test_stop_returns_wherever_the_cancel_lands_in_a_tick(redis_url):
    """Controllers ticking back to back, each stopped as the n-th task its ticks start finishes (n = 1..30:
    the Redis writes, which redis-py makes through asyncio.wait_for, and the rest): every stop returns.

    On Python 3.11 a cancel at that moment was lost inside wait_for; the tick task ran on and stop waited
    for ever (BENCHMARKS.md, the fan-out run's stop_hung)."""
    async with replica(redis_url, "r1") as store:
        loops = []
        for _ in range(30):
            c = CanaryController("fraud", "v1", canary_config(), store, tick_s=0.001)
            traffic(c, baseline_calls=5, candidate_calls=5)  # so that the first tick flushes too
            before = asyncio.all_tasks()
            await c.start()
            (tick,) = asyncio.all_tasks() - before
            loops.append((tick, c.stop))
        hung = await stops_that_hang(loops)
    assert not hung, f"{len(hung)} of {len(loops)} stops did not return within 5 s (n = {hung})"
