"""The interceptor inside a real in-process gateway, called with tritonclient.grpc.aio.

Checks what only the event loop shows: the identity set by the interceptor is the one each
handler sees, with many callers of different identities at once, on unary calls and on streams
(whose per-request tasks are created by the handler); the key source's background task ends with
the gateway; a call refused by auth reaches no handler.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.gateway import metrics
from infergate.gateway.auth.logfilter import SubjectLogFilter
from infergate.gateway.auth.verifier import identity_from_claims
from infergate.gateway.identity import current_identity
from tests.gateway.auth.conftest import bearer, gateway_config, row
from tests.gateway.auth.jwks_server import JwksServer
from tests.conftest import running_gateway
from tests.support.models import FEATURES


@pytest.fixture
def jwks_path(issuer, tmp_path):
    return issuer.write_jwks(tmp_path / "jwks.json", "rsa-1", "ec-1")


def code_of(exc: InferenceServerException) -> str:
    return (exc.status() or "").removeprefix("StatusCode.")


async def test_each_handler_sees_its_own_callers_identity(issuer, model_paths, jwks_path, no_task_leaks):
    linear_only = issuer.token(scope="infer:linear", sub="linear-svc")
    ab_only = issuer.token("ec-1", scope="infer:ab", sub="ab-svc")
    async with running_gateway(gateway_config(model_paths, jwks_file=str(jwks_path))) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:

            async def call(token: str, model: str) -> str:
                try:
                    await client.infer(model, row(), headers=bearer(token))
                except InferenceServerException as exc:
                    return code_of(exc)
                return "OK"

            plan = [(linear_only, "linear"), (ab_only, "linear"), (ab_only, "ab"), (linear_only, "ab")] * 25
            codes = await asyncio.gather(*(call(token, model) for token, model in plan))
        finally:
            await client.close()
    expected = ["OK", "PERMISSION_DENIED", "OK", "PERMISSION_DENIED"] * 25
    assert codes == expected


async def test_streams_carry_the_identity_into_each_request(issuer, model_paths, jwks_path, no_task_leaks):
    token = issuer.token(scope="infer:linear", sub="streamer")

    async def requests():
        for model in ("linear", "ab", "linear"):
            yield {"model_name": model, "inputs": row(), "request_id": model}

    async with running_gateway(gateway_config(model_paths, jwks_file=str(jwks_path))) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            answers = []
            async for result, error in client.stream_infer(requests(), headers=bearer(token)):
                answers.append(("error", str(error)) if error else ("ok", result.get_response().model_name))
            # tritonclient.aio lets the stream's final status through as grpc's own error
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _answer in client.stream_infer(requests()):
                    pass
        finally:
            await client.close()
    assert sorted(answers) == [("error", "not allowed to use model 'ab'"), ("ok", "linear"), ("ok", "linear")]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_refused_calls_reach_no_handler_and_are_counted(issuer, model_paths, jwks_path, no_task_leaks):
    expired = issuer.token(exp=1_000_000)

    def counted(reason: str) -> float:
        return metrics.AUTH_REJECTIONS.labels(reason)._value.get()

    before = counted("expired"), counted("missing_token")
    async with running_gateway(gateway_config(model_paths, jwks_file=str(jwks_path))) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            codes = []
            for headers in (bearer(expired), None):
                try:
                    await client.infer("linear", row(), headers=headers)
                    codes.append("OK")
                except InferenceServerException as exc:
                    codes.append(code_of(exc))
            served = gateway.pipeline.endpoints["linear"].stats
            calls = served.success_count + served.fail_count
        finally:
            await client.close()
    assert codes == ["UNAUTHENTICATED", "UNAUTHENTICATED"]
    assert calls == 0
    assert (counted("expired"), counted("missing_token")) == (before[0] + 1, before[1] + 1)


async def test_health_and_reflection_need_no_token_but_server_calls_do(model_paths, jwks_path, no_task_leaks):
    async with running_gateway(gateway_config(model_paths, jwks_file=str(jwks_path))) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = []
            async for answer in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                listed = [service.name for service in answer.list_services_response.service]
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            with pytest.raises(InferenceServerException) as err:
                await client.is_server_live()
        finally:
            await client.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "inference.GRPCInferenceService" in listed
    assert code_of(err.value) == "UNAUTHENTICATED"


async def test_typed_input_rows_with_a_token(issuer, model_paths, jwks_path, no_task_leaks):
    """A plain good call through the interceptor returns the model's answer (not only a status)."""
    tensor = InferInput("INPUT", [2, FEATURES], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, FEATURES), dtype=np.float32))
    async with running_gateway(gateway_config(model_paths, jwks_file=str(jwks_path))) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            result = await client.infer("linear", [tensor], headers=bearer(issuer.token(scope="infer:linear")))
        finally:
            await client.close()
    assert result.as_numpy("PROBS").shape == (2, 4)
    assert np.allclose(result.as_numpy("PROBS").sum(axis=1), 1.0, atol=1e-5)


def test_log_lines_name_the_subject_of_the_call_being_served():
    def subject_of_a_line() -> str:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "backend failed", (), None)
        SubjectLogFilter().filter(record)
        return record.subject

    def during_a_call() -> str:
        current_identity.set(identity_from_claims({"sub": "svc-fraud", "scope": "infer:*"}))
        return subject_of_a_line()

    assert contextvars.copy_context().run(during_a_call) == "svc-fraud"
    assert subject_of_a_line() == "-"


async def test_jwks_url_background_work_ends_with_the_gateway(issuer, model_paths, no_task_leaks):
    server = JwksServer(issuer.jwks("rsa-1")).start()
    config = gateway_config(model_paths, jwks_url=server.url, jwks_cache_ttl_s=0.05, jwks_refresh_cooldown_s=0)
    loop = asyncio.get_running_loop()
    try:
        async with running_gateway(config) as gateway:
            client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
            try:
                await client.infer("linear", row(), headers=bearer(issuer.token()))
                fetched_at_start = server.requests
                give_up = loop.time() + 30
                while server.requests <= fetched_at_start + 1 and loop.time() < give_up:
                    await asyncio.sleep(0.05)  # the TTL refresh runs in the background meanwhile
                refreshed = server.requests - fetched_at_start
            finally:
                await client.close()
        await asyncio.sleep(0.2)  # a request cancelled at stop may still reach the server's count
        after_stop = server.requests
        await asyncio.sleep(0.3)
    finally:
        server.stop()
    assert fetched_at_start >= 1 and refreshed >= 2  # the refresh task ran...
    assert server.requests == after_stop  # ...and stopped with the gateway (no task left: no_task_leaks)
