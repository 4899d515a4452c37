"""The INVALID_ARGUMENT / NOT_FOUND matrix through raw protobuf requests on the generated stub.

Each bad request gets its status (and a message that says what is wrong), then a good call
proves the gateway still serves. The same matrix runs over one ModelStreamInfer stream, where
each bad request must yield an ``error_message`` response and the next good request an answer.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from tests.e2e.conftest import (
    MAX_MESSAGE_BYTES,
    RAW_CALL_TIMEOUT_S,
    assert_matches_reference,
    assert_serves,
    inference_stub,
    linear_request,
    raw_outputs,
    rows_for,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
HUGE = 2**40


def fp32(count: int) -> bytes:
    return np.arange(count, dtype="<f4").tobytes()


def bytes_element(item: bytes) -> bytes:
    return struct.pack("<I", len(item)) + item


def request(model: str = "linear", **fields) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, **fields)


def tensor(name: str, datatype: str, shape: list[int], **fields) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, **fields)


def typed(**contents) -> pb.InferTensorContents:
    return pb.InferTensorContents(**contents)


def with_parameter(name: str, **value) -> pb.ModelInferRequest:
    message = request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)])
    message.parameters[name].CopyFrom(pb.InferParameter(**value))
    return message


def with_outputs(*names: str, parameters: dict | None = None) -> pb.ModelInferRequest:
    message = request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)])
    for name in names:
        output = message.outputs.add(name=name)
        for key, value in (parameters or {}).items():
            output.parameters[key].CopyFrom(value)
    return message


def shared_memory_input() -> pb.ModelInferRequest:
    message = request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)])
    message.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return message


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], pb.ModelInferRequest]
    code: grpc.StatusCode
    says: str
    """A fragment the status message must contain (case-insensitive): proof the right check fired."""


CASES = [
    # dtype and shape
    Case("wrong-dtype", lambda: request(inputs=[tensor("INPUT", "FP64", [1, 16])], raw_input_contents=[np.zeros(16).tobytes()]), INVALID, "datatype"),
    Case("empty-dtype", lambda: request(inputs=[tensor("INPUT", "", [1, 16])], raw_input_contents=[fp32(16)]), INVALID, "datatype"),
    Case("unknown-dtype", lambda: request(inputs=[tensor("INPUT", "FLOAT32", [1, 16])], raw_input_contents=[fp32(16)]), INVALID, "datatype"),
    Case("wrong-rank-1d", lambda: request(inputs=[tensor("INPUT", "FP32", [16])], raw_input_contents=[fp32(16)]), INVALID, "shape"),
    Case("wrong-rank-3d", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 1, 16])], raw_input_contents=[fp32(16)]), INVALID, "shape"),
    Case("wrong-fixed-dim", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 15])], raw_input_contents=[fp32(15)]), INVALID, "shape"),
    Case("zero-batch", lambda: request(inputs=[tensor("INPUT", "FP32", [0, 16])], raw_input_contents=[b""]), INVALID, "batch"),
    Case("negative-dim", lambda: request(inputs=[tensor("INPUT", "FP32", [-1, 16])], raw_input_contents=[fp32(16)]), INVALID, "negative"),
    Case("absurd-dims", lambda: request(inputs=[tensor("INPUT", "FP32", [HUGE, HUGE])], raw_input_contents=[fp32(4)]), INVALID, "shape"),
    Case("absurd-batch-raw", lambda: request(inputs=[tensor("INPUT", "FP32", [HUGE, 16])], raw_input_contents=[fp32(16)]), INVALID, "raw bytes"),
    Case("absurd-batch-typed", lambda: request(inputs=[tensor("INPUT", "FP32", [HUGE, 16], contents=typed(fp32_contents=[1.0] * 16))]), INVALID, "values"),
    Case("absurd-bytes", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [2**62])], raw_input_contents=[bytes_element(b"ab")]), INVALID, "bytes"),
    # raw contents vs shape x dtype
    Case("raw-short", lambda: request(inputs=[tensor("INPUT", "FP32", [2, 16])], raw_input_contents=[fp32(31)]), INVALID, "raw bytes"),
    Case("raw-long", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16) + b"\0"]), INVALID, "raw bytes"),
    Case("raw-empty", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[b""]), INVALID, "raw bytes"),
    Case("raw-count-over-inputs", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16), fp32(16)]), INVALID, "raw_input_contents"),
    Case(
        "raw-count-under-inputs",
        lambda: request("pair", inputs=[tensor("A", "FP32", [1, 4]), tensor("B", "FP32", [1, 4])], raw_input_contents=[fp32(4)]),
        INVALID,
        "raw_input_contents",
    ),
    # inputs present, absent, unknown, repeated
    Case("no-inputs", lambda: request(), INVALID, "missing"),
    Case("missing-input", lambda: request("pair", inputs=[tensor("A", "FP32", [1, 4])], raw_input_contents=[fp32(4)]), INVALID, "missing"),
    Case(
        "extra-input",
        lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16]), tensor("EXTRA", "FP32", [1, 16])], raw_input_contents=[fp32(16), fp32(16)]),
        INVALID,
        "unexpected input",
    ),
    Case(
        "duplicate-input",
        lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16]), tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16), fp32(16)]),
        INVALID,
        "more than once",
    ),
    Case(
        "batch-dims-disagree",
        lambda: request("pair", inputs=[tensor("A", "FP32", [2, 4]), tensor("B", "FP32", [3, 4])], raw_input_contents=[fp32(8), fp32(12)]),
        INVALID,
        "batch dimension",
    ),
    # typed contents
    Case(
        "raw-and-typed",
        lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16], contents=typed(fp32_contents=[0.0] * 16))], raw_input_contents=[fp32(16)]),
        INVALID,
        "both",
    ),
    Case("typed-wrong-field", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16], contents=typed(int_contents=[1] * 16))]), INVALID, "fp32_contents"),
    Case("typed-two-fields", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16], contents=typed(fp32_contents=[1.0] * 16, fp64_contents=[1.0]))]), INVALID, "fp32_contents"),
    Case("typed-count-short", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16], contents=typed(fp32_contents=[1.0] * 15))]), INVALID, "values"),
    Case("typed-count-long", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16], contents=typed(fp32_contents=[1.0] * 17))]), INVALID, "values"),
    Case("no-contents-at-all", lambda: request(inputs=[tensor("INPUT", "FP32", [1, 16])]), INVALID, "values"),
    # BYTES encoding
    Case("bytes-length-past-end", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [1])], raw_input_contents=[struct.pack("<I", 100) + b"abc"]), INVALID, "past the end"),
    Case("bytes-huge-length", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [1])], raw_input_contents=[struct.pack("<I", 2**32 - 1) + b"abc"]), INVALID, "past the end"),
    Case("bytes-short", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [2])], raw_input_contents=[bytes_element(b"only")]), INVALID, "bytes"),
    Case("bytes-long", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [1])], raw_input_contents=[bytes_element(b"a") + bytes_element(b"b")]), INVALID, "left over"),
    Case("bytes-cut-length", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [2])], raw_input_contents=[bytes_element(b"abcd") + b"\x01\x00"]), INVALID, "4-byte length"),
    Case("bytes-typed-count", lambda: request("echo", inputs=[tensor("TEXT", "BYTES", [3], contents=typed(bytes_contents=[b"a", b"b"]))]), INVALID, "values"),
    # parameters
    Case("reserved-variant", lambda: with_parameter("variant", string_param="v2"), INVALID, "reserved"),
    Case("reserved-triton-prefix", lambda: with_parameter("triton_x", bool_param=True), INVALID, "reserved"),
    Case("reserved-infergate-prefix", lambda: with_parameter("infergate_x", int64_param=1), INVALID, "reserved"),
    Case("sequence-id", lambda: with_parameter("sequence_id", int64_param=7), INVALID, "sequence"),
    Case("shared-memory-input", shared_memory_input, INVALID, "shared memory"),
    # outputs
    Case("unknown-output", lambda: with_outputs("NOPE"), INVALID, "unknown output"),
    Case("duplicate-output", lambda: with_outputs("PROBS", "PROBS"), INVALID, "twice"),
    Case("classification-output", lambda: with_outputs("PROBS", parameters={"classification": pb.InferParameter(int64_param=2)}), INVALID, "classification"),
    # model and version
    Case("unknown-model", lambda: request("no_such_model", inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)]), NOT_FOUND, "no_such_model"),
    Case("empty-model-name", lambda: request("", inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)]), NOT_FOUND, "unknown model"),
    Case("unknown-version", lambda: request(model_version="7", inputs=[tensor("INPUT", "FP32", [1, 16])], raw_input_contents=[fp32(16)]), NOT_FOUND, "version"),
]


@pytest.fixture(scope="module")
def stub(onnx_gateway):
    with inference_stub(onnx_gateway.url) as stub:
        yield stub


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request_is_refused_and_the_gateway_still_serves(case: Case, stub, onnx_gateway):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(case.build(), timeout=RAW_CALL_TIMEOUT_S)
    assert err.value.code() == case.code, err.value.details()
    assert case.says.lower() in err.value.details().lower()
    assert "Traceback" not in err.value.details()
    assert_serves(onnx_gateway.url)


def test_version_1_and_empty_version_are_served(stub):
    x = rows_for(77)
    for version in ("", "1"):
        message = linear_request(x)
        message.model_version = version
        assert_matches_reference(raw_outputs(stub.ModelInfer(message, timeout=RAW_CALL_TIMEOUT_S)), x)


def test_typed_int_contents_and_request_parameters_accepted(stub):
    """Caller parameters that are not reserved pass, of every InferParameter kind."""
    x = rows_for(78)
    message = linear_request(x)
    message.parameters["user_id"].string_param = "u-1"
    message.parameters["priority"].int64_param = 3
    message.parameters["ratio"].double_param = 0.5
    message.parameters["big"].uint64_param = 2**63
    message.parameters["flag"].bool_param = True
    assert_matches_reference(raw_outputs(stub.ModelInfer(message, timeout=RAW_CALL_TIMEOUT_S)), x)


@pytest.mark.parametrize(
    "rpc, message",
    [
        ("ModelMetadata", pb.ModelMetadataRequest(name="no_such_model")),
        ("ModelMetadata", pb.ModelMetadataRequest(name="linear", version="2")),
        ("ModelConfig", pb.ModelConfigRequest(name="no_such_model")),
        ("ModelReady", pb.ModelReadyRequest(name="no_such_model")),
        ("ModelStatistics", pb.ModelStatisticsRequest(name="no_such_model")),
    ],
    ids=["metadata", "metadata-version", "config", "ready", "statistics"],
)
def test_unknown_model_elsewhere_is_not_found(stub, rpc, message, onnx_gateway):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(message, timeout=RAW_CALL_TIMEOUT_S)
    assert err.value.code() == NOT_FOUND
    assert_serves(onnx_gateway.url)


def test_message_over_the_limit_is_resource_exhausted(onnx_gateway):
    rows = MAX_MESSAGE_BYTES // (16 * 4) + 16
    message = request(inputs=[tensor("INPUT", "FP32", [rows, 16])], raw_input_contents=[fp32(rows * 16)])
    assert message.ByteSize() > MAX_MESSAGE_BYTES
    with inference_stub(onnx_gateway.url, **{"grpc.max_send_message_length": -1}) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(message, timeout=RAW_CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serves(onnx_gateway.url)


class _StreamCalls:
    """A ModelStreamInfer call driven one request at a time (a queue feeds the request iterator)."""

    _END = object()

    def __init__(self, stub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, self._END), timeout=120)

    def call(self, message: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        self._requests.put(message)
        answer: list = []
        reader = threading.Thread(target=lambda: answer.append(next(self._responses)), daemon=True)
        reader.start()
        reader.join(RAW_CALL_TIMEOUT_S)
        assert answer, f"no stream response to {message.id!r} within {RAW_CALL_TIMEOUT_S}s"
        return answer[0]

    def close(self) -> list:
        self._requests.put(self._END)
        return list(self._responses)


def test_stream_answers_errors_in_band_and_keeps_serving(stub):
    """One stream, the whole matrix: bad -> error_message; the next good request is answered."""
    stream = _StreamCalls(stub)
    for n, case in enumerate(CASES):
        bad = case.build()
        bad.id = f"bad-{case.id}"
        response = stream.call(bad)
        assert response.error_message, case.id
        assert case.says.lower() in response.error_message.lower(), (case.id, response.error_message)
        assert response.infer_response.id == bad.id
        x = rows_for(5000 + n)
        response = stream.call(linear_request(x, request_id=f"good-{n}"))
        assert response.error_message == "", (case.id, response.error_message)
        assert response.infer_response.id == f"good-{n}"
        assert_matches_reference(raw_outputs(response.infer_response), x)
    assert stream.close() == []
