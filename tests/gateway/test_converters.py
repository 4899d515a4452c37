"""Unit tests of the protobuf <-> numpy edge: BYTES encoding, FP16, endianness, typed contents."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from infergate.backends.base import ModelSignature, TensorSpec
from infergate.backends.datatypes import NUMPY_DTYPES, decode_bytes, encode_bytes, triton_datatype
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway.converters import (
    decode_infer_request,
    encode_infer_response,
    encode_model_config,
    encode_model_metadata,
    parameter_value,
)
from infergate.gateway.errors import InvalidArgument


def signature(*inputs: TensorSpec, batched: bool = True, max_batch_size: int = 0) -> ModelSignature:
    return ModelSignature(inputs=inputs, outputs=(TensorSpec("OUT", "FP32", (-1, 1)),), batched=batched, max_batch_size=max_batch_size)


def raw_request(name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


# -- BYTES -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items",
    [
        [b""],
        [b"", b"", b""],
        [b"plain", "héllo wörld".encode(), "日本語".encode(), "😀".encode()],
        [b"\x00\x01\xff binary \x00", b"a" * 70000],
    ],
    ids=["one-empty", "all-empty", "non-ascii", "binary-and-long"],
)
def test_bytes_encode_decode_round_trip(items):
    array = np.array(items, dtype=np.object_)
    encoded = encode_bytes(array)
    assert encoded == b"".join(struct.pack("<I", len(item)) + item for item in items)
    decoded = decode_bytes(encoded, len(items))
    assert decoded.dtype == np.object_
    assert list(decoded) == items


def test_bytes_encode_accepts_str_and_numpy_string_arrays():
    assert encode_bytes(np.array(["é", ""], dtype=np.object_)) == b"\x02\x00\x00\x00\xc3\xa9\x00\x00\x00\x00"
    assert encode_bytes(np.array(["ab", "c"])) == encode_bytes(np.array([b"ab", b"c"], dtype=np.object_))
    assert encode_bytes(np.array([b"ab", b"c"], dtype="S2")) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_bytes_encode_follows_c_order_of_a_2d_tensor():
    array = np.array([[b"a", b"bb"], [b"", b"ccc"]], dtype=np.object_)
    assert list(decode_bytes(encode_bytes(array), 4)) == [b"a", b"bb", b"", b"ccc"]


@pytest.mark.parametrize(
    "buffer, count, says",
    [
        (struct.pack("<I", 5) + b"abc", 1, "past the end"),
        (struct.pack("<I", 2**32 - 1), 1, "past the end"),
        (struct.pack("<I", 1) + b"a" + b"\x01\x00", 2, "4-byte length"),
        (struct.pack("<I", 1) + b"ab", 1, "left over"),
        (b"", 1, "4-byte length"),
        (struct.pack("<I", 0), 0, "left over"),
    ],
    ids=["length-past-end", "huge-length", "cut-length", "long", "empty", "extra-element"],
)
def test_bytes_decode_rejects_malformed_buffers(buffer, count, says):
    with pytest.raises(ValueError) as err:
        decode_bytes(buffer, count)
    assert says in str(err.value)


def test_bytes_request_decodes_to_object_array_of_bytes():
    items = [b"", "ü".encode(), b"x"]
    request = raw_request("TEXT", "BYTES", [3], encode_bytes(np.array(items, dtype=np.object_)))
    decoded = decode_infer_request(request, signature(TensorSpec("TEXT", "BYTES", (-1,))))
    assert decoded.inputs["TEXT"].dtype == np.object_
    assert list(decoded.inputs["TEXT"]) == items
    assert decoded.rows == 3


def test_bytes_with_an_absurd_count_is_refused_before_any_allocation():
    request = raw_request("TEXT", "BYTES", [2**62], struct.pack("<I", 1) + b"a")
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(request, signature(TensorSpec("TEXT", "BYTES", (-1,))))
    assert "cannot hold" in err.value.message


def test_bytes_response_is_length_prefixed():
    response = encode_infer_response("m", "id", {"ECHO": np.array([b"", "é".encode()], dtype=np.object_)}, "v1")
    assert response.outputs[0].datatype == "BYTES"
    assert response.raw_output_contents[0] == b"\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9"


# -- FP16 and typed contents -----------------------------------------------------------------


def test_fp16_travels_raw():
    values = np.array([[0.5, -2.0, 65504.0]], dtype="<f2")
    request = raw_request("H", "FP16", [1, 3], values.tobytes())
    decoded = decode_infer_request(request, signature(TensorSpec("H", "FP16", (-1, 3))))
    assert decoded.inputs["H"].dtype == np.float16
    np.testing.assert_array_equal(decoded.inputs["H"], values)


@pytest.mark.parametrize("field", ["fp32_contents", "fp64_contents", "int_contents"])
def test_fp16_in_typed_contents_is_refused(field):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="H", datatype="FP16", shape=[1, 3])
    getattr(tensor.contents, field).extend([1, 2, 3])
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(request, signature(TensorSpec("H", "FP16", (-1, 3))))
    assert "raw_input_contents" in err.value.message


def test_fp16_response_is_raw_little_endian():
    response = encode_infer_response("m", "", {"H": np.array([1.0, -0.5], dtype=">f2")}, "v1")
    assert response.outputs[0].datatype == "FP16"
    assert response.raw_output_contents[0] == np.array([1.0, -0.5], dtype="<f2").tobytes()


@pytest.mark.parametrize(
    "datatype, field, values",
    [
        ("BOOL", "bool_contents", [True, False, True]),
        ("INT8", "int_contents", [-128, 0, 127]),
        ("INT16", "int_contents", [-32768, 1, 32767]),
        ("INT32", "int_contents", [-(2**31), 2, 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), 3, 2**63 - 1]),
        ("UINT8", "uint_contents", [0, 1, 255]),
        ("UINT16", "uint_contents", [0, 1, 65535]),
        ("UINT32", "uint_contents", [0, 1, 2**32 - 1]),
        ("UINT64", "uint64_contents", [0, 1, 2**64 - 1]),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0]),
        ("FP64", "fp64_contents", [0.1, -1e300, 3.0]),
    ],
)
def test_typed_contents_of_every_type(datatype, field, values):
    request = pb.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="X", datatype=datatype, shape=[1, 3]).contents, field).extend(values)
    decoded = decode_infer_request(request, signature(TensorSpec("X", datatype, (-1, 3))))
    array = decoded.inputs["X"]
    assert array.dtype == NUMPY_DTYPES[datatype]
    assert array.shape == (1, 3)
    assert array.reshape(-1).tolist() == values  # every value above is exact in its type


@pytest.mark.parametrize(
    "datatype, field, value",
    [("INT8", "int_contents", 128), ("INT8", "int_contents", -129), ("UINT8", "uint_contents", 256), ("INT16", "int_contents", 40000)],
)
def test_typed_value_that_does_not_fit_is_refused(datatype, field, value):
    request = pb.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="X", datatype=datatype, shape=[1]).contents, field).append(value)
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(request, signature(TensorSpec("X", datatype, (-1,))))
    assert "does not fit" in err.value.message


# -- endianness and zero copy ----------------------------------------------------------------


def test_raw_input_is_read_little_endian_without_a_copy():
    raw = struct.pack("<4f", 1.5, -2.0, 3.25, 1e-3)
    decoded = decode_infer_request(raw_request("X", "FP32", [1, 4], raw), signature(TensorSpec("X", "FP32", (-1, 4))))
    array = decoded.inputs["X"]
    assert array.tolist() == [[1.5, -2.0, 3.25, pytest.approx(1e-3)]]
    assert array.dtype.byteorder in ("<", "=") and array.dtype.newbyteorder("<") == np.dtype("<f4")
    # A view over the message's bytes, not a copy: read-only, and its base chain ends in bytes.
    assert not array.flags.writeable
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes) and base == raw


@pytest.mark.parametrize("dtype", [">f4", ">i8", ">u2", ">f8", "<i4"])
def test_response_bytes_are_little_endian_whatever_the_array_order(dtype):
    array = np.array([[1, 2], [3, 250]], dtype=dtype)
    response = encode_infer_response("m", "", {"Y": array}, "v1")
    little = np.dtype(dtype).newbyteorder("<")
    assert response.outputs[0].datatype == triton_datatype(np.dtype(dtype))
    assert list(response.outputs[0].shape) == [2, 2]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], dtype=little).reshape(2, 2), array)


def test_response_of_a_non_contiguous_array():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    response = encode_infer_response("m", "", {"Y": array}, "v1")
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 2), array)


def test_response_carries_variant_id_and_only_raw_outputs():
    response = encode_infer_response("linear", "req-9", {"A": np.zeros((1, 2), np.float32), "B": np.ones(3, np.int64)}, "v2")
    assert response.model_name == "linear"
    assert response.id == "req-9"
    assert parameter_value(response.parameters["variant"]) == "v2"
    assert [o.name for o in response.outputs] == ["A", "B"]
    assert all(not o.HasField("contents") for o in response.outputs)
    assert len(response.raw_output_contents) == 2


# -- validation details that the e2e matrix does not reach -----------------------------------


def test_request_parameters_decode_to_python_values():
    request = raw_request("X", "FP32", [1, 1], struct.pack("<f", 1.0))
    request.parameters["s"].string_param = "a"
    request.parameters["i"].int64_param = -3
    request.parameters["u"].uint64_param = 2**64 - 1
    request.parameters["d"].double_param = 0.5
    request.parameters["b"].bool_param = True
    decoded = decode_infer_request(request, signature(TensorSpec("X", "FP32", (-1, 1))))
    assert decoded.parameters == {"s": "a", "i": -3, "u": 2**64 - 1, "d": 0.5, "b": True}


def test_batch_over_the_limit_is_refused():
    sig = signature(TensorSpec("X", "FP32", (-1, 1)), max_batch_size=4)
    decode_infer_request(raw_request("X", "FP32", [4, 1], bytes(16)), sig)
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(raw_request("X", "FP32", [5, 1], bytes(20)), sig)
    assert "max_batch_size" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        decode_infer_request(raw_request("X", "FP32", [3, 1], bytes(12)), signature(TensorSpec("X", "FP32", (-1, 1))), max_batch_size=2)
    assert "max_batch_size" in err.value.message


def test_unbatched_model_takes_any_leading_size_and_reports_no_rows():
    sig = signature(TensorSpec("X", "FP32", (3,)), batched=False)
    decoded = decode_infer_request(raw_request("X", "FP32", [3], bytes(12)), sig)
    assert decoded.rows == 0
    assert decoded.outputs == ("OUT",)


def test_model_metadata_and_config_use_the_gateway_name():
    sig = ModelSignature(
        inputs=(TensorSpec("X", "FP32", (-1, 16)),),
        outputs=(TensorSpec("Y", "BYTES", (-1,)),),
        batched=True,
        max_batch_size=8,
        platform="python",
    )
    metadata = encode_model_metadata("fraud", sig)
    assert metadata.name == "fraud"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("X", "FP32", [-1, 16])]
    config = encode_model_config("fraud", sig, max_batch_size=8, max_delay_us=500, preferred_batch_sizes=(4, 8)).config
    assert config.name == "fraud"
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [16]
    assert list(config.output[0].dims) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    unlimited = encode_model_config("fraud", sig, max_batch_size=0, max_delay_us=None).config
    assert unlimited.max_batch_size == 0
    assert list(unlimited.input[0].dims) == [-1, 16]
    assert not unlimited.HasField("dynamic_batching")
