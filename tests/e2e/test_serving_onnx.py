"""End to end over ONNX Runtime with unmodified tritonclient: sync, aio (200 callers), streams.

Sync tests call the shared ``infergate serve`` process; aio tests run an in-process gateway in the
test's loop. Every answer is compared with the numpy reference of the same weights.
"""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from tritonclient.grpc import InferInput, InferRequestedOutput
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
)
from tests.support.models import classifier


@pytest.fixture
def client(onnx_gateway):
    client = grpcclient.InferenceServerClient(onnx_gateway.url)
    yield client
    client.close()


# -- sync tritonclient against an `infergate serve` process ------------------------------------


def test_sync_infer_matches_reference(client):
    x = rows_for(1, rows=5)
    result = client.infer("linear", [linear_input(x)], request_id="r-1", client_timeout=CLIENT_TIMEOUT_S)
    assert_matches_reference(result_outputs(result), x)
    response = result.get_response()
    assert response.model_name == "linear"
    assert response.id == "r-1"
    assert result_variant(result) == "v1"


def test_sync_requested_output_only(client):
    x = rows_for(2, rows=3)
    result = client.infer("linear", [linear_input(x)], outputs=[InferRequestedOutput("PROBS")], client_timeout=CLIENT_TIMEOUT_S)
    assert [o.name for o in result.get_response().outputs] == ["PROBS"]
    assert result.as_numpy("SCORES") is None
    np.testing.assert_allclose(result.as_numpy("PROBS"), classifier(1).reference(x)["PROBS"], atol=1e-5)


def test_what_tritonclient_sends_besides_tensors_is_accepted(client):
    """priority, Triton's timeout parameter, caller parameters and gzip compression, as real callers send them."""
    x = rows_for(4, rows=2)
    result = client.infer(
        "linear",
        [linear_input(x)],
        priority=1,
        timeout=5_000_000,
        parameters={"user_id": "u-42", "retry": 1, "ratio": 0.25, "debug": False},
        compression_algorithm="gzip",
        client_timeout=CLIENT_TIMEOUT_S,
    )
    assert_matches_reference(result_outputs(result), x)
    assert result_variant(result) == "v1"


def test_ab_every_answer_comes_from_the_variant_it_names(client):
    """50/50 between v1 and v2: each answer matches the weights of the variant in parameters."""
    seen = set()
    for i in range(40):
        x = rows_for(100 + i)
        result = client.infer("ab", [linear_input(x)], client_timeout=CLIENT_TIMEOUT_S)
        variant = result_variant(result)
        assert variant in ("v1", "v2")
        assert_matches_reference(result_outputs(result), x, seed=1 if variant == "v1" else 2)
        seen.add(variant)
    assert seen == {"v1", "v2"}


def test_typed_contents_instead_of_raw(onnx_gateway):
    x = rows_for(3, rows=2)
    request = pb.ModelInferRequest(model_name="linear", id="typed")
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[2, 16])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with inference_stub(onnx_gateway.url) as stub:
        response = stub.ModelInfer(request, timeout=RAW_CALL_TIMEOUT_S)
    assert_matches_reference(raw_outputs(response), x)
    assert response_variant(response) == "v1"


@pytest.mark.parametrize(
    "texts",
    [
        ["", "héllo wörld ✓", "plain", "日本語のテキスト", ""],
        [""],
        ["", "", ""],
        ["a" * 10000, "😀"],
    ],
    ids=["mixed", "one-empty", "all-empty", "long-and-emoji"],
)
def test_bytes_round_trip_through_echo(client, texts):
    data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
    tensor = InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(data)
    result = client.infer("echo", [tensor], client_timeout=CLIENT_TIMEOUT_S)
    echoed = result.as_numpy("ECHO")
    assert echoed.shape == (len(texts),)
    assert [bytes(item) for item in echoed] == list(data)
    assert result_variant(result) == "v1"


