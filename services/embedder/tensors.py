"""numpy <-> ``trapline.common.v1.Tensor`` (dtype + shape + little-endian bytes; never pickles)."""

from __future__ import annotations

import numpy as np

from trapline.api.common.v1 import common_pb2
from trapline.runtime.errors import InvalidArgument

_DTYPES = {
    common_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.D_TYPE_UINT8: np.dtype("u1"),
    common_pb2.D_TYPE_INT64: np.dtype("<i8"),
}
_CODES = {v.newbyteorder("<") if v.kind != "u" else v: k for k, v in _DTYPES.items()}


def to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.kind != "u" else array.dtype
    code = _CODES.get(dtype)
    if code is None:
        raise TypeError(f"no wire dtype for {array.dtype}")
    return common_pb2.Tensor(dtype=code, shape=list(array.shape), data=np.ascontiguousarray(array, dtype).tobytes())


def from_tensor(t: common_pb2.Tensor, field: str, *, ndim: int | None = None) -> np.ndarray:
    """Decode a tensor; InvalidArgument (naming ``field``) when dtype, shape and byte count disagree."""
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidArgument("tensor dtype is not set or not supported", field=f"{field}.dtype")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape) or (ndim is not None and len(shape) != ndim):
        raise InvalidArgument(f"expected a {ndim}-d shape, got {list(shape)}", field=f"{field}.shape")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(t.data):
        raise InvalidArgument(f"shape {list(shape)} needs {expected} bytes of {dtype.name}, got {len(t.data)}",
                              field=f"{field}.data")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)
