"""A/B and canary routing end to end: real ``infergate serve`` replicas sharing a real Redis, real
ONNX Runtime and a real Triton, the ``infergate`` CLI and unmodified tritonclient.

Three groups, each with its own replicas (torn down before the next group starts, to keep the
2-core machine quiet): shared routes over ONNX (splits, sticky keys, pins, CLI changes, rejected
changes, changes under load), automated canaries over Triton (rollback, promotion, lease takeover),
and a Redis outage (its own redis-server on a fixed port, stopped and started again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as apb
from infergate.gateway._proto.infergate.admin.v1.admin_pb2_grpc import RoutingAdminStub
from infergate.gateway.local_redis import LocalRedis, free_port
from infergate.router.canary import SUBJECT, lease_key
from infergate.router.selector import PIN_METADATA
from tests.e2e.conftest import CLIENT_TIMEOUT_S, linear_input, result_variant, rows_for, shared_gateway
from tests.support.processes import ROOT, GatewayProcess, wait_until

PROPAGATION_LIMIT_S = 1.0
"""A change acknowledged by one replica is served by every other replica within this."""
WAIT_S = 30.0
CLI_TIMEOUT_S = 60.0
X = rows_for(7, rows=1)


# -- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def admin(url: str) -> Iterator[RoutingAdminStub]:
    channel = grpc.insecure_channel(url)
    try:
        yield RoutingAdminStub(channel)
    finally:
        channel.close()


def get_route(url: str, model: str) -> apb.Route:
    with admin(url) as stub:
        return stub.GetRoute(apb.GetRouteRequest(model=model), timeout=10).route


def set_weights(url: str, model: str, weights: dict[str, int], expected_revision: int = 0, reason: str = "") -> apb.Route:
    with admin(url) as stub:
        request = apb.SetWeightsRequest(model=model, weights=weights, expected_revision=expected_revision, reason=reason)
        return stub.SetWeights(request, timeout=10).route


def weights_of(route: apb.Route) -> dict[str, int]:
    return {variant.name: variant.weight for variant in route.variants}


def admin_error(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def settle(urls: list[str], model: str, weights: dict[str, int]) -> int:
    """Set ``weights`` through the first replica and wait until every replica has the revision."""
    revision = set_weights(urls[0], model, weights, reason="test setup").revision
    for url in urls:
        wait_until(lambda url=url: get_route(url, model).revision >= revision, WAIT_S, what=f"revision {revision} on {url}")
    return revision


def variant_of(client: grpcclient.InferenceServerClient, model: str, key: str | None = None, headers=None) -> str:
    parameters = {"user_id": key} if key is not None else None
    result = client.infer(model, [linear_input(X)], parameters=parameters, headers=headers, client_timeout=CLIENT_TIMEOUT_S)
    return result_variant(result)


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "infergate", *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("INFERGATE_TOKEN", None)
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=CLI_TIMEOUT_S)


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    mean, sd = n * p, (n * p * (1 - p)) ** 0.5
    return mean - sigmas * sd, mean + sigmas * sd


@pytest.fixture(scope="module")
def module_redis() -> Iterator[LocalRedis]:
    server = LocalRedis().start()
    yield server
    server.stop()


def onnx_routing_config(model_paths: dict[str, Path], redis_url: str) -> dict:
    return {
        "redis": {"url": redis_url},
        "backends": {"onnx_cpu": {"kind": "onnx", "intra_op_threads": 1, "pool_threads": 1}},
        "models": {
            "ab": {
                "routing": {"sticky_key": "user_id"},
                "variants": {
                    "v1": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 90},
                    "v2": {"backend": "onnx_cpu", "path": str(model_paths["linear_v2"]), "weight": 10},
                },
            }
        },
    }


# -- shared routes over ONNX -----------------------------------------------------------------------


@pytest.fixture(scope="class")
def replicas(model_paths, module_redis, tmp_path_factory):
    """Two replicas over ONNX sharing the module's Redis (one class of tests at a time)."""
    workdir = tmp_path_factory.mktemp("routing")
    config = onnx_routing_config(model_paths, module_redis.url)
    with shared_gateway(config, workdir, "replica-a") as a, shared_gateway(config, workdir, "replica-b") as b:
        yield {"a": a, "b": b, "config": config, "workdir": workdir, "urls": [a.url, b.url]}


