"""``benchmarks/redis_fanout.py`` on a real Redis with three simulated replicas: every route change
reaches every replica's table, the canary flushes reach Redis, and the results file has one row per size."""

from __future__ import annotations

import json

from infergate.benchmarks import redis_fanout


async def test_every_change_reaches_every_replica_and_redis_sees_the_flushes(redis_url):
    row = await redis_fanout.measure(redis_url, replicas=3, duration_s=2.5)
    assert row["replicas"] == 3
    assert row["route_changes"] >= 2 and row["missed"] == 0
    assert row["fanout_p50_ms"] is not None and row["fanout_p50_ms"] <= row["fanout_max_ms"]
    # Per replica per second: a canary tick (pipelined HINCRBYs, lease, state) at the least.
    assert row["redis_commands_per_s"] > 3 * 3
    assert row["redis_clients"] >= 3


def test_the_command_writes_one_row_per_fleet_size(tmp_path):
    assert redis_fanout.main(["--replicas", "1,2", "--duration-s", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [row["replicas"] for row in rows] == [1, 2]
