"""A memory budget for requests in flight (issue 9, item 4), on a real gateway process.

48 concurrent 60 MB calls, all of them rejected in the end, took RSS to 7.9 GB. Class of defect:
nothing bounded the bytes of requests held at once. Two bounds now: ``server.max_message_bytes``
(default 4 MiB, was 64 MiB), which grpc enforces from a message's length prefix before buffering
it, and ``server.max_inflight_request_bytes`` (default 256 MiB), past which a request is refused
RESOURCE_EXHAUSTED before it is decoded, unary or one message of a stream. The figures measured
here go to RELIABILITY.md (``python -m tests.reliability.large_messages`` repeats them).
"""

from __future__ import annotations

import platform
import sys

import grpc
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.reliability.conftest import gateway_running
from tests.reliability.large_messages import flood
from tests.support.models import onnx_config

pytestmark = pytest.mark.reliability

POD_SAFE_RSS = 1536 << 20
"""What the gateway may reach under these floods and still leave a 2 GiB pod room (interpreter,
ONNX Runtime, page cache of the models)."""
CALLERS = 48


def test_48_concurrent_60_mb_calls_are_refused_before_they_are_buffered(model_paths, tmp_path):
    """Issue 9's case at the defaults: 48 x 60 MB took RSS to 7.9 GB (6.2 GB here with the old 64 MiB
    limit). Past ``max_message_bytes`` (4 MiB) grpc refuses a message from its length prefix."""
    with gateway_running(onnx_config(model_paths), tmp_path, "memory-60mb") as gateway:
        outcome = flood(gateway, CALLERS, 60 << 20)
    print(f"48 x 60 MB at the defaults: {outcome.summary()}")
    assert outcome.codes == {"RESOURCE_EXHAUSTED": CALLERS}, outcome.codes
    assert outcome.peak_bytes < POD_SAFE_RSS, outcome.summary()
    assert outcome.small_call_ok


def test_48_concurrent_calls_of_the_largest_allowed_size_stay_within_a_pod(model_paths, tmp_path):
    """The largest message the defaults let through, from 48 callers at once: each is decoded and
    refused (wrong byte count) or refused by the in-flight byte budget; RSS stays pod-safe."""
    with gateway_running(onnx_config(model_paths), tmp_path, "memory-largest") as gateway:
        outcome = flood(gateway, CALLERS, (4 << 20) - (64 << 10))
    print(f"48 x 3.94 MiB at the defaults: {outcome.summary()}")
    assert set(outcome.codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, outcome.codes
    assert sum(outcome.codes.values()) == CALLERS
    assert outcome.peak_bytes < POD_SAFE_RSS, outcome.summary()
    assert outcome.small_call_ok


def test_requests_past_the_in_flight_byte_budget_are_refused_before_decoding(model_paths, tmp_path):
    """A small budget (8 MiB) under 16 callers x 3 calls of 3.9 MiB: some are refused RESOURCE_EXHAUSTED."""
    config = dict(onnx_config(model_paths), server={"max_inflight_request_bytes": 8 << 20})
    with gateway_running(config, tmp_path, "memory-budget") as gateway:
        outcome = flood(gateway, 16, (4 << 20) - (64 << 10), calls=3)
    print(f"budget 8 MiB, 16 x 3 x 3.94 MiB: {outcome.summary()}")
    assert set(outcome.codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, outcome.codes
    assert outcome.codes.get("RESOURCE_EXHAUSTED", 0) > 0
    assert outcome.small_call_ok


def test_a_stream_message_past_the_budget_gets_an_error_answer(model_paths, tmp_path):
    config = dict(onnx_config(model_paths), server={"max_message_bytes": 16 << 20, "max_inflight_request_bytes": 4 << 20})
    with gateway_running(config, tmp_path, "memory-stream") as gateway:
        options = [("grpc.max_send_message_length", 128 << 20)]
        with grpc.insecure_channel(gateway.url, options=options) as channel:
            big = pb.ModelInferRequest(model_name="linear", id="big")
            big.inputs.add(name="INPUT", datatype="FP32", shape=[1, 16])
            big.raw_input_contents.append(b"\0" * (8 << 20))
            small = pb.ModelInferRequest(model_name="linear", id="small")
            small.inputs.add(name="INPUT", datatype="FP32", shape=[1, 16])
            small.raw_input_contents.append(b"\0" * 64)
            answers = {a.infer_response.id: a for a in GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([big, small]), timeout=30)}
    assert "too many request bytes in flight" in answers["big"].error_message
    assert answers["small"].error_message == ""


def test_malloc_arenas_are_limited_unless_the_operator_chose():
    from infergate.gateway.admission import limit_malloc_arenas

    assert limit_malloc_arenas(2, {"MALLOC_ARENA_MAX": "4"}) is False  # the operator's setting wins
    if sys.platform == "linux" and "glibc" in " ".join(platform.libc_ver()):
        assert limit_malloc_arenas(2, {}) is True