@pytest.fixture(scope="class")
def clients(replicas):
    a, b = grpcclient.InferenceServerClient(replicas["a"].url), grpcclient.InferenceServerClient(replicas["b"].url)
    yield a, b
    a.close()
    b.close()


class TestSharedRoutes:
    def test_90_10_split_over_1000_calls_is_within_binomial_bounds(self, replicas, clients):
        settle(replicas["urls"], "ab", {"v1": 90, "v2": 10})
        counts = Counter(variant_of(clients[i % 2], "ab") for i in range(1000))
        low, high = binomial_bounds(1000, 0.10)
        assert low <= counts["v2"] <= high, counts
        assert counts["v1"] + counts["v2"] == 1000

    def test_sticky_keys_get_the_same_variant_on_both_replicas_and_move_only_towards_the_raised_variant(
        self, replicas, clients
    ):
        settle(replicas["urls"], "ab", {"v1": 90, "v2": 10})
        keys = [f"user-{i}" for i in range(300)]
        on_a = {key: variant_of(clients[0], "ab", key) for key in keys}
        on_b = {key: variant_of(clients[1], "ab", key) for key in keys}
        assert on_a == on_b
        assert {key: variant_of(clients[0], "ab", key) for key in keys[:50]} == {k: on_a[k] for k in keys[:50]}
        low, high = binomial_bounds(300, 0.10)
        assert low <= sum(v == "v2" for v in on_a.values()) <= high
        settle(replicas["urls"], "ab", {"v1": 80, "v2": 20})
        after = {key: variant_of(clients[1], "ab", key) for key in keys}
        moved = [key for key in keys if after[key] != on_a[key]]
        assert moved and all(on_a[key] == "v1" and after[key] == "v2" for key in moved)

    def test_pins_win_and_an_unknown_pin_is_invalid_argument(self, replicas, clients):
        settle(replicas["urls"], "ab", {"v1": 100, "v2": 0})
        pinned = {variant_of(clients[0], "ab", f"k{i}", headers={PIN_METADATA: "v2"}) for i in range(20)}
        assert pinned == {"v2"}
        assert {variant_of(clients[1], "ab") for _ in range(20)} == {"v1"}
        with pytest.raises(InferenceServerException) as err:
            variant_of(clients[0], "ab", headers={PIN_METADATA: "v9"})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "v9" in err.value.message()

    def test_cli_change_on_one_replica_is_served_by_the_other_within_a_second_and_by_a_later_replica(
        self, replicas, clients
    ):
        settle(replicas["urls"], "ab", {"v1": 100, "v2": 0})
        done = cli("canary", "set", "ab", "v1=0", "v2=100", "--reason", "e2e flip", "--gateway", replicas["a"].url, "--json")
        acknowledged = time.monotonic()
        assert done.returncode == 0, done.stderr
        changed = json.loads(done.stdout)
        assert {v["name"]: v["weight"] for v in changed["variants"]} == {"v1": 0, "v2": 100}
        wait_until(lambda: variant_of(clients[1], "ab") == "v2", WAIT_S, interval_s=0.0, what="replica B serving v2")
        assert time.monotonic() - acknowledged < PROPAGATION_LIMIT_S
        assert get_route(replicas["b"].url, "ab").revision == int(changed["revision"])

        later = GatewayProcess(replicas["config"], replicas["workdir"], name="replica-c").start()
        try:
            route = get_route(later.url, "ab")
            assert (route.revision, weights_of(route)) == (int(changed["revision"]), {"v1": 0, "v2": 100})
            with contextlib.closing(grpcclient.InferenceServerClient(later.url)) as client:
                assert {variant_of(client, "ab") for _ in range(20)} == {"v2"}
        finally:
            assert later.stop() == 0

        listed = cli("routes", "--gateway", replicas["b"].url, "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["routes"][0]["revision"] == changed["revision"]
        log = cli("audit", "ab", "--limit", "1", "--gateway", replicas["b"].url, "--json")
        assert log.returncode == 0, log.stderr
        entry = json.loads(log.stdout)["entries"][0]
        assert (entry["subject"], entry["action"], entry["reason"]) == ("anonymous", "set_weights", "e2e flip")
        assert (entry["old_weights"], entry["new_weights"]) == ({"v1": 100, "v2": 0}, {"v1": 0, "v2": 100})

    def test_routes_watch_prints_the_current_route_then_each_change(self, replicas):
        settle(replicas["urls"], "ab", {"v1": 90, "v2": 10})
        watcher = subprocess.Popen(
            cli_argv("routes", "ab", "--watch", "--json", "--gateway", replicas["b"].url),
            stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT,
        )
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            changed = set_weights(replicas["a"].url, "ab", {"v1": 60, "v2": 40}, reason="watched")
            second = json.loads(watcher.stdout.readline())
        finally:
            watcher.terminate()
            watcher.wait(10)
        assert first["route"]["model"] == "ab" and "change" not in first
        assert int(second["route"]["revision"]) == changed.revision
        assert (second["change"]["reason"], second["change"]["new_weights"]) == ("watched", {"v1": 60, "v2": 40})

    def test_invalid_changes_are_rejected_whole(self, replicas):
        revision = settle(replicas["urls"], "ab", {"v1": 90, "v2": 10})
        url = replicas["a"].url
        done = cli("canary", "set", "ab", "v1=50", "v9=50", "--gateway", url)
        assert done.returncode == 1
        assert "INVALID_ARGUMENT" in done.stderr and "v9" in done.stderr
        assert "Traceback" not in done.stderr
        bad_syntax = cli("canary", "set", "ab", "v1:50", "--gateway", url)
        assert bad_syntax.returncode == 2 and "VARIANT=WEIGHT" in bad_syntax.stderr
        assert admin_error(lambda: set_weights(url, "ab", {"v1": 0, "v2": 0})) == grpc.StatusCode.INVALID_ARGUMENT
        assert admin_error(lambda: set_weights(url, "ab", {"v1": 100001})) == grpc.StatusCode.INVALID_ARGUMENT
        assert admin_error(lambda: set_weights(url, "nope", {"v1": 1})) == grpc.StatusCode.NOT_FOUND
        time.sleep(0.2)  # nothing may arrive late either
        for replica in replicas["urls"]:
            route = get_route(replica, "ab")
            assert (route.revision, weights_of(route)) == (revision, {"v1": 90, "v2": 10})

    def test_stale_revision_is_aborted(self, replicas):
        revision = settle(replicas["urls"], "ab", {"v1": 90, "v2": 10})
        url = replicas["b"].url
        assert set_weights(url, "ab", {"v1": 85, "v2": 15}, expected_revision=revision).revision == revision + 1
        assert admin_error(lambda: set_weights(url, "ab", {"v1": 1, "v2": 1}, expected_revision=revision)) == grpc.StatusCode.ABORTED
        done = cli("canary", "set", "ab", "v1=1", "v2=1", "--expect-revision", str(revision), "--gateway", replicas["a"].url)
        assert done.returncode == 1 and "ABORTED" in done.stderr
        assert weights_of(get_route(url, "ab")) == {"v1": 85, "v2": 15}

    async def test_weight_changes_under_load_from_several_clients_fail_no_call(self, replicas):
        settle(replicas["urls"], "ab", {"v1": 50, "v2": 50})
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        clients = [aioclient.InferenceServerClient(url) for url in replicas["urls"]]

        async def caller(index: int) -> None:
            client = clients[index % 2]
            while not stop.is_set():
                try:
                    result = await client.infer("ab", [linear_input(X)], client_timeout=CLIENT_TIMEOUT_S)
                    seen[result_variant(result)] += 1
                    outcomes["OK"] += 1
                except InferenceServerException as exc:
                    outcomes[str(exc.status())] += 1

        callers = [asyncio.create_task(caller(i)) for i in range(6)]
        try:
            channels = [grpc.aio.insecure_channel(url) for url in replicas["urls"]]
            stubs = [RoutingAdminStub(channel) for channel in channels]
            for change in range(12):
                minor = (change * 7) % 100 + 1
                request = apb.SetWeightsRequest(model="ab", weights={"v1": 101 - minor, "v2": minor}, reason="under load")
                await stubs[change % 2].SetWeights(request, timeout=10)
                await asyncio.sleep(0.1)
            for channel in channels:
                await channel.close()
        finally:
            stop.set()
            await asyncio.gather(*callers)
            for client in clients:
                await client.close()
        assert set(outcomes) == {"OK"}, outcomes
        assert outcomes["OK"] > 50
        assert seen["v1"] > 0 and seen["v2"] > 0


# -- automated canaries over Triton ----------------------------------------------------------------


def canary_config(triton_url: str, redis_url: str) -> dict:
    def model(candidate_backend: str, candidate: str, steps: list[int], interval_s: float, min_requests: int,
              lease_ttl_s: float) -> dict:
        return {
            "variants": {
                "v1": {"backend": "triton_main", "model": "linear_v1", "weight": 100},
                "v2": {"backend": candidate_backend, "model": candidate, "weight": 0},
            },
            "canary": {
                "candidate": "v2", "steps_percent": steps, "interval_s": interval_s, "min_requests": min_requests,
                # Latency is not what these tests are about, and a shared 2-core machine is noisy.
                "max_error_rate_increase": 0.05, "max_p99_latency_ratio": 50, "lease_ttl_s": lease_ttl_s,
            },
        }

    triton = {"kind": "triton", "url": triton_url, "timeout_ms": 5000}
    return {
        "redis": {"url": redis_url},
        # The failing candidate gets a backend entry (and so a circuit breaker) of its own.
        "backends": {"triton_main": triton, "triton_candidate": dict(triton), "triton_steady": dict(triton)},
        "models": {
            "risky": model("triton_candidate", "failing", [50, 100], 1.0, 5, 2.0),
            "steady": model("triton_steady", "linear_v2", [25, 50, 100], 1.0, 5, 2.0),
            "leased": model("triton_steady", "linear_v2", [10, 100], 3600.0, 1_000_000, 1.0),
        },
    }


async def drive(urls: list[str], models: list[str], until, timeout_s: float = WAIT_S) -> Counter[str]:
    """Call ``models`` on every replica from a few callers until ``until()`` holds; outcomes by status."""
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    clients = [aioclient.InferenceServerClient(url) for url in urls]

    async def caller(index: int) -> None:
        client, model = clients[index % len(clients)], models[index % len(models)]
        while not stop.is_set():
            try:
                await client.infer(model, [linear_input(X)], client_timeout=CLIENT_TIMEOUT_S)
                outcomes["OK"] += 1
            except InferenceServerException as exc:
                outcomes[str(exc.status())] += 1

    callers = [asyncio.create_task(caller(i)) for i in range(2 * len(clients) * len(models))]
    try:
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(until):
            assert time.monotonic() < deadline, f"not reached within {timeout_s}s; outcomes {outcomes}"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        for client in clients:
            await client.close()
    return outcomes


@pytest.fixture(scope="class")
def fleet(triton_server, module_redis, tmp_path_factory):
    """Two replicas with canary blocks over the session's Triton (one may be killed by a test)."""
    workdir = tmp_path_factory.mktemp("canary")
    config = canary_config(triton_server.url, module_redis.url)
    a = GatewayProcess(config, workdir, name="canary-a").start()
    b = GatewayProcess(config, workdir, name="canary-b").start()
    yield {"a": a, "b": b, "urls": [a.url, b.url], "redis": module_redis}
    for process in (a, b):
        process.stop()
        assert not process.alive()


class TestCanary:
    async def test_failing_candidate_is_rolled_back_and_a_healthy_one_stepped_up_to_100(self, fleet):
        url = fleet["a"].url

        def finished() -> bool:
            states = {model: get_route(url, model).canary.state for model in ("risky", "steady")}
            return states == {"risky": "rolled_back", "steady": "promoted"}

        outcomes = await drive(fleet["urls"], ["risky", "steady"], finished)
        assert outcomes["StatusCode.INTERNAL"] > 0, "the failing candidate got traffic before its rollback"

        risky = get_route(fleet["b"].url, "risky")
        assert weights_of(risky) == {"v1": 100, "v2": 0}
        assert "error rate" in risky.canary.last_reason
        with admin(url) as stub:
            entries = stub.GetAuditLog(apb.GetAuditLogRequest(model="risky", limit=10), timeout=10).entries
        rollback = entries[0]
        assert (rollback.subject, rollback.action) == (SUBJECT, "canary_rollback")
        assert rollback.old_weights["v2"] == 50 and dict(rollback.new_weights) == {"v1": 100, "v2": 0}
        assert "error rate" in rollback.reason

        steady = get_route(fleet["b"].url, "steady")
        assert weights_of(steady) == {"v1": 0, "v2": 100}
        with admin(url) as stub:
            entries = stub.GetAuditLog(apb.GetAuditLogRequest(model="steady", limit=10), timeout=10).entries
        steps = [dict(entry.new_weights)["v2"] for entry in reversed(entries) if entry.subject == SUBJECT]
        assert steps == [25, 50, 100]
        # After the rollback every call of the risky model is served by the baseline.
        with contextlib.closing(grpcclient.InferenceServerClient(fleet["b"].url)) as client:
            assert {variant_of(client, "risky") for _ in range(10)} == {"v1"}

        status = cli("canary", "status", "steady", "--gateway", fleet["b"].url)
        assert status.returncode == 0, status.stderr
        assert "promoted" in status.stdout

    def test_leader_lease_moves_when_its_holder_is_killed(self, fleet):
        raw = redis.Redis.from_url(fleet["redis"].url, decode_responses=True)
        try:
            holder = wait_until(lambda: raw.get(lease_key("leased")), WAIT_S, what="a leader")
            by_pid = {str(process.process.pid): process for process in (fleet["a"], fleet["b"])}
            holder_pid = holder.split(":")[1]
            victim = by_pid[holder_pid]
            survivor = next(p for pid, p in by_pid.items() if pid != holder_pid)
            assert get_route(survivor.url, "leased").canary.leader == holder
            victim.kill()
            killed = time.monotonic()
            successor = wait_until(
                lambda: (value := raw.get(lease_key("leased"))) and value != holder and value, 15.0, what="a new leader"
            )
            took_s = time.monotonic() - killed
        finally:
            raw.close()
        assert successor.split(":")[1] == str(survivor.process.pid)
        assert took_s < 1.0 + 3.0  # lease_ttl_s 1 plus a tick and a busy machine's slack
        assert get_route(survivor.url, "leased").canary.leader == successor


# -- Redis outage ----------------------------------------------------------------------------------


async def test_redis_stopped_and_restarted_serving_continues_then_resynchronises(model_paths, tmp_path):
    redis_server = LocalRedis(port=free_port()).start()  # a fixed port: restarted on the same one below
    try:
        config = onnx_routing_config(model_paths, redis_server.url)
        with shared_gateway(config, tmp_path, "outage-a") as a, shared_gateway(config, tmp_path, "outage-b") as b:
            urls = [a.url, b.url]
            revision = settle(urls, "ab", {"v1": 0, "v2": 100})
            redis_server.stop()
            stale = wait_until(lambda: (route := get_route(a.url, "ab")).stale and route, WAIT_S,
                               what="the outage seen by the admin API")
            assert (stale.revision, weights_of(stale)) == (revision, {"v1": 0, "v2": 100})  # served from memory
            with contextlib.closing(grpcclient.InferenceServerClient(a.url)) as ca, \
                    contextlib.closing(grpcclient.InferenceServerClient(b.url)) as cb:
                assert {variant_of(c, "ab") for c in (ca, cb) for _ in range(20)} == {"v2"}
                refused = cli("canary", "rollback", "ab", "--gateway", a.url)
                assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
                assert {variant_of(c, "ab") for c in (ca, cb) for _ in range(10)} == {"v2"}

                redis_server.start()
                for url in urls:
                    route = wait_until(lambda url=url: (r := get_route(url, "ab")) and not r.stale and r, WAIT_S,
                                       what=f"{url} back on Redis")
                    assert (route.revision, weights_of(route)) == (revision, {"v1": 0, "v2": 100})
                changed = set_weights(a.url, "ab", {"v1": 100, "v2": 0}, expected_revision=revision, reason="after outage")
                acknowledged = time.monotonic()
                wait_until(lambda: variant_of(cb, "ab") == "v1", WAIT_S, interval_s=0.0, what="B serving the change")
                assert time.monotonic() - acknowledged < PROPAGATION_LIMIT_S
                assert changed.revision == revision + 1
    finally:
        redis_server.stop()

