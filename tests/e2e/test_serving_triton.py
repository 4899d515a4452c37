"""End to end over a real Triton, the cases only Triton has: a model that fails, the gateway's deadline
reaching Triton, and the concurrency limit held by the ``slow`` model. What every backend kind
serves (sync, typed contents, metadata, statistics, streams, 200 aio callers) is in test_serving.py,
one body run over each kind.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from tests.conftest import running_gateway
from tests.e2e.conftest import (
    CLIENT_TIMEOUT_S,
    RAW_CALL_TIMEOUT_S,
    assert_matches_reference,
    assert_serves,
    inference_stub,
    linear_input,
    result_outputs,
    rows_for,
    triton_config,
)


def test_failing_triton_model_is_internal_without_a_traceback(triton_gateway):
    with inference_stub(triton_gateway.url) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(
                pb.ModelInferRequest(
                    model_name="failing",
                    inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT", datatype="FP32", shape=[1, 16])],
                    raw_input_contents=[np.zeros((1, 16), "<f4").tobytes()],
                ),
                timeout=RAW_CALL_TIMEOUT_S,
            )
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in err.value.details()
    assert "File \"" not in err.value.details()
    assert_serves(triton_gateway.url)


async def test_gateway_deadline_reaches_triton(triton_server, no_task_leaks):
    """No client deadline: the gateway's default (300 ms) cuts the 500 ms ``slow`` model short."""
    config = triton_config(triton_server.url)
    config["server"] = {"default_deadline_ms": 300}
    async with running_gateway(config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            with pytest.raises(InferenceServerException) as err:
                await client.infer("slow", [linear_input(rows_for(9))])
            stats = await client.get_inference_statistics("slow", as_json=True)
            x = rows_for(10)
            fast = await client.infer("linear", [linear_input(x)], client_timeout=CLIENT_TIMEOUT_S)
        finally:
            await client.close()
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    (entry,) = stats["model_stats"]
    assert int(entry["inference_stats"]["fail"]["count"]) == 1
    assert_matches_reference(result_outputs(fast), x)


async def test_calls_over_max_concurrent_rpcs_are_resource_exhausted(triton_server, no_task_leaks):
    """4 calls may be in progress at once; the ``slow`` model (0.5 s) keeps them there while 20 more arrive."""
    config = triton_config(triton_server.url)
    config["server"] = {"max_concurrent_rpcs": 4}
    inputs = [rows_for(8000 + i) for i in range(24)]
    async with running_gateway(config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:

            async def call(x):
                try:
                    return await client.infer("slow", [linear_input(x)], client_timeout=CLIENT_TIMEOUT_S)
                except InferenceServerException as exc:
                    return exc

            outcomes = await asyncio.gather(*(call(x) for x in inputs))
            later = rows_for(8100)
            after = await client.infer("linear", [linear_input(later)], client_timeout=CLIENT_TIMEOUT_S)
        finally:
            await client.close()
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert {o.status() for o in refused} == {"StatusCode.RESOURCE_EXHAUSTED"}
    answered = [(x, o) for x, o in zip(inputs, outcomes) if not isinstance(o, InferenceServerException)]
    assert 1 <= len(answered) <= len(inputs) - 1
    for x, result in answered:
        assert_matches_reference(result_outputs(result), x)
    assert_matches_reference(result_outputs(after), later)
