"""Verified model artifacts: a variant's ``sha256`` pins its ONNX file.

Real ONNX files built in code, real ONNX Runtime, an in-process gateway on a real port and the
unmodified ``tritonclient.grpc.aio`` client. A good digest loads and serves; a wrong one is refused
before ONNX Runtime reads the file, and the model's readiness says so: ModelReady false, the
per-model health service NOT_SERVING, the admin route's health ``refused: ...``, calls UNAVAILABLE
with the reason (or served by the fallback variant when there is one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.backends.onnx import OnnxBackend
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2
from infergate.gateway._proto.infergate.admin.v1.admin_pb2_grpc import RoutingAdminStub
from infergate.gateway.config import ConfigError, OnnxBackendConfig, parse_config
from infergate.gateway.errors import ArtifactRejected
from tests.conftest import running_gateway
from tests.support.models import FEATURES, classifier, write_models

pytestmark = pytest.mark.usefixtures("no_task_leaks")

WRONG = "0" * 64


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("verified"))


def config(variants: dict) -> dict:
    return {
        "backends": {"onnx_cpu": {"kind": "onnx", "intra_op_threads": 1, "pool_threads": 1}},
        "models": {"linear": {"variants": variants}},
    }


def linear_input(x: np.ndarray) -> InferInput:
    tensor = InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


X = np.random.default_rng(7).normal(size=(3, FEATURES)).astype(np.float32)


async def test_backend_loads_a_file_whose_digest_matches_and_refuses_one_that_differs(models):
    good, other = str(models["linear_v1"]), str(models["linear_v2"])
    backend = OnnxBackend(
        "onnx_test",
        OnnxBackendConfig(kind="onnx", intra_op_threads=1),
        digests={good: sha256_of(models["linear_v1"]), other: WRONG},
    )
    await backend.start()
    try:
        signature = await backend.load(good)
        with pytest.raises(ArtifactRejected) as err:
            await backend.load(other)
        ready = (await backend.ready(good), await backend.ready(other))
    finally:
        await backend.close()
    assert [spec.name for spec in signature.inputs] == ["INPUT"]
    assert ready == (True, False)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.message == f"refused {other}: its sha256 is {sha256_of(models['linear_v2'])}, the config names {WRONG}"


async def test_the_digest_is_checked_before_onnx_runtime_reads_the_file(tmp_path):
    """Bytes that are not ONNX at all, with a wrong digest: refused for the digest (FAILED_PRECONDITION),
    not failed by ONNX Runtime's parser (INTERNAL)."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    backend = OnnxBackend("onnx_test", OnnxBackendConfig(kind="onnx", intra_op_threads=1), digests={str(junk): WRONG})
    await backend.start()
    try:
        with pytest.raises(ArtifactRejected) as err:
            await backend.load(str(junk))
    finally:
        await backend.close()
    assert err.value.message.startswith(f"refused {junk}: its sha256 is {hashlib.sha256(b'not an onnx model').hexdigest()}")


async def test_a_good_digest_loads_and_serves(models):
    digest = sha256_of(models["linear_v1"])
    raw = config({"v1": {"backend": "onnx_cpu", "path": str(models["linear_v1"]), "sha256": digest.upper(), "weight": 1}})
    async with running_gateway(raw) as gateway:
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            ready = await client.is_model_ready("linear")
            result = await client.infer("linear", [linear_input(X)])
        finally:
            await client.close()
    assert ready
    np.testing.assert_allclose(result.as_numpy("SCORES"), classifier(1).reference(X)["SCORES"], atol=1e-5)


async def test_a_wrong_digest_is_refused_and_the_models_readiness_says_why(models):
    raw = config({"v1": {"backend": "onnx_cpu", "path": str(models["linear_v1"]), "sha256": WRONG, "weight": 1}})
    async with running_gateway(raw) as gateway:
        address = f"127.0.0.1:{gateway.port}"
        client = triton_aio.InferenceServerClient(address)
        try:
            server_ready = await client.is_server_ready()
            model_ready = await client.is_model_ready("linear")
            with pytest.raises(InferenceServerException) as infer_err:
                await client.infer("linear", [linear_input(X)])
        finally:
            await client.close()
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            model_health = await health.Check(health_pb2.HealthCheckRequest(service="linear"))
            server_health = await health.Check(health_pb2.HealthCheckRequest(service=""))
            route = (await RoutingAdminStub(channel).GetRoute(admin_pb2.GetRouteRequest(model="linear"))).route
    assert server_ready  # the gateway runs; only the model with the refused file is down
    assert not model_ready
    assert server_health.status == health_pb2.HealthCheckResponse.SERVING
    assert model_health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert infer_err.value.status() == "StatusCode.UNAVAILABLE"
    assert f"its sha256 is {sha256_of(models['linear_v1'])}, the config names {WRONG}" in infer_err.value.message()
    [variant] = route.variants
    assert variant.health.startswith("refused: refused ") and WRONG in variant.health


async def test_a_refused_variant_hands_its_traffic_to_its_fallback(models):
    good = sha256_of(models["linear_v2"])
    raw = config(
        {
            "v1": {"backend": "onnx_cpu", "path": str(models["linear_v1"]), "sha256": WRONG, "weight": 1, "fallback": "v2"},
            "v2": {"backend": "onnx_cpu", "path": str(models["linear_v2"]), "sha256": good, "weight": 0},
        }
    )
    async with running_gateway(raw) as gateway:
        address = f"127.0.0.1:{gateway.port}"
        client = triton_aio.InferenceServerClient(address)
        try:
            model_ready = await client.is_model_ready("linear")
            result = await client.infer("linear", [linear_input(X)])
        finally:
            await client.close()
        async with grpc.aio.insecure_channel(address) as channel:
            route = (await RoutingAdminStub(channel).GetRoute(admin_pb2.GetRouteRequest(model="linear"))).route
    assert model_ready  # v2 can serve the model
    assert result.get_response().parameters["variant"].string_param == "v2"
    np.testing.assert_allclose(result.as_numpy("SCORES"), classifier(2).reference(X)["SCORES"], atol=1e-5)
    health = {v.name: v.health for v in route.variants}
    assert health["v2"] == "ok" and health["v1"].startswith("refused: ")


@pytest.mark.parametrize(
    ("variant", "complaint"),
    [
        ({"backend": "onnx_cpu", "path": "m.onnx", "sha256": "abc"}, "models.m.variants.v1.sha256: must be 64 hex digits"),
        ({"backend": "onnx_cpu", "path": "m.onnx", "sha256": "sha256:" + WRONG}, "without a 'sha256:' prefix"),
        ({"backend": "triton", "model": "m", "sha256": WRONG}, "models.m.variants.v1.sha256: only an onnx backend"),
    ],
)
def test_config_rejects_a_digest_it_cannot_check(variant, complaint):
    raw = {
        "backends": {"onnx_cpu": {"kind": "onnx"}, "triton": {"kind": "triton", "url": "127.0.0.1:1"}},
        "models": {"m": {"variants": {"v1": {**variant, "weight": 1}}}},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert complaint in str(err.value)
