"""The RoutingAdmin service through a real in-process gateway: scopes (real JWT auth), the watch
stream, the audit subject, a gateway without Redis; and shadow copies compared into metrics."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client import REGISTRY

from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway._proto.infergate.admin.v1.admin_pb2_grpc import RoutingAdminStub
from infergate.gateway.config import parse_config
from infergate.gateway.server import Gateway
from tests.gateway.auth.conftest import auth_block
from tests.gateway.auth.issuer import Issuer
from tests.conftest import running_gateway
from tests.e2e.conftest import linear_input, result_variant
from tests.support.models import onnx_config
from tests.support.triton_models import SLOW_DELAY_S

pytestmark = pytest.mark.usefixtures("no_task_leaks")

X = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
WAIT_S = 20.0


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def auth_config(model_paths, redis_url, issuer, tmp_path) -> dict:
    jwks = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    return dict(onnx_config(model_paths), redis={"url": redis_url}, auth=auth_block(jwks_file=str(jwks)))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def wait_for(predicate, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_every_admin_call_needs_the_admin_scope_and_audits_the_subject(auth_config, issuer):
    async with running_gateway(auth_config) as gateway, grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = RoutingAdminStub(channel)
        calls = {
            "ListRoutes": lambda md: stub.ListRoutes(pb.ListRoutesRequest(), metadata=md, timeout=10),
            "GetRoute": lambda md: stub.GetRoute(pb.GetRouteRequest(model="ab"), metadata=md, timeout=10),
            "SetWeights": lambda md: stub.SetWeights(
                pb.SetWeightsRequest(model="ab", weights={"v1": 70, "v2": 30}, reason="r"), metadata=md, timeout=10),
            "Promote": lambda md: stub.Promote(pb.PromoteRequest(model="ab", variant="v2"), metadata=md, timeout=10),
            "Rollback": lambda md: stub.Rollback(pb.RollbackRequest(model="ab"), metadata=md, timeout=10),
            "GetAuditLog": lambda md: stub.GetAuditLog(pb.GetAuditLogRequest(model="ab"), metadata=md, timeout=10),
        }
        inferer = bearer(issuer.token(sub="svc-batch", scope="infer:*"))
        denied = {}
        for name, call in calls.items():
            try:
                await call(inferer)
                denied[name] = "OK"
            except grpc.aio.AioRpcError as exc:
                denied[name] = exc.code().name
        watch = stub.WatchRoutes(pb.WatchRoutesRequest(), metadata=inferer, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        watch_code = err.value.code()

        sre = bearer(issuer.token(sub="sre-jane", scope="admin:routes"))
        changed = await calls["SetWeights"](sre)
        entries = (await calls["GetAuditLog"](sre)).entries
    assert denied == dict.fromkeys(calls, "PERMISSION_DENIED")
    assert watch_code == grpc.StatusCode.PERMISSION_DENIED
    assert {v.name: v.weight for v in changed.route.variants} == {"v1": 70, "v2": 30}
    assert changed.route.updated_by == "sre-jane"
    assert (entries[0].subject, entries[0].action, entries[0].reason) == ("sre-jane", "set_weights", "r")


async def test_watch_routes_sends_the_current_route_then_each_change(model_paths, redis_url):
    config = dict(onnx_config(model_paths), redis={"url": redis_url})
    async with running_gateway(config) as gateway, grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = RoutingAdminStub(channel)
        watch = stub.WatchRoutes(pb.WatchRoutesRequest(model="ab"))
        first = await watch.read()
        assert first.route.model == "ab" and not first.HasField("change")
        await stub.SetWeights(pb.SetWeightsRequest(model="ab", weights={"v1": 1, "v2": 3}, reason="watch me"))
        event = await asyncio.wait_for(watch.read(), WAIT_S)
        watch.cancel()
        listed = await stub.ListRoutes(pb.ListRoutesRequest())
    assert event.route.revision == first.route.revision + 1
    assert {v.name: v.weight for v in event.route.variants} == {"v1": 1, "v2": 3}
    assert (event.change.action, event.change.reason, event.change.revision) == ("set_weights", "watch me", event.route.revision)
    assert sample("infergate_route_weight", model="ab", variant="v2") == 3
    assert dict(event.change.new_weights) == {"v1": 1, "v2": 3}
    assert sorted(route.model for route in listed.routes) == ["ab", "echo", "linear"]
    ab = next(route for route in listed.routes if route.model == "ab")
    assert ab.baseline == "v1" and [v.health for v in ab.variants] == ["ok", "ok"] and not ab.canary.enabled


async def test_shutdown_ends_watch_streams_instead_of_waiting_out_the_grace_period(model_paths, redis_url):
    raw = dict(onnx_config(model_paths), redis={"url": redis_url}, server={"listen": "127.0.0.1:0", "metrics_listen": ""})
    gateway = Gateway(parse_config(raw))
    await gateway.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        watch = RoutingAdminStub(channel).WatchRoutes(pb.WatchRoutesRequest())
        assert len([await watch.read() for _ in range(3)]) == 3  # the three current routes
        started = time.monotonic()
        await gateway.stop(grace_s=60)
        took_s = time.monotonic() - started
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.value.details()
    assert took_s < 30  # far below the 60 s grace an open stream would otherwise hold


async def test_without_redis_routes_are_readable_and_changes_fail_precondition(model_paths):
    async with running_gateway(onnx_config(model_paths)) as gateway, \
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = RoutingAdminStub(channel)
        route = (await stub.GetRoute(pb.GetRouteRequest(model="ab"))).route
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetWeights(pb.SetWeightsRequest(model="ab", weights={"v1": 1}))
        code = err.value.code()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetRoute(pb.GetRouteRequest(model="nope"))
    assert (route.revision, {v.name: v.weight for v in route.variants}) == (0, {"v1": 50, "v2": 50})
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- shadow copies ---------------------------------------------------------------------------------


def shadow_config(model_paths) -> dict:
    config = onnx_config(model_paths)
    config["models"]["twin"] = {
        "variants": {
            "v1": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 1},
            "copy": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 0},
        },
        "shadow": {"variant": "copy", "percent": 100},
    }
    config["models"]["ab"]["variants"]["v1"]["weight"] = 100
    config["models"]["ab"]["variants"]["v2"]["weight"] = 0
    config["models"]["ab"]["shadow"] = {"variant": "v2", "percent": 100}
    return config


async def test_shadow_copies_are_compared_into_metrics_and_never_answer(model_paths):
    before = {
        key: sample("infergate_shadow_requests_total", model=model, variant=variant, outcome=outcome)
        for key, (model, variant, outcome) in {
            "twin agree": ("twin", "copy", "agree"), "ab agree": ("ab", "v2", "agree"), "ab differ": ("ab", "v2", "differ"),
        }.items()
    }
    twin_sum = sample("infergate_shadow_divergence_sum", model="twin", variant="copy")
    ab_sum = sample("infergate_shadow_divergence_sum", model="ab", variant="v2")
    async with running_gateway(shadow_config(model_paths)) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            for model in ("twin", "ab"):
                served = {result_variant(await client.infer(model, [linear_input(X)])) for _ in range(10)}
                assert served == {"v1"}, "a shadow answer reached the caller"
        finally:
            await client.close()
        await wait_for(
            lambda: sample("infergate_shadow_requests_total", model="twin", variant="copy", outcome="agree")
            - before["twin agree"] == 10, "twin comparisons")
        await wait_for(
            lambda: sum(sample("infergate_shadow_requests_total", model="ab", variant="v2", outcome=o) for o in ("agree", "differ"))
            - before["ab agree"] - before["ab differ"] == 10, "ab comparisons")
    assert sample("infergate_shadow_divergence_sum", model="twin", variant="copy") == twin_sum  # identical models
    assert sample("infergate_shadow_divergence_sum", model="ab", variant="v2") > ab_sum  # different weights
    assert sample("infergate_requests_total", model="twin", variant="copy", code="OK") == 0


async def test_a_slow_shadow_neither_delays_live_calls_nor_grows_without_bound(triton_server):
    triton = {"kind": "triton", "url": triton_server.url, "timeout_ms": 5000}
    config = {
        "backends": {"triton_main": triton, "triton_shadow": dict(triton)},
        "models": {
            "guarded": {
                "variants": {
                    "v1": {"backend": "triton_main", "model": "linear_v1", "weight": 1},
                    "slow": {"backend": "triton_shadow", "model": "slow", "weight": 0},
                },
                "shadow": {"variant": "slow", "percent": 100, "max_pending": 1},
            }
        },
    }
    labels = {"model": "guarded", "variant": "slow"}

    def compared() -> float:
        return sum(sample("infergate_shadow_requests_total", outcome=o, **labels) for o in ("agree", "differ", "error"))

    dropped_before = sample("infergate_shadow_requests_total", outcome="dropped", **labels)
    compared_before = compared()
    async with running_gateway(config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            await client.infer("guarded", [linear_input(X)])
            # The live answer is back while its copy still sleeps in the slow model.
            assert compared() == compared_before
            results = await asyncio.gather(*(client.infer("guarded", [linear_input(X)]) for _ in range(20)))
            assert {result_variant(r) for r in results} == {"v1"}
        finally:
            await client.close()
        dropped = sample("infergate_shadow_requests_total", outcome="dropped", **labels) - dropped_before
        assert dropped >= 10  # one copy in flight, one queued (max_pending 1): most are dropped
        await wait_for(lambda: compared() - compared_before == 21 - dropped, "the accepted copies", WAIT_S + 10 * SLOW_DELAY_S)
