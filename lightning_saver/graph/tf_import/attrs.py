"""Decode TensorFlow ``AttrValue`` and ``TensorProto`` messages into Python and torch values.

The decoded forms are the ones ``table.py`` promises converters:
i -> int, f -> float, b -> bool, s -> str, type -> torch.dtype, shape -> list[int] (-1 unknown)
or None (unknown rank), tensor -> torch.Tensor, list -> list of those, func -> str.
A ``type`` with no torch equivalent (string, resource, variant) decodes to its TF name, e.g.
``"resource"``, so that only a converter that really needs it fails. A string tensor decodes to a
numpy object array of ``bytes``: torch has no string dtype and only bookkeeping ops (Assert,
save/restore) carry them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.formats import tf_dtypes as dt
from lightning_saver.graph.tf_import.limits import check_size

# TensorProto's repeated field holding the values of each dtype when tensor_content is empty
_VALUE_FIELD = {
    dt.DT_FLOAT: "float_val",
    dt.DT_DOUBLE: "double_val",
    dt.DT_INT32: "int_val",
    dt.DT_INT16: "int_val",
    dt.DT_INT8: "int_val",
    dt.DT_UINT8: "int_val",
    dt.DT_UINT16: "int_val",
    dt.DT_INT64: "int64_val",
    dt.DT_UINT32: "uint32_val",
    dt.DT_UINT64: "uint64_val",
    dt.DT_BOOL: "bool_val",
    dt.DT_HALF: "half_val",
    dt.DT_BFLOAT16: "half_val",
    dt.DT_COMPLEX64: "scomplex_val",
    dt.DT_COMPLEX128: "dcomplex_val",
    dt.DT_STRING: "string_val",
}
# 16-bit floats travel as their bit patterns in an int32 field
_BITS16 = {dt.DT_HALF, dt.DT_BFLOAT16}


def decode_shape(shape: Any) -> list[int] | None:
    """A ``TensorShapeProto`` as a list of dims (-1 unknown), or None when the rank is unknown."""
    if shape.unknown_rank:
        return None
    return [int(d.size) for d in shape.dim]


def _to_torch(array: np.ndarray, tf_dtype: int) -> torch.Tensor:
    if tf_dtype == dt.DT_BFLOAT16:
        # torch.from_numpy does not know ml_dtypes.bfloat16; move the bits through int16
        # (copy, not ascontiguousarray, which turns a 0-d array into a 1-d one)
        bits = array.copy(order="C").view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _fill(values: np.ndarray, count: int, name: str) -> np.ndarray:
    if values.size == count:
        return values
    if values.size == 0:
        return np.zeros(count, dtype=values.dtype)
    if values.size > count:
        raise GraphImportError(f"tensor {name}: {values.size} values for a shape of {count} elements")
    # TF repeats the last value to fill the shape (a single value is the common case)
    return np.concatenate([values, np.full(count - values.size, values[-1], dtype=values.dtype)])


def _repeated_values(proto: Any, tf_dtype: int, np_dtype: np.dtype) -> np.ndarray:
    field = _VALUE_FIELD.get(tf_dtype)
    if field is None:
        raise GraphImportError(f"TensorProto of dtype {dt.dtype_name(tf_dtype)} is not supported")
    raw = list(getattr(proto, field))
    if tf_dtype in _BITS16:
        return np.array(raw, dtype=np.uint16).view(np_dtype)
    if tf_dtype in (dt.DT_COMPLEX64, dt.DT_COMPLEX128):
        pairs = np.array(raw, dtype=np.float64).reshape(-1, 2)
        return (pairs[:, 0] + 1j * pairs[:, 1]).astype(np_dtype)
    return np.array(raw).astype(np_dtype)


def _itemsize(tf_dtype: int) -> int:
    try:
        return dt.to_numpy(tf_dtype).itemsize
    except ValueError:
        return 8  # strings (one pointer each) and types decoded below with their own error


def decode_tensor(proto: Any, name: str = "<tensor>") -> torch.Tensor | np.ndarray:
    """A ``TensorProto`` as a torch tensor (a numpy ``bytes`` object array for DT_STRING).

    Reads ``tensor_content`` (raw little-endian bytes) or the repeated ``*_val`` field; fewer
    values than the shape holds are filled with the last one, as TensorFlow does.

    Args:
        proto: a ``tensor_pb2.TensorProto``.
        name: where the tensor comes from, for error messages.

    Returns:
        The tensor, shaped as the proto says.

    Raises:
        GraphImportError: an unsupported dtype or inconsistent value count.

    Example::

        decode_tensor(node.attr["value"].tensor, "y/Const")  # -> tensor(1, dtype=torch.int32)
    """
    shape = decode_shape(proto.tensor_shape) or []
    check_size(f"tensor {name}", shape, _itemsize(proto.dtype))  # one value may stand for a huge shape
    count = math.prod(shape)
    if proto.dtype == dt.DT_STRING:
        values = np.empty(len(proto.string_val), dtype=object)
        values[:] = list(proto.string_val)
        if values.size != count:
            values = np.array([values[-1] if values.size else b""] * count, dtype=object)
        return values.reshape(shape)
    try:
        np_dtype = dt.to_numpy(proto.dtype)
    except ValueError as err:
        raise GraphImportError(f"tensor {name}: {err}") from None
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype=np_dtype.newbyteorder("<"))
        if values.size != count:
            raise GraphImportError(
                f"tensor {name}: tensor_content holds {values.size} values, shape {shape} needs {count}"
            )
    else:
        values = _fill(_repeated_values(proto, proto.dtype, np_dtype), count, name)
    return _to_torch(values.astype(np_dtype, copy=False).reshape(shape), proto.dtype)


def decode_type(tf_dtype: int) -> torch.dtype | str:
    """A DataType enum as a torch dtype, or its TF name when torch has none (``"resource"``)."""
    try:
        return dt.to_torch(tf_dtype)
    except ValueError:
        return dt.dtype_name(tf_dtype)


def _decode_list(lst: Any) -> list[Any]:
    if lst.s:
        return [s.decode("utf-8", "replace") for s in lst.s]
    if lst.i:
        return [int(v) for v in lst.i]
    if lst.f:
        return [float(v) for v in lst.f]
    if lst.b:
        return [bool(v) for v in lst.b]
    if lst.type:
        return [decode_type(v) for v in lst.type]
    if lst.shape:
        return [decode_shape(v) for v in lst.shape]
    if lst.tensor:
        return [decode_tensor(v) for v in lst.tensor]
    if lst.func:
        return [f.name for f in lst.func]
    return []


def decode_attr(value: Any, name: str = "<attr>") -> Any:
    """One ``AttrValue`` as the Python value the converter contract names (see the module doc)."""
    kind = value.WhichOneof("value")
    if kind == "s":
        return value.s.decode("utf-8", "replace")
    if kind in ("i", "f", "b"):
        return getattr(value, kind)
    if kind == "type":
        return decode_type(value.type)
    if kind == "shape":
        return decode_shape(value.shape)
    if kind == "tensor":
        return decode_tensor(value.tensor, name)
    if kind == "list":
        return _decode_list(value.list)
    if kind == "func":
        return value.func.name
    if kind == "placeholder":
        return value.placeholder
    return None


def decode_attrs(node: Any) -> dict[str, Any]:
    """A NodeDef's attrs, decoded; private attrs (``_output_shapes``, ``_class``) are left out."""
    return {
        key: decode_attr(value, f"{node.name}.{key}")
        for key, value in node.attr.items()
        if not key.startswith("_")
    }
