"""Triton datatype names and their numpy equivalents, plus BYTES tensor encoding.

The whole gateway speaks Triton's datatype strings (``FP32``, ``INT64``, ``BYTES``...). BYTES
tensors are numpy object arrays of ``bytes``; on the wire each element is a 4-byte little-endian
length followed by the bytes (Triton's raw encoding).
"""

from __future__ import annotations

import struct

import numpy as np

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
"""Every datatype the gateway accepts; numpy arrays are little-endian on the wire."""

_FROM_NUMPY = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
_LENGTH = struct.Struct("<I")


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a Triton datatype; KeyError for an unknown one."""
    return NUMPY_DTYPES[datatype]


def triton_datatype(dtype: np.dtype) -> str:
    """The Triton datatype of a numpy dtype (unicode and bytes strings map to BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return _FROM_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"no Triton datatype for numpy {dtype}") from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (not BYTES)."""
    return NUMPY_DTYPES[datatype].itemsize


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element length-prefixed (4 bytes, little-endian)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def decode_bytes(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """Parse ``count`` length-prefixed elements that must use the whole buffer exactly.

    Raises ValueError when the buffer is short, long, or a length runs past its end.
    """
    view = memoryview(buffer)
    items = np.empty(count, dtype=np.object_)
    offset = 0
    size = len(view)
    for index in range(count):
        if offset + 4 > size:
            raise ValueError(f"BYTES element {index}: buffer ends before its 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > size:
            raise ValueError(f"BYTES element {index}: length {length} runs past the end of the buffer")
        items[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise ValueError(f"BYTES tensor: {size - offset} bytes left over after {count} elements")
    return items


def raw_contents(array: np.ndarray, datatype: str) -> bytes:
    """``array`` as KServe v2 raw contents: little-endian and contiguous, BYTES length-prefixed."""
    if datatype == "BYTES":
        return encode_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()