def test_bytes_typed_contents_through_echo(onnx_gateway):
    texts = [b"", "ünïcode".encode(), b"x"]
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(texts)
    with inference_stub(onnx_gateway.url) as stub:
        response = stub.ModelInfer(request, timeout=RAW_CALL_TIMEOUT_S)
    assert [o.name for o in response.outputs] == ["ECHO"]
    assert response.outputs[0].datatype == "BYTES"
    assert list(response.outputs[0].shape) == [3]
    raw = response.raw_output_contents[0]
    assert raw == b"".join(len(t).to_bytes(4, "little") + t for t in texts)
    assert response_variant(response) == "v1"


def test_metadata_and_config_are_the_gateway_view(client):
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
    assert_config_consistent_with_metadata(config, metadata)


def test_server_and_model_readiness(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("linear", "ab", "echo"):
        assert client.is_model_ready(model)
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


def test_health_service_per_model(onnx_gateway):
    channel = grpc.insecure_channel(onnx_gateway.url)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "linear", "ab", "echo", "pair"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RAW_CALL_TIMEOUT_S)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=RAW_CALL_TIMEOUT_S)
    finally:
        channel.close()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_inference_service(onnx_gateway):
    channel = grpc.insecure_channel(onnx_gateway.url)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RAW_CALL_TIMEOUT_S)
        )
        services = {s.name for s in answer.list_services_response.service}
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = set(service.methods_by_name)
        infer_input = pool.FindMessageTypeByName("inference.ModelInferRequest")
    finally:
        channel.close()
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ServerLive"} <= methods
    assert "raw_input_contents" in infer_input.fields_by_name


def test_sync_stream_answers_each_request(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=CLIENT_TIMEOUT_S)
    inputs = {f"s-{i}": rows_for(300 + i, rows=1 + i % 3) for i in range(20)}
    try:
        for request_id, x in inputs.items():
            client.async_stream_infer("linear", [linear_input(x)], request_id=request_id)
        results = [answers.get(timeout=CLIENT_TIMEOUT_S) for _ in inputs]
    finally:
        client.stop_stream()
    for result, error in results:
        assert error is None, error
        request_id = result.get_response().id
        assert_matches_reference(result_outputs(result), inputs[request_id])
        assert result_variant(result) == "v1"
    assert sorted(r.get_response().id for r, _ in results) == sorted(inputs)


def test_sync_stream_error_then_good_request_on_the_same_stream(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=CLIENT_TIMEOUT_S)
    try:
        bad = InferInput("INPUT", [1, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
        client.async_stream_infer("linear", [bad], request_id="bad")
        first = answers.get(timeout=CLIENT_TIMEOUT_S)
        x = rows_for(400)
        client.async_stream_infer("linear", [linear_input(x)], request_id="good")
        second = answers.get(timeout=CLIENT_TIMEOUT_S)
    finally:
        client.stop_stream()
    result, error = first
    assert result is None
    assert isinstance(error, InferenceServerException)
    assert "shape" in error.message()
    result, error = second
    assert error is None, error
    assert result.get_response().id == "good"
    assert_matches_reference(result_outputs(result), x)


# -- tritonclient.grpc.aio against an in-process gateway in this loop ----------------------------


async def test_aio_200_concurrent_callers_each_get_their_own_answer(onnx_gateway_config, no_task_leaks):
    async with running_gateway(onnx_gateway_config) as gateway:
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


async def test_aio_stream_infer_with_an_invalid_request_in_the_middle(onnx_gateway_config, no_task_leaks):
    inputs = {f"a-{i}": rows_for(2000 + i, rows=1 + i % 2) for i in range(30)}

    async def requests():
        for n, (request_id, x) in enumerate(inputs.items()):
            if n == 10:
                bad = InferInput("INPUT", [1, 16], "FP64")
                bad.set_data_from_numpy(np.zeros((1, 16), np.float64))
                yield {"model_name": "linear", "inputs": [bad], "request_id": "bad"}
            yield {"model_name": "linear", "inputs": [linear_input(x)], "request_id": request_id}

    async with running_gateway(onnx_gateway_config) as gateway:
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
