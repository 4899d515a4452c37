"""End-to-end fixtures: real ``infergate serve`` processes over ONNX Runtime and over a real Triton.

The session-scoped gateways are shared by the e2e files to keep the suite fast; tests that signal
or stop a gateway start their own through ``gateway_process``. Every gateway started here is
checked on the way out: the process (and its process group) is gone.

Helpers that several e2e files use live here too: raw protobuf requests for the generated stub,
and checks of an answer against the numpy reference of the same weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import InferInput

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from infergate.gateway.demo_models import IR_VERSION, OPSET
from tests.support.models import FEATURES, classifier, onnx_config
from tests.support.processes import GatewayProcess, wait_until

ANSWER_ATOL = 1e-5
RAW_CALL_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 60.0
CONCURRENT_CALLERS = 200
MAX_MESSAGE_BYTES = 1 << 20
"""The shared ONNX gateway's message limit: far above every good call, easy to exceed on purpose."""


def build_pair_model(path: Path) -> Path:
    """Two batched inputs: ``A`` FP32 [N, 4] + ``B`` FP32 [N, 4] -> ``SUM`` FP32 [N, 4]."""
    graph = helper.make_graph(
        nodes=[helper.make_node("Add", ["A", "B"], ["SUM"])],
        name="pair",
        inputs=[
            helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, ["N", 4]),
        ],
        outputs=[helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="infergate-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def pair_model_path(tmp_path_factory) -> Path:
    return build_pair_model(tmp_path_factory.mktemp("pair") / "pair.onnx")


@pytest.fixture(scope="session")
def e2e_onnx_config(model_paths, pair_model_path) -> dict:
    """``linear``, ``ab``, ``echo`` (tests.support) plus the two-input ``pair``, 1 MiB message limit."""
    config = onnx_config(model_paths)
    config["models"]["pair"] = {"variants": {"v1": {"backend": "onnx_cpu", "path": str(pair_model_path), "weight": 1}}}
    config["server"] = {"max_message_bytes": MAX_MESSAGE_BYTES}
    return config


def triton_config(triton_url: str, timeout_ms: int = 20000) -> dict:
    """Gateway models over the real Triton: ``linear`` -> linear_v1, ``failing``, ``slow``."""

    def single(model: str) -> dict:
        return {"variants": {"v1": {"backend": "triton_main", "model": model, "weight": 100}}}

    return {
        "backends": {"triton_main": {"kind": "triton", "url": triton_url, "timeout_ms": timeout_ms}},
        "models": {"linear": single("linear_v1"), "failing": single("failing"), "slow": single("slow")},
    }


@contextlib.contextmanager
def shared_gateway(config: dict, workdir: Path, name: str) -> Iterator[GatewayProcess]:
    process = GatewayProcess(config, workdir, name=name).start()
    pid = process.process.pid
    try:
        yield process
    finally:
        code = process.stop()
        assert not process.alive()
        assert code == 0, f"{name} exited {code}; log: {process.log_path}"
        assert_process_gone(pid)


def assert_process_gone(pid: int, timeout_s: float = 15.0) -> None:
    """The child was reaped and, soon after, nothing of its process group is left.

    Helpers of the child (multiprocessing's resource tracker, workers) are killed with the group;
    they are reparented, so their last moments as zombies belong to init: poll for them.
    """
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    def group_gone() -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(group_gone, timeout_s, what=f"process group {pid} to be gone")


@pytest.fixture(scope="session")
def onnx_gateway(e2e_onnx_config, tmp_path_factory) -> Iterator[GatewayProcess]:
    """One ``infergate serve`` over ONNX Runtime shared by the e2e files."""
    with shared_gateway(e2e_onnx_config, tmp_path_factory.mktemp("onnx-gateway"), "onnx-gateway") as process:
        yield process


@pytest.fixture(scope="session")
def triton_gateway(triton_server, tmp_path_factory) -> Iterator[GatewayProcess]:
    """One ``infergate serve`` whose backend is the session's real Triton."""
    config = triton_config(triton_server.url)
    with shared_gateway(config, tmp_path_factory.mktemp("triton-gateway"), "triton-gateway") as process:
        yield process


@contextlib.contextmanager
def inference_stub(url: str, **options) -> Iterator[GRPCInferenceServiceStub]:
    """The generated stub on a plain channel (raw protobuf requests)."""
    channel = grpc.insecure_channel(url, options=list(options.items()))
    try:
        yield GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def rows_for(seed: int, rows: int = 2) -> np.ndarray:
    """A distinct FP32 input of shape [rows, 16] for each seed."""
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)


def linear_request(x: np.ndarray, model: str = "linear", request_id: str = "") -> pb.ModelInferRequest:
    """A valid raw ModelInferRequest for the linear classifier."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


def raw_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode the FP32 raw outputs of a response (checking the raw-only contract on the way)."""
    assert len(response.raw_output_contents) == len(response.outputs)
    answer = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        assert tensor.datatype == "FP32"
        assert not tensor.HasField("contents"), "outputs must travel in raw_output_contents only"
        answer[tensor.name] = np.frombuffer(raw, dtype="<f4").reshape(tuple(tensor.shape))
    return answer


def assert_matches_reference(outputs: dict[str, np.ndarray], x: np.ndarray, seed: int = 1) -> None:
    expected = classifier(seed).reference(x)
    assert set(outputs) == {"SCORES", "PROBS"}
    for name, want in expected.items():
        np.testing.assert_allclose(outputs[name], want, atol=ANSWER_ATOL, rtol=1e-5, err_msg=name)


def response_variant(response: pb.ModelInferResponse) -> str:
    assert "variant" in response.parameters, "every response must carry parameters['variant']"
    assert response.parameters["variant"].WhichOneof("parameter_choice") == "string_param"
    return response.parameters["variant"].string_param


def assert_serves(url: str, model: str = "linear", seed: int = 1) -> None:
    """A good raw call right now gets the reference answer (the gateway still serves)."""
    x = rows_for(12345)
    with inference_stub(url) as stub:
        response = stub.ModelInfer(linear_request(x, model, "still-serving"), timeout=RAW_CALL_TIMEOUT_S)
    assert response.id == "still-serving"
    assert response.model_name == model
    assert_matches_reference(raw_outputs(response), x, seed)
    assert response_variant(response)


def linear_input(x: np.ndarray) -> InferInput:
    tensor = InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def result_outputs(result) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in ("SCORES", "PROBS")}


def result_variant(result) -> str:
    return response_variant(result.get_response())


def assert_config_consistent_with_metadata(config: dict, metadata: dict) -> None:
    """Triton's rule: with max_batch_size > 0 dims leave out the batch dimension, with 0 they are the full shape."""
    batch = int(config.get("max_batch_size", 0))
    for section, tensors in (("input", metadata["inputs"]), ("output", metadata["outputs"])):
        for entry, tensor in zip(config[section], tensors, strict=True):
            assert entry["name"] == tensor["name"]
            dims = [int(d) for d in entry["dims"]]
            shape = [int(d) for d in tensor["shape"]]
            assert ([-1] + dims if batch > 0 else dims) == shape, (section, entry, tensor)
