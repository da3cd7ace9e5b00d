"""Tensors on the wire: raw little-endian bytes + dtype + shape, no pickles.

MLX arrays expose the buffer protocol, so encoding is one copy into the
protobuf bytes field and decoding is one copy out of it. Protobuf copies a
message passed as a field value, and (upb) copies a bytes field on every
read: fill the Tensor in place (`out=`) and read `data` once.
"""

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from clusterd.wire import clusterd_pb2 as pb

# bfloat16 has no numpy dtype: it travels as its 2-byte pattern.
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_MLX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_ELEMENTS = 1 << 31


class TensorError(ValueError):
    """A tensor message that cannot be decoded; the text says why."""


def dtype_name(dtype: mx.Dtype) -> str:
    for name, d in _MLX.items():
        if d == dtype:
            return name
    raise TensorError(f"dtype {dtype} cannot travel on the wire (use one of {sorted(_MLX)})")


def to_wire(a: mx.array, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    """`out`: a Tensor field to fill in place, e.g. `act.hidden` (passing a
    new Tensor to Activation(hidden=...) would copy the data once more)."""
    t = describe(a, out)
    t.data = bytes(raw_view(a))
    return t


def describe(a: mx.array, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    """dtype and shape only: a link frame carries the data beside the message."""
    t = pb.Tensor() if out is None else out
    t.dtype = dtype_name(a.dtype)
    t.shape[:] = list(a.shape)
    return t


def raw_view(a: mx.array) -> memoryview:
    """The array's bytes without a copy (bfloat16 as its 2-byte pattern)."""
    return memoryview(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).cast("B")


def check(t: pb.Tensor, raw: Optional[bytes] = None) -> tuple[int, ...]:
    """Validate a tensor message without decoding it; returns its shape.
    `raw`: the data when it travelled beside the message (a link frame)."""
    return _check(t, len(t.data) if raw is None else len(raw))


def _check(t: pb.Tensor, nbytes: int) -> tuple[int, ...]:
    if t.dtype not in _NUMPY:
        raise TensorError(f"unknown tensor dtype {t.dtype!r} (expected one of {sorted(_NUMPY)})")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise TensorError(f"tensor shape {list(shape)} is too large")
    itemsize = np.dtype(_NUMPY[t.dtype]).itemsize
    if nbytes != count * itemsize:
        raise TensorError(
            f"tensor data is {nbytes} bytes but shape {list(shape)} of {t.dtype} "
            f"needs {count * itemsize}"
        )
    return shape


def from_wire(t: pb.Tensor, raw: Optional[bytes] = None) -> mx.array:
    data = t.data if raw is None else raw  # one read: each one is a copy
    shape = _check(t, len(data))
    # frombuffer is a view; mx.array makes the one copy MLX needs anyway.
    arr = mx.array(np.frombuffer(data, dtype=_NUMPY[t.dtype]).reshape(shape))
    return arr.view(mx.bfloat16) if t.dtype == "bfloat16" else arr
