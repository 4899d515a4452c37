"""End to end over a real Triton: the gateway's ``linear`` is Triton's ``linear_v1`` (pytriton, ONNX
Runtime inside the bound callable), called with unmodified tritonclient sync, aio and streams.
"""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from tests.conftest import running_gateway
from tests.e2e.conftest import (
    CLIENT_TIMEOUT_S,
    CONCURRENT_CALLERS,
    RAW_CALL_TIMEOUT_S,
    assert_config_consistent_with_metadata,
    assert_matches_reference,
    assert_serves,
    inference_stub,
    linear_input,
    raw_outputs,
    response_variant,
    result_outputs,
    result_variant,
    rows_for,
    triton_config,
)


@pytest.fixture
def client(triton_gateway):
    client = grpcclient.InferenceServerClient(triton_gateway.url)
    yield client
    client.close()


def test_sync_infer_through_triton_matches_reference(client):
    x = rows_for(1, rows=4)
    result = client.infer("linear", [linear_input(x)], request_id="t-1", client_timeout=CLIENT_TIMEOUT_S)
    assert_matches_reference(result_outputs(result), x)
    response = result.get_response()
    assert response.model_name == "linear"
    assert response.id == "t-1"
    assert result_variant(result) == "v1"


def test_typed_contents_through_triton(triton_gateway):
    x = rows_for(5, rows=3)
    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[3, 16]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    with inference_stub(triton_gateway.url) as stub:
        response = stub.ModelInfer(request, timeout=RAW_CALL_TIMEOUT_S)
    assert_matches_reference(raw_outputs(response), x)
    assert response_variant(response) == "v1"


def test_metadata_names_the_gateway_model_not_the_triton_one(client):
    metadata = client.get_model_metadata("linear", as_json=True)
    assert metadata["name"] == "linear"
    assert metadata["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": ["-1", "16"]}]
    assert [o["name"] for o in metadata["outputs"]] == ["SCORES", "PROBS"]
    config = client.get_model_config("linear", as_json=True)["config"]
    assert config["name"] == "linear"
    assert int(config["max_batch_size"]) == 256  # Triton's limit for linear_v1, honoured by the gateway
    assert_config_consistent_with_metadata(config, metadata)
    assert "linear_v1" not in str(metadata) + str(config)


def test_readiness_and_statistics(client):
    assert client.is_server_ready()
    assert client.is_model_ready("linear")

    def success_count() -> int:
        (entry,) = client.get_inference_statistics("linear", as_json=True)["model_stats"]
        return int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))

    before = success_count()
    for i in range(2):
        client.infer("linear", [linear_input(rows_for(50 + i))], client_timeout=CLIENT_TIMEOUT_S)
    assert success_count() - before == 2


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


def test_sync_stream_through_triton(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=CLIENT_TIMEOUT_S)
    inputs = {f"ts-{i}": rows_for(600 + i, rows=1 + i % 3) for i in range(12)}
    try:
        for request_id, x in inputs.items():
            client.async_stream_infer("linear", [linear_input(x)], request_id=request_id)
        bad = InferInput("INPUT", [1, 17], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 17), np.float32))
        client.async_stream_infer("linear", [bad], request_id="bad")
        x = rows_for(700)
        client.async_stream_infer("linear", [linear_input(x)], request_id="after-bad")
        inputs["after-bad"] = x
        results = [answers.get(timeout=CLIENT_TIMEOUT_S) for _ in range(len(inputs) + 1)]
    finally:
        client.stop_stream()
    errors = [error for result, error in results if error is not None]
    assert len(errors) == 1 and "shape" in errors[0].message()
    good = {result.get_response().id: result for result, error in results if error is None}
    assert set(good) == set(inputs)
    for request_id, result in good.items():
        assert_matches_reference(result_outputs(result), inputs[request_id])
        assert result_variant(result) == "v1"


async def test_aio_200_concurrent_callers_through_triton(triton_server, no_task_leaks):
    async with running_gateway(triton_config(triton_server.url)) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:

            async def caller(i: int):
                x = rows_for(3000 + i, rows=1 + i % 3)
                result = await client.infer("linear", [linear_input(x)], request_id=f"c-{i}", client_timeout=CLIENT_TIMEOUT_S)
                return i, x, result

            answers = await asyncio.gather(*(caller(i) for i in range(CONCURRENT_CALLERS)))
        finally:
            await client.close()
    for i, x, result in answers:
        assert result.get_response().id == f"c-{i}"
        assert_matches_reference(result_outputs(result), x)
        assert result_variant(result) == "v1"


async def test_aio_stream_infer_through_triton(triton_server, no_task_leaks):
    inputs = {f"as-{i}": rows_for(4000 + i, rows=2) for i in range(20)}

    async def requests():
        for request_id, x in inputs.items():
            yield {"model_name": "linear", "inputs": [linear_input(x)], "request_id": request_id}

    async with running_gateway(triton_config(triton_server.url)) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            results = []
            async for result, error in client.stream_infer(requests(), stream_timeout=CLIENT_TIMEOUT_S):
                results.append((result, error))
                if len(results) == len(inputs):
                    break
        finally:
            await client.close()
    assert [error for _, error in results] == [None] * len(inputs)
    for result, _ in results:
        assert_matches_reference(result_outputs(result), inputs[result.get_response().id])


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
