"""End to end with unmodified tritonclient, one body per behaviour, run over each backend kind.

``onnx``: the shared ``infergate serve`` over ONNX Runtime in process; ``triton``: the shared one
whose ``linear`` is Triton's ``linear_v1`` (pytriton, ONNX Runtime inside the bound callable). Sync
tests call those processes; aio tests run an in-process gateway in the test's loop. Every answer is
compared with the numpy reference of the same weights. What only one kind has lives beside it:
test_serving_onnx.py (A/B, BYTES, health, reflection) and test_serving_triton.py (a failing model,
deadlines reaching Triton, the concurrency limit).

The parameters name the fixtures they stand for, so the tier markers (tests/conftest.py) follow
them: the ``triton`` cases are marked ``triton``.
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass

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
    inference_stub,
    linear_input,
    raw_outputs,
    response_variant,
    result_outputs,
    result_variant,
    rows_for,
    triton_config,
)

MODELS = {"onnx": ("linear", "ab", "echo", "pair"), "triton": ("linear", "failing", "slow")}
"""The models each shared gateway serves (all of them must be ready)."""
MAX_BATCH_SIZE = {"onnx": 0, "triton": 256}
"""``linear``'s max_batch_size as the gateway reports it: none of its own on ONNX, Triton's limit for linear_v1."""


@dataclass(frozen=True)
class Served:
    kind: str
    url: str


@pytest.fixture(params=[pytest.param("onnx_gateway", id="onnx"), pytest.param("triton_gateway", id="triton")])
def served(request) -> Served:
    process = request.getfixturevalue(request.param)
    return Served(request.param.removesuffix("_gateway"), process.url)


@pytest.fixture
def client(served):
    client = grpcclient.InferenceServerClient(served.url)
    yield client
    client.close()


@pytest.fixture(params=[pytest.param("onnx_gateway_config", id="onnx"), pytest.param("triton_server", id="triton")])
def aio_config(request) -> dict:
    """A config for an in-process gateway over the backend kind."""
    value = request.getfixturevalue(request.param)
    return triton_config(value.url) if request.param == "triton_server" else value


# -- sync tritonclient against an `infergate serve` process ------------------------------------


def test_sync_infer_matches_reference(client):
    x = rows_for(1, rows=5)
    result = client.infer("linear", [linear_input(x)], request_id="r-1", client_timeout=CLIENT_TIMEOUT_S)
    assert_matches_reference(result_outputs(result), x)
    response = result.get_response()
    assert response.model_name == "linear"
    assert response.id == "r-1"
    assert result_variant(result) == "v1"


def test_typed_contents_instead_of_raw(served):
    x = rows_for(3, rows=3)
    request = pb.ModelInferRequest(model_name="linear", id="typed")
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[3, 16])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with inference_stub(served.url) as stub:
        response = stub.ModelInfer(request, timeout=RAW_CALL_TIMEOUT_S)
    assert_matches_reference(raw_outputs(response), x)
    assert response.id == "typed"
    assert response_variant(response) == "v1"


def test_metadata_and_config_are_the_gateway_view(client, served):
    metadata = client.get_model_metadata("linear", as_json=True)
    assert metadata["name"] == "linear"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": ["-1", "16"]}]
    assert metadata["outputs"] == [
        {"name": "SCORES", "datatype": "FP32", "shape": ["-1", "4"]},
        {"name": "PROBS", "datatype": "FP32", "shape": ["-1", "4"]},
    ]
    config = client.get_model_config("linear", as_json=True)["config"]
    assert config["name"] == "linear"
    assert int(config.get("max_batch_size", 0)) == MAX_BATCH_SIZE[served.kind]  # Triton's limit is honoured
    assert_config_consistent_with_metadata(config, metadata)
    assert "linear_v1" not in str(metadata) + str(config)  # the name callers use, never the backend's


def test_server_and_model_readiness(client, served):
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in MODELS[served.kind]:
        assert client.is_model_ready(model), model
    assert client.get_server_metadata(as_json=True)["name"] == "infergate"
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_model_statistics_count_calls(client):
    def stats() -> dict:
        (entry,) = client.get_inference_statistics("linear", as_json=True)["model_stats"]
        assert entry["name"] == "linear"
        return entry

    before = stats()
    for i in range(3):
        client.infer("linear", [linear_input(rows_for(200 + i, rows=2))], client_timeout=CLIENT_TIMEOUT_S)
    after = stats()

    def count(entry, *path) -> int:
        for key in path:
            entry = entry.get(key, {}) if isinstance(entry, dict) else entry
        return int(entry or 0)

    assert count(after, "inference_stats", "success", "count") - count(before, "inference_stats", "success", "count") == 3
    assert count(after, "inference_count") - count(before, "inference_count") == 6
    assert count(after, "execution_count") - count(before, "execution_count") == 3
    assert count(after, "inference_stats", "success", "ns") > count(before, "inference_stats", "success", "ns")
    assert count(after, "last_inference") > 0


def test_sync_stream_answers_each_request_and_goes_on_after_an_invalid_one(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=CLIENT_TIMEOUT_S)
    inputs = {f"s-{i}": rows_for(300 + i, rows=1 + i % 3) for i in range(20)}
    try:
        for request_id, x in inputs.items():
            client.async_stream_infer("linear", [linear_input(x)], request_id=request_id)
        bad = InferInput("INPUT", [1, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
        client.async_stream_infer("linear", [bad], request_id="bad")
        results = [answers.get(timeout=CLIENT_TIMEOUT_S) for _ in range(len(inputs) + 1)]
        after = rows_for(400)
        client.async_stream_infer("linear", [linear_input(after)], request_id="after-bad")  # sent once the error is back
        last_result, last_error = answers.get(timeout=CLIENT_TIMEOUT_S)
    finally:
        client.stop_stream()
    errors = [(result, error) for result, error in results if error is not None]
    assert len(errors) == 1
    result, error = errors[0]
    assert result is None and isinstance(error, InferenceServerException)
    assert "shape" in error.message()
    good = {result.get_response().id: result for result, error in results if error is None}
    assert set(good) == set(inputs)
    for request_id, result in good.items():
        assert_matches_reference(result_outputs(result), inputs[request_id])
        assert result_variant(result) == "v1"
    assert last_error is None, last_error
    assert last_result.get_response().id == "after-bad"
    assert_matches_reference(result_outputs(last_result), after)


# -- tritonclient.grpc.aio against an in-process gateway in this loop ----------------------------


async def test_aio_200_concurrent_callers_each_get_their_own_answer(aio_config, no_task_leaks):
    async with running_gateway(aio_config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:

            async def caller(i: int) -> tuple[int, np.ndarray, object]:
                x = rows_for(1000 + i, rows=1 + i % 4)
                result = await client.infer(
                    "linear", [linear_input(x)], request_id=f"c-{i}", client_timeout=CLIENT_TIMEOUT_S
                )
                return i, x, result

            answers = await asyncio.gather(*(caller(i) for i in range(CONCURRENT_CALLERS)))
        finally:
            await client.close()
    assert len(answers) == CONCURRENT_CALLERS
    for i, x, result in answers:
        assert result.get_response().id == f"c-{i}"
        assert result.as_numpy("SCORES").shape == (x.shape[0], 4)
        assert_matches_reference(result_outputs(result), x)
        assert result_variant(result) == "v1"


async def test_aio_stream_infer_with_an_invalid_request_in_the_middle(aio_config, no_task_leaks):
    inputs = {f"a-{i}": rows_for(2000 + i, rows=1 + i % 2) for i in range(30)}

    async def requests():
        for n, (request_id, x) in enumerate(inputs.items()):
            if n == 10:
                bad = InferInput("INPUT", [1, 16], "FP64")
                bad.set_data_from_numpy(np.zeros((1, 16), np.float64))
                yield {"model_name": "linear", "inputs": [bad], "request_id": "bad"}
            yield {"model_name": "linear", "inputs": [linear_input(x)], "request_id": request_id}

    async with running_gateway(aio_config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            results = []
            async for result, error in client.stream_infer(requests(), stream_timeout=CLIENT_TIMEOUT_S):
                results.append((result, error))
                if len(results) == len(inputs) + 1:
                    break
        finally:
            await client.close()
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1
    assert "datatype" in errors[0].message()
    good = {result.get_response().id: result for result, error in results if error is None}
    assert set(good) == set(inputs)
    for request_id, result in good.items():
        assert_matches_reference(result_outputs(result), inputs[request_id])
        assert result_variant(result) == "v1"
