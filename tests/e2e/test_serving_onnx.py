"""End to end over ONNX Runtime with unmodified tritonclient: what only the ONNX gateway serves
(A/B, BYTES through ``echo``, requested outputs, caller parameters) and the health and reflection
services. What every backend kind serves is in test_serving.py, one body run over each kind.
Every answer is compared with the numpy reference of the same weights.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from tritonclient.grpc import InferInput, InferRequestedOutput

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from tests.e2e.conftest import (
    CLIENT_TIMEOUT_S,
    RAW_CALL_TIMEOUT_S,
    assert_matches_reference,
    inference_stub,
    linear_input,
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
