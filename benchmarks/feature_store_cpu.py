"""CPU per feature fetch in one process: the gateway's pipelined connection against redis-py's pool.

    taskset -c 0 python -m infergate.benchmarks.feature_store_cpu --rounds 3 --duration-s 3

``concurrency`` callers each fetch 64 keys x 16 floats in a loop from a local redis-server, first
through ``FeatureStore`` (one pipelined connection, ``gateway/redis_pipe.py``), then through
redis-py's asyncio connection pool with the same hiredis-packed MGET (what the gateway did
before). The two alternate within each round; reported: the process's CPU time per fetch (Redis
runs in its own process and is not counted), median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import hiredis
import numpy as np
import redis
import redis.asyncio as aioredis

from infergate.gateway.config import FeatureViewConfig
from infergate.gateway.features import FeatureStore
from infergate.gateway.local_redis import LocalRedis

KEYS = 64
DIM = 16


async def _drive(fetch, concurrency: int, duration_s: float) -> float:
    """CPU seconds per fetch while ``concurrency`` callers fetch for ``duration_s``."""
    count = 0

    async def caller() -> None:
        nonlocal count
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            await fetch()
            count += 1

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - started) / max(count, 1)


async def _main(url: str, rounds: int, duration_s: float, concurrency: int) -> dict[str, list[float]]:
    view = FeatureViewConfig(key_template="bench:{id}", encoding="float32", dim=DIM, timeout_ms=5000)
    store = FeatureStore(url, {"bench": view})
    await store.start()
    ids = [b"%d" % i for i in range(KEYS)]
    keys = [b"bench:" + entity for entity in ids]
    client = aioredis.Redis.from_url(url)
    pool = client.connection_pool

    async def pipelined() -> None:
        await store.fetch("bench", ids, deadline=time.monotonic() + 5)

    async def pooled() -> None:
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(hiredis.pack_command((b"MGET", *keys)), check_health=False)
            raw = await connection.read_response()
        finally:
            await pool.release(connection)
        np.frombuffer(b"".join(raw), dtype="<f4").reshape(KEYS, DIM)

    results: dict[str, list[float]] = {"pipelined": [], "redis-py pool": []}
    try:
        for fetch in (pipelined, pooled):  # warm-up: connections open, code paths hot
            await _drive(fetch, concurrency, 0.5)
        for _ in range(rounds):
            results["pipelined"].append(await _drive(pipelined, concurrency, duration_s))
            results["redis-py pool"].append(await _drive(pooled, concurrency, duration_s))
    finally:
        await store.close()
        await client.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.mset({f"bench:{i}": np.full(DIM, i, "<f4").tobytes() for i in range(KEYS)})
        client.close()
        results = asyncio.run(_main(server.url, args.rounds, args.duration_s, args.concurrency))
    for name, values in results.items():
        print(f"{name:14s} {1e6 * statistics.median(values):6.1f} µs CPU per fetch  (rounds: "
              + ", ".join(f"{1e6 * v:.1f}" for v in values) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
