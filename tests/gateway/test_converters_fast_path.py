"""The decoder's fast path for the common request (raw contents, no parameters, shapes that fit).

``decode_infer_request`` first tries ``_decode_plain``, which returns None on anything unusual, and
then runs ``_decode_checked`` (every check, in order, each with its own message). These tests hold
the promise that makes this safe: for every request, the answer (tensors, outputs, parameters,
rows) or the error (type and message) is the one ``_decode_checked`` alone gives, and each branch
the fast path skips still gets its own error, worded as before.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from infergate.backends.base import ModelSignature, TensorSpec
from infergate.backends.datatypes import encode_bytes
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway.converters import _decode_checked, _decode_plain, decode_infer_request, encode_infer_response
from infergate.gateway.errors import InvalidArgument

MLP = ModelSignature(
    inputs=(TensorSpec("INPUT", "FP32", (-1, 4)),),
    outputs=(TensorSpec("OUTPUT", "FP32", (-1, 2)),),
    batched=True,
)
PAIR = ModelSignature(
    inputs=(TensorSpec("A", "FP32", (-1, 2)), TensorSpec("B", "INT64", (-1, 1))),
    outputs=(TensorSpec("P", "FP32", (-1, 2)), TensorSpec("Q", "INT64", (-1,))),
    batched=True,
    max_batch_size=4,
)
TEXT = ModelSignature(inputs=(TensorSpec("TEXT", "BYTES", (-1,)),), outputs=(TensorSpec("ECHO", "BYTES", (-1,)),), batched=True)
ENTITY = ModelSignature(
    inputs=(TensorSpec("ID", "BYTES", (-1,), accepts=(("BYTES", (-1, 1)), ("INT64", (-1,)), ("INT64", (-1, 1)))),),
    outputs=(TensorSpec("OUTPUT", "FP32", (-1, 2)),),
    batched=True,
)
FREE = ModelSignature(inputs=(TensorSpec("M", "FP32", (-1, -1)),), outputs=(TensorSpec("Y", "FP32", (-1,)),), batched=True)
FIXED = ModelSignature(inputs=(TensorSpec("X", "FP32", (3,)),), outputs=(TensorSpec("Y", "FP32", (3,)),), batched=False)


def fp32(count: int) -> bytes:
    return np.arange(count, dtype="<f4").tobytes()


def int64(count: int) -> bytes:
    return np.arange(count, dtype="<i8").tobytes()


def texts(*items: bytes) -> bytes:
    return encode_bytes(np.array(items, dtype=np.object_))


def request(*tensors: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape in tensors:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.extend(raw or [])
    return message


def mlp_request(rows: int = 1) -> pb.ModelInferRequest:
    return request(("INPUT", "FP32", [rows, 4]), raw=[fp32(4 * rows)])


def outcome(decode, message: pb.ModelInferRequest, signature: ModelSignature, max_batch_size: int = 0):
    """What a decoder makes of a request, in a form two decoders can be compared by."""
    try:
        decoded = decode(message, signature, max_batch_size)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point (type and message)
        return ("error", type(exc).__name__, str(exc))
    arrays = {name: (array.dtype.str, array.shape, array.tolist()) for name, array in decoded.inputs.items()}
    return ("ok", arrays, list(decoded.inputs), decoded.outputs, dict(decoded.parameters), decoded.rows)


def _with(message: pb.ModelInferRequest, change) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(message)
    change(copy)
    return copy


def _corpus():
    """(id, request, signature, max_batch_size): the common request and one step off it each way."""
    good = mlp_request()
    pair = request(("A", "FP32", [2, 2]), ("B", "INT64", [2, 1]), raw=[fp32(4), int64(2)])
    yield "plain", good, MLP, 0
    yield "plain-3-rows", mlp_request(3), MLP, 0
    yield "plain-over-caller-limit", mlp_request(3), MLP, 2
    yield "plain-at-caller-limit", mlp_request(2), MLP, 2
    yield "pair", pair, PAIR, 0
    yield "pair-reversed", request(("B", "INT64", [2, 1]), ("A", "FP32", [2, 2]), raw=[int64(2), fp32(4)]), PAIR, 0
    yield "pair-over-own-limit", request(("A", "FP32", [5, 2]), ("B", "INT64", [5, 1]), raw=[fp32(10), int64(5)]), PAIR, 0
    yield "pair-over-caller-limit", pair, PAIR, 1
    yield "pair-rows-disagree", request(("A", "FP32", [2, 2]), ("B", "INT64", [3, 1]), raw=[fp32(4), int64(3)]), PAIR, 0
    yield "pair-missing", request(("A", "FP32", [2, 2]), raw=[fp32(4)]), PAIR, 0
    yield "pair-duplicate", request(("A", "FP32", [2, 2]), ("A", "FP32", [2, 2]), raw=[fp32(4), fp32(4)]), PAIR, 0
    yield "pair-unknown", request(("A", "FP32", [2, 2]), ("C", "INT64", [2, 1]), raw=[fp32(4), int64(2)]), PAIR, 0
    yield "pair-three", request(("A", "FP32", [2, 2]), ("B", "INT64", [2, 1]), ("C", "FP32", [1]), raw=[fp32(4), int64(2), fp32(1)]), PAIR, 0
    yield "no-inputs", request(), MLP, 0
    yield "unknown-input", request(("X", "FP32", [1, 4]), raw=[fp32(4)]), MLP, 0
    yield "raw-count-over", request(("INPUT", "FP32", [1, 4]), raw=[fp32(4), fp32(4)]), MLP, 0
    yield "raw-count-under", request(("A", "FP32", [2, 2]), ("B", "INT64", [2, 1]), raw=[fp32(4)]), PAIR, 0
    yield "no-raw", request(("INPUT", "FP32", [1, 4])), MLP, 0
    yield "wrong-datatype", request(("INPUT", "FP64", [1, 4]), raw=[bytes(32)]), MLP, 0
    yield "empty-datatype", request(("INPUT", "", [1, 4]), raw=[fp32(4)]), MLP, 0
    yield "unknown-datatype", request(("INPUT", "FLOAT32", [1, 4]), raw=[fp32(4)]), MLP, 0
    yield "wrong-rank", request(("INPUT", "FP32", [4]), raw=[fp32(4)]), MLP, 0
    yield "wrong-fixed-dim", request(("INPUT", "FP32", [1, 3]), raw=[fp32(3)]), MLP, 0
    yield "negative-dim", request(("INPUT", "FP32", [-1, 4]), raw=[fp32(4)]), MLP, 0
    yield "negative-fixed-dim", request(("INPUT", "FP32", [1, -4]), raw=[fp32(4)]), MLP, 0
    yield "zero-batch", request(("INPUT", "FP32", [0, 4]), raw=[b""]), MLP, 0
    yield "huge-batch", request(("INPUT", "FP32", [2**40, 4]), raw=[fp32(4)]), MLP, 0
    yield "raw-short", request(("INPUT", "FP32", [2, 4]), raw=[fp32(7)]), MLP, 0
    yield "raw-long", request(("INPUT", "FP32", [1, 4]), raw=[fp32(4) + b"\0"]), MLP, 0
    yield "raw-empty", request(("INPUT", "FP32", [1, 4]), raw=[b""]), MLP, 0
    yield "reserved-parameter", _with(good, lambda m: m.parameters["variant"].CopyFrom(pb.InferParameter(string_param="v2"))), MLP, 0
    yield "triton-parameter", _with(good, lambda m: m.parameters["triton_x"].CopyFrom(pb.InferParameter(int64_param=1))), MLP, 0
    yield "sequence-parameter", _with(good, lambda m: m.parameters["sequence_id"].CopyFrom(pb.InferParameter(int64_param=1))), MLP, 0
    yield "caller-parameters", _with(
        good,
        lambda m: (
            m.parameters["user_id"].CopyFrom(pb.InferParameter(string_param="u1")),
            m.parameters["n"].CopyFrom(pb.InferParameter(int64_param=-3)),
            m.parameters["none"].CopyFrom(pb.InferParameter()),
        ),
    ), MLP, 0
    yield "parameter-and-bad-shape", _with(
        request(("INPUT", "FP32", [1, 3]), raw=[fp32(3)]), lambda m: m.parameters["user_id"].CopyFrom(pb.InferParameter(string_param="u1"))
    ), MLP, 0
    yield "tensor-shared-memory", _with(good, lambda m: m.inputs[0].parameters["shared_memory_region"].CopyFrom(pb.InferParameter(string_param="r"))), MLP, 0
    yield "tensor-other-parameter", _with(good, lambda m: m.inputs[0].parameters["binary_data_size"].CopyFrom(pb.InferParameter(int64_param=16))), MLP, 0
    yield "raw-and-typed", _with(good, lambda m: m.inputs[0].contents.fp32_contents.extend([0.0] * 4)), MLP, 0
    yield "raw-and-empty-contents", _with(good, lambda m: m.inputs[0].contents.SetInParent()), MLP, 0
    yield "typed", _with(request(("INPUT", "FP32", [1, 4])), lambda m: m.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])), MLP, 0
    yield "typed-wrong-field", _with(request(("INPUT", "FP32", [1, 4])), lambda m: m.inputs[0].contents.int_contents.extend([1] * 4)), MLP, 0
    yield "typed-two-fields", _with(
        request(("INPUT", "FP32", [1, 4])), lambda m: (m.inputs[0].contents.fp32_contents.extend([1.0] * 4), m.inputs[0].contents.bytes_contents.append(b"x"))
    ), MLP, 0
    yield "typed-short", _with(request(("INPUT", "FP32", [1, 4])), lambda m: m.inputs[0].contents.fp32_contents.extend([1.0] * 3)), MLP, 0
    yield "outputs-by-name", _with(pair, lambda m: (m.outputs.add(name="Q"), m.outputs.add(name="P"))), PAIR, 0
    yield "output-unknown", _with(good, lambda m: m.outputs.add(name="NOPE")), MLP, 0
    yield "output-twice", _with(good, lambda m: (m.outputs.add(name="OUTPUT"), m.outputs.add(name="OUTPUT"))), MLP, 0
    yield "output-classification", _with(
        good, lambda m: m.outputs.add(name="OUTPUT").parameters["classification"].CopyFrom(pb.InferParameter(int64_param=2))
    ), MLP, 0
    yield "output-unknown-and-bad-input", _with(request(("INPUT", "FP32", [1, 3]), raw=[fp32(3)]), lambda m: m.outputs.add(name="NOPE")), MLP, 0
    yield "bytes", request(("TEXT", "BYTES", [3]), raw=[texts(b"", "ü".encode(), b"x")]), TEXT, 0
    yield "bytes-long", request(("TEXT", "BYTES", [1]), raw=[texts(b"ab") + b"\0"]), TEXT, 0
    yield "bytes-short", request(("TEXT", "BYTES", [2]), raw=[texts(b"ab") + struct.pack("<I", 9)]), TEXT, 0
    yield "bytes-absurd-count", request(("TEXT", "BYTES", [2**62]), raw=[texts(b"a")]), TEXT, 0
    yield "bytes-over-limit", request(("TEXT", "BYTES", [3]), raw=[texts(b"a", b"b", b"c")]), TEXT, 2
    yield "entity-bytes", request(("ID", "BYTES", [2]), raw=[texts(b"a", b"b")]), ENTITY, 0
    yield "entity-bytes-column", request(("ID", "BYTES", [2, 1]), raw=[texts(b"a", b"b")]), ENTITY, 0
    yield "entity-int64", request(("ID", "INT64", [3]), raw=[int64(3)]), ENTITY, 0
    yield "entity-int64-column", request(("ID", "INT64", [3, 1]), raw=[int64(3)]), ENTITY, 0
    yield "entity-int64-wide", request(("ID", "INT64", [3, 2]), raw=[int64(6)]), ENTITY, 0
    yield "entity-int32", request(("ID", "INT32", [3]), raw=[bytes(12)]), ENTITY, 0
    yield "entity-int64-short", request(("ID", "INT64", [3]), raw=[int64(2)]), ENTITY, 0
    yield "entity-over-limit", request(("ID", "INT64", [65]), raw=[int64(65)]), ENTITY, 64
    yield "bytes-negative", request(("TEXT", "BYTES", [-2]), raw=[texts(b"a", b"b")]), TEXT, 0
    yield "free-dims", request(("M", "FP32", [2, 2]), raw=[fp32(4)]), FREE, 0
    yield "free-dims-both-negative", request(("M", "FP32", [-2, -2]), raw=[fp32(4)]), FREE, 0
    yield "unbatched", request(("X", "FP32", [3]), raw=[fp32(3)]), FIXED, 0
    yield "unbatched-limit-ignored", request(("X", "FP32", [3]), raw=[fp32(3)]), FIXED, 1
    yield "unbatched-wrong", request(("X", "FP32", [4]), raw=[fp32(4)]), FIXED, 0


CORPUS = list(_corpus())


@pytest.mark.parametrize("message, signature, max_batch_size", [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS])
def test_answer_or_error_is_the_full_checks_own(message, signature, max_batch_size):
    assert outcome(decode_infer_request, message, signature, max_batch_size) == outcome(
        _decode_checked, message, signature, max_batch_size
    )


def test_the_common_requests_take_the_fast_path():
    taken = {
        "plain": (mlp_request(), MLP, 0),
        "pair": (request(("A", "FP32", [2, 2]), ("B", "INT64", [2, 1]), raw=[fp32(4), int64(2)]), PAIR, 0),
        "bytes": (request(("TEXT", "BYTES", [2]), raw=[texts(b"a", b"b")]), TEXT, 0),
        "entity-int64": (request(("ID", "INT64", [3]), raw=[int64(3)]), ENTITY, 64),
        "unbatched": (request(("X", "FP32", [3]), raw=[fp32(3)]), FIXED, 0),
    }
    missed = [name for name, (message, signature, limit) in taken.items() if _decode_plain(message, signature, limit) is None]
    assert missed == []


def test_the_fast_path_reads_raw_contents_without_a_copy():
    raw = fp32(4)
    decoded = _decode_plain(request(("INPUT", "FP32", [1, 4]), raw=[raw]), MLP, 0)
    assert decoded is not None
    array = decoded.inputs["INPUT"]
    assert array.dtype == np.dtype("<f4") and not array.flags.writeable
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes) and base == raw
    assert decoded.outputs == ("OUTPUT",) and decoded.rows == 1 and decoded.parameters == {}


def _error(message: pb.ModelInferRequest, signature: ModelSignature = MLP, max_batch_size: int = 0) -> str:
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(message, signature, max_batch_size)
    return err.value.message


# Each branch the fast path leaves to the full checks, with the words callers have always seen.


def test_parameters_are_decoded_and_reserved_ones_refused():
    message = _with(mlp_request(), lambda m: m.parameters["user_id"].CopyFrom(pb.InferParameter(string_param="u1")))
    assert _decode_plain(message, MLP, 0).parameters == {"user_id": "u1"}
    reserved = _with(mlp_request(), lambda m: m.parameters["variant"].CopyFrom(pb.InferParameter(string_param="v2")))
    assert _error(reserved) == "parameter 'variant' is reserved"


def test_typed_contents_beside_raw_contents_are_refused():
    message = _with(mlp_request(), lambda m: m.inputs[0].contents.fp32_contents.extend([0.0] * 4))
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "input 'INPUT': both raw_input_contents and typed contents are set"


def test_wrong_shape_is_refused():
    message = request(("INPUT", "FP32", [1, 3]), raw=[fp32(3)])
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "input 'INPUT': shape [1, 3] does not match the model's [-1, 4]"
    assert _error(request(("INPUT", "FP32", [-1, 4]), raw=[fp32(4)])) == "input 'INPUT': negative dimension in shape [-1, 4]"
    assert _error(request(("INPUT", "FP32", [0, 4]), raw=[b""])) == "input 'INPUT': batch dimension is 0"


def test_wrong_datatype_is_refused():
    message = request(("INPUT", "FP64", [1, 4]), raw=[bytes(32)])
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "input 'INPUT': datatype FP64, expected FP32"
    entity = request(("ID", "INT32", [3]), raw=[bytes(12)])
    assert _error(entity, ENTITY) == "input 'ID': datatype INT32, expected BYTES or INT64"


def test_wrong_byte_count_is_refused():
    message = request(("INPUT", "FP32", [2, 4]), raw=[fp32(7)])
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "input 'INPUT': 28 raw bytes, expected 32 for shape [2, 4] of FP32"
    bytes_message = request(("TEXT", "BYTES", [1]), raw=[texts(b"ab") + b"\0"])
    assert _decode_plain(bytes_message, TEXT, 0) is None
    assert _error(bytes_message, TEXT) == "input 'TEXT': BYTES tensor: 1 bytes left over after 1 elements"


def test_duplicate_input_is_refused():
    message = request(("A", "FP32", [2, 2]), ("A", "FP32", [2, 2]), raw=[fp32(4), fp32(4)])
    assert _decode_plain(message, PAIR, 0) is None
    assert _error(message, PAIR) == "input 'A' appears more than once"


def test_missing_and_unknown_inputs_are_refused():
    missing = request(("A", "FP32", [2, 2]), raw=[fp32(4)])
    assert _decode_plain(missing, PAIR, 0) is None
    assert _error(missing, PAIR) == "missing input(s) ['B']"
    unknown = request(("A", "FP32", [2, 2]), ("C", "INT64", [2, 1]), raw=[fp32(4), int64(2)])
    assert _decode_plain(unknown, PAIR, 0) is None
    assert _error(unknown, PAIR) == "unexpected input 'C'; the model takes ['A', 'B']"


def test_raw_contents_count_that_disagrees_is_refused():
    message = request(("INPUT", "FP32", [1, 4]), raw=[fp32(4), fp32(4)])
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "raw_input_contents has 2 entries for 1 inputs"


def test_tensor_parameters_are_left_to_the_full_checks():
    message = _with(mlp_request(), lambda m: m.inputs[0].parameters["shared_memory_region"].CopyFrom(pb.InferParameter(string_param="r")))
    assert _decode_plain(message, MLP, 0) is None
    assert _error(message) == "input 'INPUT': shared memory is not supported by the gateway"


def test_rows_over_a_limit_or_in_disagreement_are_refused():
    over = request(("A", "FP32", [5, 2]), ("B", "INT64", [5, 1]), raw=[fp32(10), int64(5)])
    assert _decode_plain(over, PAIR, 0) is None
    assert _error(over, PAIR) == "batch of 5 rows is over the model's max_batch_size 4"
    assert _error(mlp_request(3), MLP, 2) == "batch of 3 rows is over the model's max_batch_size 2"
    disagree = request(("A", "FP32", [2, 2]), ("B", "INT64", [3, 1]), raw=[fp32(4), int64(3)])
    assert _decode_plain(disagree, PAIR, 0) is None
    assert _error(disagree, PAIR) == "inputs disagree on the batch dimension: {'A': 2, 'B': 3}"


def test_requested_outputs_are_checked_on_the_fast_path_too():
    assert _error(_with(mlp_request(), lambda m: m.outputs.add(name="NOPE"))) == "unknown output 'NOPE'; the model has ['OUTPUT']"
    twice = _with(mlp_request(), lambda m: (m.outputs.add(name="OUTPUT"), m.outputs.add(name="OUTPUT")))
    assert _error(twice) == "output 'OUTPUT' requested twice"


def test_response_of_native_and_byte_swapped_arrays_is_the_same():
    native = np.array([[1.5, -2.0]], dtype="<f4")
    swapped = native.astype(">f4")
    fortran = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    response = encode_infer_response("m", "id", {"A": native, "B": swapped, "C": fortran, "D": np.array(True)}, "v1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("A", "FP32", [1, 2]),
        ("B", "FP32", [1, 2]),
        ("C", "INT64", [2, 3]),
        ("D", "BOOL", []),
    ]
    assert response.raw_output_contents[0] == response.raw_output_contents[1] == native.tobytes()
    assert response.raw_output_contents[2] == np.arange(6, dtype="<i8").tobytes()
    assert response.raw_output_contents[3] == b"\x01"
