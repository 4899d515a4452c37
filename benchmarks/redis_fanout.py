"""How many gateway replicas one Redis carries: route fan-out and canary flushes with N replicas.

    python -m infergate.benchmarks.redis_fanout --replicas 10,25,50 --duration-s 20 \
        --out benchmarks/results/redis_fanout

Route reads never touch Redis (routes are in memory in every replica), so what Redis carries per
replica is background work. This simulates N replicas in one process with the real parts each
replica runs against Redis, one set per replica, on a real ``redis-server``:

- a ``RouteStore`` (its own connection pool and pub/sub connection; reconcile at start and every
  ``resync_interval_s`` (5 s); applies published changes);
- a ``CanaryController`` for a model with a canary block (ticks every second: flushes the counted
  calls with pipelined HINCRBYs into the window hash, renews or seeks the lease, reads the run
  state; the leader drives the run). Each replica is fed a fixed set of observations before every
  tick (both variants, 8 latency buckets, errors) so that every flush writes as many fields as a
  busy replica's would: the Redis cost of a flush does not grow with the call rate.

While they run, one replica changes the route's weights once a second (``SetWeights`` through the
store: the Lua write + PUBLISH), and the time until every replica's in-memory table holds the new
revision is recorded. Redis's own CPU (``INFO cpu``, user + sys of the server) and command count
(``INFO stats``) are sampled over the measured window.

``stop_hung`` counts replicas whose shutdown (``CanaryController.stop``, then ``RouteStore.stop``)
did not return within 10 s; it is a check and must be 0 (the run fails otherwise). It was not
always 0 before: on Python 3.11 a cancel that lands as redis-py's ``asyncio.wait_for`` finishes a
write is lost, and the tick task ticked on while ``stop`` waited for ever (BENCHMARKS.md, "Found on
the way"); the loops now end on a lost cancel too (``router.state.raise_if_cancel_requested``).

Caveat: all N replicas share this one Python process, so the fan-out time includes the client side
handling N messages in turn on this machine's cores; in a real fleet each replica handles one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import redis.asyncio as aioredis

from infergate.gateway.config import parse_config
from infergate.gateway.local_redis import LocalRedis
from infergate.router.canary import CanaryController
from infergate.router.state import RouteStore
from infergate.router.table import Route, RouteTable

MODEL = "classifier"
LATENCIES_S = (0.0008, 0.0015, 0.003, 0.006, 0.012, 0.025, 0.05, 0.1)


def fleet_config():
    return parse_config(
        {
            "backends": {"cpu": {"kind": "onnx"}},
            "models": {
                MODEL: {
                    "variants": {
                        "v1": {"backend": "cpu", "path": "v1.onnx", "weight": 95},
                        "v2": {"backend": "cpu", "path": "v2.onnx", "weight": 5},
                    },
                    # A long interval and a high bar: the run stays at its first step while measured.
                    "canary": {"candidate": "v2", "interval_s": 60, "min_requests": 10**9},
                }
            },
        }
    )


class Replica:
    def __init__(self, index: int, url: str, config) -> None:
        self.table = RouteTable()
        model = config.models[MODEL]
        self.table.install(Route(MODEL, tuple(model.variants), {n: v.weight for n, v in model.variants.items()}, 0))
        self.store = RouteStore(url, config.models, self.table, replica_id=f"sim-{index}")
        self.canary = CanaryController(MODEL, model.baseline, model.canary, self.store, tick_s=1.0)
        self.seen: dict[int, float] = {}
        self.store.add_listener(self._changed)

    def _changed(self, route: Route, record) -> None:
        self.seen.setdefault(route.revision, time.perf_counter())

    def feed(self) -> None:
        for variant in ("v1", "v2"):
            for latency in LATENCIES_S:
                self.canary.observe(variant, "OK", latency)
            self.canary.observe(variant, "UNAVAILABLE", 0.0)

    async def start(self) -> None:
        await self.store.start(first_sync_timeout_s=30)
        await self.canary.start()

    async def stop(self) -> None:
        await self.canary.stop()
        await self.store.stop()


async def redis_counters(client) -> tuple[float, int]:
    cpu = await client.info("cpu")
    stats = await client.info("stats")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], stats["total_commands_processed"]


async def measure(url: str, replicas: int, duration_s: float) -> dict:
    config = fleet_config()
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    await admin.flushall()
    fleet = [Replica(i, url, config) for i in range(replicas)]
    await asyncio.gather(*(replica.start() for replica in fleet))

    async def feed_forever() -> None:
        while True:
            for replica in fleet:
                replica.feed()
            await asyncio.sleep(0.25)

    feeder = asyncio.create_task(feed_forever())
    await asyncio.sleep(5)  # warm-up: every replica synced, the canary run started, a few ticks
    cpu0, commands0 = await redis_counters(admin)
    started = time.perf_counter()
    fanout_ms: list[float] = []
    missed = 0
    writer = fleet[0].store
    flip = False
    while time.perf_counter() - started < duration_s:
        flip = not flip
        weights = {"v1": 90, "v2": 10} if flip else {"v1": 95, "v2": 5}
        sent = time.perf_counter()
        route = await writer.set_weights(MODEL, weights, subject="bench", reason="fan-out")
        deadline = sent + 5.0
        while time.perf_counter() < deadline and not all(route.revision in r.seen for r in fleet):
            await asyncio.sleep(0.001)
        if all(route.revision in r.seen for r in fleet):
            fanout_ms.append((max(r.seen[route.revision] for r in fleet) - sent) * 1000)
        else:
            missed += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - sent)))
    elapsed = time.perf_counter() - started
    cpu1, commands1 = await redis_counters(admin)
    clients = (await admin.info("clients"))["connected_clients"]
    feeder.cancel()
    await asyncio.gather(feeder, return_exceptions=True)
    stops = [asyncio.ensure_future(replica.stop()) for replica in fleet]
    _, hung = await asyncio.wait(stops, timeout=10)
    await admin.aclose()
    if hung:  # see stop_hung in the module docs
        raise RuntimeError(f"{len(hung)} of {replicas} replica stops did not return within 10 s")
    redis_cpu = (cpu1 - cpu0) / elapsed
    ordered = sorted(fanout_ms)
    return {
        "replicas": replicas,
        "seconds": round(elapsed, 1),
        "route_changes": len(fanout_ms) + missed,
        "missed": missed,
        "fanout_p50_ms": round(statistics.median(ordered), 2) if ordered else None,
        "fanout_max_ms": round(ordered[-1], 2) if ordered else None,
        "redis_cpu_fraction": round(redis_cpu, 4),
        "redis_cpu_per_replica": round(redis_cpu / replicas, 6),
        "redis_commands_per_s": round((commands1 - commands0) / elapsed, 1),
        "redis_clients": clients,
        "stop_hung": len(hung),
    }


async def main_async(sizes: list[int], duration_s: float) -> list[dict]:
    server = LocalRedis().start()
    try:
        rows = []
        for replicas in sizes:
            row = await measure(server.url, replicas, duration_s)
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="10,25,50", help="comma-separated fleet sizes")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/redis_fanout"))
    args = parser.parse_args(argv)
    rows = asyncio.run(main_async([int(n) for n in args.replicas.split(",")], args.duration_s))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"results": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
