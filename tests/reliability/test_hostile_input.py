"""Hostile input on the wire (issue 9, items 10 and 14, and the decode-path fuzzing).

Class of defect: grpc.aio decodes a request before any servicer code runs, and a message that does
not parse was answered UNKNOWN "Unexpected <class DecodeError>" (9,932 of 10k random messages),
on every service; a malformed message on ModelStreamInfer hung the stream. Now every method
decodes inside the call (``gateway/wire.py``) and answers INVALID_ARGUMENT. And an error message
that quoted the caller's input without bound (a 20 KB model name) overflowed the client's trailer
limit and turned into another status; ``GatewayError`` now caps every message it carries.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from infergate.gateway.errors import MAX_MESSAGE_CHARS
from tests.reliability.conftest import every_method, raw_call, rss_bytes

pytestmark = pytest.mark.reliability

MALFORMED = {
    "truncated field": b"\x0a\x05ab",  # field 1, 5 bytes long, 2 sent: no message type parses this
    "truncated tag": b"\xff",
    "invalid UTF-8 in a string": b"\x0a\x02\xff\xfe",
}
METHODS = every_method()
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
"""What no input may produce: UNKNOWN is grpc's answer to an unhandled exception, INTERNAL a bug."""
FUZZ_RSS_GROWTH_BYTES = 64 << 20


@pytest.mark.parametrize("path,client_streaming,server_streaming", METHODS, ids=[m[0] for m in METHODS])
def test_a_message_that_does_not_parse_is_invalid_argument_on_every_rpc(channel, path, client_streaming, server_streaming):
    for what, payload in MALFORMED.items():
        if what == "invalid UTF-8 in a string":
            continue  # field 1 is not a string in every message; covered for ModelInfer below
        code = raw_call(channel, path, client_streaming, server_streaming, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{path} {what}: {code}"


def test_invalid_utf8_in_a_string_field_is_invalid_argument(channel):
    for path, streaming in (("/inference.GRPCInferenceService/ModelInfer", False),
                            ("/inference.GRPCInferenceService/ModelStreamInfer", True)):
        code = raw_call(channel, path, streaming, streaming, MALFORMED["invalid UTF-8 in a string"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, path


def test_a_malformed_message_mid_stream_ends_that_stream_only(channel):
    """Good answers before it arrive; the bad message ends the stream INVALID_ARGUMENT (it used to hang)."""
    good = pb.ModelInferRequest(model_name="nope", id="first").SerializeToString()
    answers = []
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as err:
        for answer in call(iter([good, MALFORMED["truncated field"]]), timeout=10):
            answers.append(pb.ModelStreamInferResponse.FromString(answer))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.infer_response.id for a in answers] in ([], ["first"])
    assert GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live


@pytest.mark.parametrize("size", [20_000, 200_000])
def test_an_error_message_never_echoes_unbounded_input(channel, size):
    stub = GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="m" * size), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details()) <= MAX_MESSAGE_CHARS

    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="I" * size, datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\0" * 64)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) <= MAX_MESSAGE_CHARS


# -- fuzzing ------------------------------------------------------------------------------------

DATATYPES = ["FP32", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP16", "BF16", "", "X"]
names = st.sampled_from(["INPUT", "linear", "echo", "ab", "", "OUTPUT", "nope"]) | st.text(max_size=12)
shapes = st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4)
tensors = st.builds(
    lambda name, datatype, shape: pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape),
    names, st.sampled_from(DATATYPES), shapes,
)


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2"])), id=draw(names))
    for tensor in draw(st.lists(tensors, max_size=3)):
        added = request.inputs.add()
        added.CopyFrom(tensor)
        kind = draw(st.sampled_from(["none", "fp32", "int64", "bytes", "bool"]))
        if kind == "fp32":
            added.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=40)))
        elif kind == "int64":
            added.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)))
        elif kind == "bytes":
            added.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=16), max_size=8)))
        elif kind == "bool":
            added.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=40)))
    for raw in draw(st.lists(st.binary(max_size=256), max_size=3)):
        request.raw_input_contents.append(raw)
    for output in draw(st.lists(names, max_size=2)):
        request.outputs.add(name=output)
    for key in draw(st.lists(st.sampled_from(["sticky", "variant", "binary_data_output", "x", "priority"]), max_size=2)):
        parameter = request.parameters[key]
        choice = draw(st.integers(0, 3))
        if choice == 0:
            parameter.string_param = draw(st.text(max_size=8))
        elif choice == 1:
            parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif choice == 2:
            parameter.bool_param = draw(st.booleans())
        else:
            parameter.double_param = draw(st.floats())
    return request


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_fuzzed_infer_requests_get_a_designed_status_and_memory_stays_bounded(hostile_gateway, channel):
    stub = GRPCInferenceServiceStub(channel)
    before = rss_bytes(hostile_gateway.process.pid)
    seen: dict[grpc.StatusCode, int] = {}

    @FUZZ
    @given(infer_requests())
    def check(request):
        try:
            stub.ModelInfer(request, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        seen[code] = seen.get(code, 0) + 1
        assert code not in NEVER, f"{code} for {request}"

    check()
    grown = rss_bytes(hostile_gateway.process.pid) - before
    assert grown < FUZZ_RSS_GROWTH_BYTES, f"RSS grew {grown >> 20} MiB over the fuzz run; codes {seen}"
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0  # the fuzz reached the decode checks


def test_random_bytes_on_every_rpc_never_unknown_or_internal(hostile_gateway, channel):
    before = rss_bytes(hostile_gateway.process.pid)

    @FUZZ
    @given(st.sampled_from(METHODS), st.binary(max_size=512))
    def check(method, payload):
        path, client_streaming, server_streaming = method
        # A payload that happens to parse opens a server stream that stays open: DEADLINE_EXCEEDED.
        code = raw_call(channel, path, client_streaming, server_streaming, payload, timeout_s=0.5 if server_streaming else 10)
        assert code not in NEVER, f"{path}: {code} for {payload!r}"

    check()
    grown = rss_bytes(hostile_gateway.process.pid) - before
    assert grown < FUZZ_RSS_GROWTH_BYTES, f"RSS grew {grown >> 20} MiB over the fuzz run"
