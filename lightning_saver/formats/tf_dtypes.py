"""TensorFlow's DataType enum (tensorflow/core/framework/types.proto) <-> numpy and torch dtypes.

Shared by the TF V2 bundle reader/writer and the MetaGraph import and export.
bfloat16 and float8 map to ``ml_dtypes`` numpy types on the numpy side.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

# enum values from types.proto; a "_REF" type is the value + 100
DT_INVALID = 0
DT_FLOAT = 1
DT_DOUBLE = 2
DT_INT32 = 3
DT_UINT8 = 4
DT_INT16 = 5
DT_INT8 = 6
DT_STRING = 7
DT_COMPLEX64 = 8
DT_INT64 = 9
DT_BOOL = 10
DT_BFLOAT16 = 14
DT_UINT16 = 17
DT_COMPLEX128 = 18
DT_HALF = 19
DT_RESOURCE = 20
DT_VARIANT = 21
DT_UINT32 = 22
DT_UINT64 = 23
DT_FLOAT8_E5M2 = 24
DT_FLOAT8_E4M3FN = 25
REF_OFFSET = 100

TF_TO_NUMPY: dict[int, np.dtype] = {
    DT_FLOAT: np.dtype(np.float32),
    DT_DOUBLE: np.dtype(np.float64),
    DT_INT32: np.dtype(np.int32),
    DT_UINT8: np.dtype(np.uint8),
    DT_INT16: np.dtype(np.int16),
    DT_INT8: np.dtype(np.int8),
    DT_COMPLEX64: np.dtype(np.complex64),
    DT_INT64: np.dtype(np.int64),
    DT_BOOL: np.dtype(np.bool_),
    DT_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DT_UINT16: np.dtype(np.uint16),
    DT_COMPLEX128: np.dtype(np.complex128),
    DT_HALF: np.dtype(np.float16),
    DT_UINT32: np.dtype(np.uint32),
    DT_UINT64: np.dtype(np.uint64),
    DT_FLOAT8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    DT_FLOAT8_E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
}
NUMPY_TO_TF: dict[np.dtype, int] = {v: k for k, v in TF_TO_NUMPY.items()}

TF_TO_TORCH: dict[int, torch.dtype] = {
    DT_FLOAT: torch.float32,
    DT_DOUBLE: torch.float64,
    DT_INT32: torch.int32,
    DT_UINT8: torch.uint8,
    DT_INT16: torch.int16,
    DT_INT8: torch.int8,
    DT_COMPLEX64: torch.complex64,
    DT_INT64: torch.int64,
    DT_BOOL: torch.bool,
    DT_BFLOAT16: torch.bfloat16,
    DT_UINT16: torch.uint16,
    DT_COMPLEX128: torch.complex128,
    DT_HALF: torch.float16,
    DT_UINT32: torch.uint32,
    DT_UINT64: torch.uint64,
    DT_FLOAT8_E5M2: torch.float8_e5m2,
    DT_FLOAT8_E4M3FN: torch.float8_e4m3fn,
}
TORCH_TO_TF: dict[torch.dtype, int] = {v: k for k, v in TF_TO_TORCH.items()}

NAMES: dict[int, str] = {
    DT_FLOAT: "float32", DT_DOUBLE: "float64", DT_INT32: "int32", DT_UINT8: "uint8",
    DT_INT16: "int16", DT_INT8: "int8", DT_STRING: "string", DT_COMPLEX64: "complex64",
    DT_INT64: "int64", DT_BOOL: "bool", DT_BFLOAT16: "bfloat16", DT_UINT16: "uint16",
    DT_COMPLEX128: "complex128", DT_HALF: "float16", DT_RESOURCE: "resource",
    DT_VARIANT: "variant", DT_UINT32: "uint32", DT_UINT64: "uint64",
    DT_FLOAT8_E5M2: "float8_e5m2", DT_FLOAT8_E4M3FN: "float8_e4m3fn",
}


def base_dtype(tf_dtype: int) -> int:
    """Strip the reference bit: DT_FLOAT_REF (101) -> DT_FLOAT (1)."""
    return tf_dtype - REF_OFFSET if tf_dtype > REF_OFFSET else tf_dtype


def dtype_name(tf_dtype: int) -> str:
    """A readable name for error messages, e.g. ``float32`` or ``DataType 42``."""
    return NAMES.get(base_dtype(tf_dtype), f"DataType {tf_dtype}")


def to_torch(tf_dtype: int) -> torch.dtype:
    """The torch dtype for a TF DataType; ``ValueError`` naming the type when there is none."""
    try:
        return TF_TO_TORCH[base_dtype(tf_dtype)]
    except KeyError:
        raise ValueError(f"TensorFlow dtype {dtype_name(tf_dtype)} has no torch equivalent") from None


def from_torch(dtype: torch.dtype) -> int:
    """The TF DataType for a torch dtype; ``ValueError`` naming the dtype when there is none."""
    try:
        return TORCH_TO_TF[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no TensorFlow DataType") from None


def to_numpy(tf_dtype: int) -> np.dtype:
    """The numpy dtype for a TF DataType (bfloat16 -> ``ml_dtypes.bfloat16``)."""
    try:
        return TF_TO_NUMPY[base_dtype(tf_dtype)]
    except KeyError:
        raise ValueError(f"TensorFlow dtype {dtype_name(tf_dtype)} has no numpy equivalent") from None


def from_numpy(dtype: np.dtype) -> int:
    """The TF DataType for a numpy dtype; ``ValueError`` naming the dtype when there is none."""
    try:
        return NUMPY_TO_TF[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no TensorFlow DataType") from None
