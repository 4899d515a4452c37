"""A gateway that starts while its Triton is down (issue 9, item 5): real Triton, real ONNX Runtime.

It refused to start (``cannot start: ... Connection refused``) even with a fallback configured.
Class of defect: start-up required every backend to answer. Now a variant whose backend cannot be
reached is unavailable until it can: its fallback serves, a model with no other variant answers
UNAVAILABLE and reports NOT_SERVING, and once Triton answers the variant is loaded, its signature
checked against the model's (or learned, for a model that had none), and it serves.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.reliability.conftest import gateway_running
from tests.support.models import FEATURES, classifier
from tests.support.processes import TritonProcess, free_port, wait_until

pytestmark = pytest.mark.reliability

TRITON_START_S = 180.0


def call(stub: GRPCInferenceServiceStub, model: str, seed: int) -> tuple[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(1, FEATURES)).astype("<f4")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, FEATURES])
    request.raw_input_contents.append(x.tobytes())
    answer = stub.ModelInfer(request, timeout=20)
    index = [o.name for o in answer.outputs].index("SCORES")
    scores = np.frombuffer(answer.raw_output_contents[index], dtype="<f4").reshape(1, -1)
    np.testing.assert_allclose(scores, classifier(1).reference(x)["SCORES"], atol=1e-4)
    return answer.parameters["variant"].string_param, scores


def code_of(function, *args) -> grpc.StatusCode:
    try:
        function(*args)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_the_gateway_starts_and_serves_while_triton_is_down_then_picks_it_up(model_paths, tmp_path):
    triton_port = free_port()
    triton = {"kind": "triton", "url": f"127.0.0.1:{triton_port}", "timeout_ms": 5000, "readiness_poll_s": 0.5}
    config = {
        "backends": {"triton_main": triton, "onnx_cpu": {"kind": "onnx", "intra_op_threads": 1}},
        "models": {
            "linear": {"variants": {
                "v1": {"backend": "triton_main", "model": "linear_v1", "weight": 100, "fallback": "v1_cpu"},
                "v1_cpu": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 0},
            }},
            "triton_only": {"variants": {"v1": {"backend": "triton_main", "model": "linear_v1", "weight": 1}}},
        },
    }
    with gateway_running(config, tmp_path, "triton-down") as gateway:
        with grpc.insecure_channel(gateway.url) as channel:
            stub = GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            assert call(stub, "linear", 1)[0] == "v1_cpu"  # the fallback serves
            assert code_of(call, stub, "triton_only", 2) == grpc.StatusCode.UNAVAILABLE
            assert code_of(stub.ModelMetadata, pb.ModelMetadataRequest(name="triton_only")) == grpc.StatusCode.UNAVAILABLE
            assert not stub.ModelReady(pb.ModelReadyRequest(name="triton_only"), timeout=10).ready
            assert health.Check(health_pb2.HealthCheckRequest(service="triton_only"), timeout=10).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="linear"), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING

            server = TritonProcess(tmp_path, grpc_port=triton_port).start()
            try:
                wait_until(lambda: code_of(call, stub, "triton_only", 3) == grpc.StatusCode.OK, 60, 0.25,
                           what="the Triton-only model to serve")
                wait_until(lambda: call(stub, "linear", 4)[0] == "v1", 60, 0.25, what="linear to be served by Triton")
                metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="triton_only"), timeout=10)
                assert [t.name for t in metadata.inputs] == ["INPUT"]
                assert health.Check(health_pb2.HealthCheckRequest(service="triton_only"), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            finally:
                server.stop()
