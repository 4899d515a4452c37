"""Conversion between the inference protobuf messages and the gateway's domain values.

Paired functions per message: ``decode_infer_request`` validates a ModelInferRequest against the
model's signature and yields numpy arrays (zero-copy ``np.frombuffer`` over raw contents);
``encode_infer_response`` builds the answer with ``raw_output_contents`` only, since tritonclient
decodes nothing else. Every problem with a request is an ``InvalidArgument`` raised before any
backend work, and nothing here allocates memory from a size the caller claims before checking it
against bytes the caller actually sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infergate.backends.base import ModelSignature, TensorSpec
from infergate.backends.datatypes import NUMPY_DTYPES, decode_bytes, raw_contents, triton_datatype
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference import model_config_pb2 as mc
from infergate.gateway.errors import InvalidArgument

RESERVED_PARAMETER_PREFIXES = ("triton_", "infergate_")
"""Request parameter names starting with these belong to Triton or the gateway, not callers."""
RESERVED_PARAMETERS = frozenset({"variant"})
"""``variant`` is set by the gateway on responses; a caller pins with x-infergate-variant."""
UNSUPPORTED_PARAMETERS = {
    "sequence_id": "sequence batching is not supported by the gateway",
    "sequence_start": "sequence batching is not supported by the gateway",
    "sequence_end": "sequence batching is not supported by the gateway",
}
UNSUPPORTED_TENSOR_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported by the gateway",
    "shared_memory_byte_size": "shared memory is not supported by the gateway",
    "shared_memory_offset": "shared memory is not supported by the gateway",
}

# Which typed-contents field carries each datatype (Triton's rules; FP16 travels raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS = frozenset(_CONTENTS_FIELD.values())

_LITTLE_ENDIAN = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}
"""The fixed-size datatypes, as raw contents are read (KServe v2 raw contents are little-endian)."""

_NATIVE_DATATYPES = {dtype: name for name, dtype in _LITTLE_ENDIAN.items() if dtype == dtype.newbyteorder("=")}
"""Fixed-size numpy dtypes whose bytes already are raw contents (native order is little-endian)."""

_CONFIG_DATATYPES = {name: mc.DataType.Value(f"TYPE_{'STRING' if name == 'BYTES' else name}") for name in NUMPY_DTYPES}


@dataclass(frozen=True)
class DecodedRequest:
    """A validated inference request."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    """Requested output names (all of the model's outputs when the caller asked for none)."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    rows: int = 0
    """Rows along the batch dimension (0 when the model is not batched)."""


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of an InferParameter oneof (None when unset)."""
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def decode_infer_request(
    request: pb.ModelInferRequest,
    signature: ModelSignature,
    max_batch_size: int = 0,
) -> DecodedRequest:
    """Validate ``request`` against ``signature`` and return its tensors; raise InvalidArgument.

    ``max_batch_size`` (when > 0) bounds the rows one request may carry.
    """
    decoded = _decode_plain(request, signature, max_batch_size)
    if decoded is None:
        decoded = _decode_checked(request, signature, max_batch_size)
    return decoded


def _decode_plain(request: pb.ModelInferRequest, signature: ModelSignature, max_batch_size: int) -> DecodedRequest | None:
    """The common request in fewer steps, or None when it is anything else.

    Common: every input once, in raw contents, with the spec's datatype (or one of its
    ``accepts`` pairs) and a shape that fits, no tensor parameters, no typed contents, rows that
    agree and fit the limit. Each condition here is stricter than its check in
    ``_decode_checked``, so a request this accepts, that one accepts too, with the same result; on
    anything else (an error included) this returns None and ``_decode_checked`` decides, with its
    own words. The errors raised here are the two that ``_decode_checked`` raises at the same
    point: the parameters' (its first check) and the requested outputs' (once every input passed).
    """
    parameters = _decode_parameters(request.parameters) if len(request.parameters) else {}
    tensors = request.inputs
    raws = request.raw_input_contents
    count = len(tensors)
    if count != len(signature.inputs) or len(raws) != count:
        return None
    specs = signature.input_specs
    batched = signature.batched
    limit = _row_limit(signature, max_batch_size) if batched else 0
    rows = 0
    inputs: dict[str, np.ndarray] = {}
    for index in range(count):
        tensor = tensors[index]
        name = tensor.name
        spec = specs.get(name)
        if spec is None or name in inputs or len(tensor.parameters) or tensor.HasField("contents"):
            return None
        datatype = tensor.datatype
        shape = tensor.shape[:]  # a list: half the cost of tuple() on a repeated field
        if not (datatype == spec.datatype and _fits_plainly(shape, spec.shape)):
            if not any(datatype == other and _fits_plainly(shape, want) for other, want in spec.accepts):
                return None
        if batched:
            if not shape or shape[0] == 0 or (rows and shape[0] != rows) or (limit and shape[0] > limit):
                return None
            rows = shape[0]
        raw = raws[index]
        dtype = _LITTLE_ENDIAN.get(datatype)
        if dtype is None:  # BYTES (or a datatype the gateway does not know)
            try:
                inputs[name] = _from_raw(name, datatype, shape, raw)
            except (InvalidArgument, KeyError):
                return None
            continue
        if len(raw) != _element_count(shape) * dtype.itemsize:
            return None
        inputs[name] = np.ndarray(shape, dtype, raw)  # a read-only view of the bytes, as np.frombuffer gives
    outputs = _requested_outputs(request, signature) if len(request.outputs) else signature.output_names
    return DecodedRequest(inputs, outputs, parameters, rows)


def _fits_plainly(shape: Sequence[int], want: tuple[int, ...]) -> bool:
    """``shape`` has ``want``'s rank, no negative dimension, and ``want``'s size where it has one."""
    if len(shape) != len(want):
        return False
    for got, expected in zip(shape, want):
        if got < 0 or (got != expected and expected != -1):
            return False
    return True


def _decode_checked(request: pb.ModelInferRequest, signature: ModelSignature, max_batch_size: int) -> DecodedRequest:
    """Every check, one after another, each with its own message (any request)."""
    parameters = _decode_parameters(request.parameters)
    use_raw = len(request.raw_input_contents) > 0
    if use_raw and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    seen: set[str] = set()
    inputs: dict[str, np.ndarray] = {}
    row_limit = _row_limit(signature, max_batch_size)
    for index, tensor in enumerate(request.inputs):
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        seen.add(tensor.name)
        spec = signature.input(tensor.name)
        if spec is None:
            expected = [s.name for s in signature.inputs]
            raise InvalidArgument(f"unexpected input {tensor.name!r}; the model takes {expected}")
        for name in tensor.parameters:
            if name in UNSUPPORTED_TENSOR_PARAMETERS:
                raise InvalidArgument(f"input {tensor.name!r}: {UNSUPPORTED_TENSOR_PARAMETERS[name]}")
        shape = _check_shape(tensor, spec, signature.batched)
        # Before any decoding: the declared batch dimension bounds the O(n) work (BYTES, typed contents).
        if row_limit and signature.batched and shape and shape[0] > row_limit:
            raise InvalidArgument(f"batch of {shape[0]} rows is over the model's max_batch_size {row_limit}")
        has_typed = bool(_typed_fields(tensor))
        if use_raw and has_typed:
            raise InvalidArgument(f"input {tensor.name!r}: both raw_input_contents and typed contents are set")
        if use_raw:
            inputs[tensor.name] = _from_raw(tensor.name, tensor.datatype, shape, request.raw_input_contents[index])
        else:
            inputs[tensor.name] = _from_contents(tensor, tensor.datatype, shape)
    missing = [spec.name for spec in signature.inputs if spec.name not in seen]
    if missing:
        raise InvalidArgument(f"missing input(s) {missing}")
    rows = _check_rows(inputs, signature, max_batch_size)
    outputs = _requested_outputs(request, signature)
    return DecodedRequest(inputs=inputs, outputs=outputs, parameters=parameters, rows=rows)


def _decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    decoded = {}
    for name, param in parameters.items():
        if name in RESERVED_PARAMETERS or name.startswith(RESERVED_PARAMETER_PREFIXES):
            raise InvalidArgument(f"parameter {name!r} is reserved")
        if name in UNSUPPORTED_PARAMETERS:
            raise InvalidArgument(f"parameter {name!r}: {UNSUPPORTED_PARAMETERS[name]}")
        decoded[name] = parameter_value(param)
    return decoded


def _shape_fits(shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(shape) == len(want) and all(w == -1 or got == w for got, w in zip(shape, want))


def _check_shape(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, batched: bool) -> tuple[int, ...]:
    allowed = ((spec.datatype, spec.shape),) + spec.accepts
    if tensor.datatype not in {datatype for datatype, _ in allowed}:
        expected = " or ".join(sorted({datatype for datatype, _ in allowed}))
        raise InvalidArgument(f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'}, expected {expected}")
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"input {tensor.name!r}: negative dimension in shape {list(shape)}")
    if not any(datatype == tensor.datatype and _shape_fits(shape, want) for datatype, want in allowed):
        raise InvalidArgument(f"input {tensor.name!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
    if batched and shape and shape[0] == 0:
        raise InvalidArgument(f"input {tensor.name!r}: batch dimension is 0")
    return shape


def _element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim  # Python ints: an absurd shape is a big number, never an allocation
    return count


def _from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    count = _element_count(shape)
    if datatype == "BYTES":
        if count > len(raw) // 4:
            raise InvalidArgument(f"input {name!r}: {len(raw)} raw bytes cannot hold {count} BYTES elements")
        try:
            return decode_bytes(raw, count).reshape(shape)
        except ValueError as exc:
            raise InvalidArgument(f"input {name!r}: {exc}") from exc
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: {len(raw)} raw bytes, expected {expected} for shape {list(shape)} of {datatype}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def _typed_fields(tensor: pb.ModelInferRequest.InferInputTensor) -> list[str]:
    """The typed-contents fields that hold values (repeated fields have no presence, only a length)."""
    if not tensor.HasField("contents"):
        return []
    # ListFields: only the fields that hold values, without a getattr per field of the message.
    return sorted(f.name for f, _ in tensor.contents.ListFields() if f.name in _ALL_CONTENTS_FIELDS)


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise InvalidArgument(f"input {tensor.name!r}: {datatype} must be sent in raw_input_contents")
    wrong = [f for f in _typed_fields(tensor) if f != field_name]
    if wrong:
        raise InvalidArgument(f"input {tensor.name!r}: {datatype} data belongs in {field_name}, not {wrong[0]}")
    values = getattr(tensor.contents, field_name)
    count = _element_count(shape)
    if len(values) != count:
        raise InvalidArgument(f"input {tensor.name!r}: {len(values)} values in {field_name}, expected {count} for shape {list(shape)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    # Range first: numpy 1.x silently wraps out-of-range ints (with a DeprecationWarning), 2.x raises.
    if dtype.kind in "iu" and values:
        info = np.iinfo(dtype)
        if min(values) < info.min or max(values) > info.max:
            raise InvalidArgument(f"input {tensor.name!r}: a value does not fit {datatype}")
    try:
        array = np.array(values, dtype=dtype)
    except OverflowError as exc:
        raise InvalidArgument(f"input {tensor.name!r}: a value does not fit {datatype}") from exc
    return array.reshape(shape)


def _row_limit(signature: ModelSignature, max_batch_size: int) -> int:
    """The most rows a request may carry: the smaller of the two limits that are set (0: none)."""
    own = signature.max_batch_size
    if max_batch_size > 0:
        return own if 0 < own < max_batch_size else max_batch_size
    return own if own > 0 else 0


def _check_rows(inputs: Mapping[str, np.ndarray], signature: ModelSignature, max_batch_size: int) -> int:
    if not signature.batched or not inputs:
        return 0
    rows = {name: array.shape[0] for name, array in inputs.items()}
    if len(set(rows.values())) != 1:
        raise InvalidArgument(f"inputs disagree on the batch dimension: {rows}")
    count = next(iter(rows.values()))
    limit = _row_limit(signature, max_batch_size)
    if limit and count > limit:
        raise InvalidArgument(f"batch of {count} rows is over the model's max_batch_size {limit}")
    return count


def _requested_outputs(request: pb.ModelInferRequest, signature: ModelSignature) -> tuple[str, ...]:
    if not request.outputs:
        return tuple(spec.name for spec in signature.outputs)
    names = []
    for output in request.outputs:
        if signature.output(output.name) is None:
            raise InvalidArgument(f"unknown output {output.name!r}; the model has {[s.name for s in signature.outputs]}")
        for name in output.parameters:
            if name in UNSUPPORTED_TENSOR_PARAMETERS:
                raise InvalidArgument(f"output {output.name!r}: {UNSUPPORTED_TENSOR_PARAMETERS[name]}")
            if name == "classification":
                raise InvalidArgument(f"output {output.name!r}: classification outputs are not supported")
        if output.name in names:
            raise InvalidArgument(f"output {output.name!r} requested twice")
        names.append(output.name)
    return tuple(names)


def encode_infer_response(
    model: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    variant: str,
    model_version: str = "1",
) -> pb.ModelInferResponse:
    """The response message: outputs in ``raw_output_contents``, ``parameters["variant"]`` set."""
    response = pb.ModelInferResponse()
    response.model_name = model  # attribute by attribute: cheaper than keyword arguments in upb
    response.model_version = model_version
    response.id = request_id
    response.parameters["variant"].string_param = variant
    tensors = response.outputs
    contents = response.raw_output_contents
    for name, array in outputs.items():
        datatype = _NATIVE_DATATYPES.get(array.dtype)
        if datatype is None:  # BYTES, a byte-swapped array, or one with no Triton datatype (ValueError)
            datatype = triton_datatype(array.dtype)
            raw = raw_contents(array, datatype)
        else:
            raw = array.tobytes()  # C order whatever the strides: what raw_contents gives, one call less
        tensor = tensors.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape[:] = array.shape
        contents.append(raw)
    return response


def encode_model_metadata(model: str, signature: ModelSignature) -> pb.ModelMetadataResponse:
    """The gateway's view of a model: the caller's model name, the signature it validates against."""
    return pb.ModelMetadataResponse(
        name=model,
        versions=["1"],
        platform=signature.platform or "infergate",
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in signature.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in signature.outputs],
    )


def encode_model_config(
    model: str,
    signature: ModelSignature,
    max_batch_size: int,
    max_delay_us: int | None,
    preferred_batch_sizes: Sequence[int] = (),
) -> pb.ModelConfigResponse:
    """A Triton-style ModelConfig of the gateway's view (dims exclude the batch dimension)."""
    config = mc.ModelConfig(name=model, platform=signature.platform or "infergate", backend="infergate")
    config.max_batch_size = max_batch_size if signature.batched else 0
    # Triton's rule: dims leave out the batch dimension only when max_batch_size > 0; a batched
    # model without a limit of its own is shown with its full shape (-1 first) instead.
    skip = 1 if config.max_batch_size > 0 else 0
    for spec in signature.inputs:
        config.input.add(name=spec.name, data_type=_CONFIG_DATATYPES[spec.datatype], dims=spec.shape[skip:])
    for spec in signature.outputs:
        config.output.add(name=spec.name, data_type=_CONFIG_DATATYPES[spec.datatype], dims=spec.shape[skip:])
    if max_delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = max_delay_us
        config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    return pb.ModelConfigResponse(config=config)
