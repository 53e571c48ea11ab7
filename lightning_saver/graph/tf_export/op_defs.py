"""The TensorFlow OpDefs the exporter may emit, in a compact signature notation.

Each row is ``(op, inputs, outputs, attrs[, flags])`` written the way TensorFlow's op registry
declares them: ``"x: T"`` (typed by attr ``T``), ``"values: N * T"`` (a list of ``N``),
``"ref: Ref(T)"``, ``"tensor_names: string"`` (a fixed type), ``"tensors: dtypes"`` (a type list);
attrs as ``"name: type [>= min] [= default]"``. The signatures are TensorFlow 2.x facts, checked
against the real registry in ``tests/graph/test_export_tf.py`` (``allowed_values`` are left out).

The table serves twice: ``stripped_op_list`` in the MetaGraph, and the builder, which encodes attrs by
their declared type, refuses attrs an op does not have, and drops attrs left at their default (an
older TensorFlow rejects attrs it does not know, and a default never needs to be written).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from typing import Any

from tensorboard.compat.proto import attr_value_pb2, op_def_pb2, tensor_shape_pb2, types_pb2

_ROWS: tuple[tuple[str, ...], ...] = (
    ("Placeholder", "", "output: dtype", "dtype: type; shape: shape = unknown"),
    ("PlaceholderWithDefault", "input: dtype", "output: dtype", "dtype: type; shape: shape"),
    ("Const", "", "output: dtype", "value: tensor; dtype: type"),
    ("Identity", "input: T", "output: T", "T: type"),
    ("NoOp", "", "", ""),
    ("VariableV2", "", "ref: Ref(dtype)",
     "shape: shape; dtype: type; container: string = ''; shared_name: string = ''", "is_stateful"),
    ("Assign", "ref: Ref(T), value: T", "output_ref: Ref(T)",
     "T: type; validate_shape: bool = true; use_locking: bool = true", "allows_uninitialized_input"),
    ("SaveV2", "prefix: string, tensor_names: string, shape_and_slices: string, tensors: dtypes", "",
     "dtypes: list(type) >= 1", "is_stateful"),
    ("RestoreV2", "prefix: string, tensor_names: string, shape_and_slices: string", "tensors: dtypes",
     "dtypes: list(type) >= 1", "is_stateful"),
    ("MatMul", "a: T, b: T", "product: T",
     "transpose_a: bool = false; transpose_b: bool = false; T: type; grad_a: bool = false; "
     "grad_b: bool = false"),
    ("BatchMatMulV2", "x: T, y: T", "output: T",
     "T: type; adj_x: bool = false; adj_y: bool = false; grad_x: bool = false; "
     "grad_y: bool = false"),
    ("AddV2", "x: T, y: T", "z: T", "T: type", "is_commutative is_aggregate"),
    ("Sub", "x: T, y: T", "z: T", "T: type"),
    ("Mul", "x: T, y: T", "z: T", "T: type", "is_commutative"),
    ("RealDiv", "x: T, y: T", "z: T", "T: type"),
    ("FloorDiv", "x: T, y: T", "z: T", "T: type"),
    ("FloorMod", "x: T, y: T", "z: T", "T: type"),
    ("Pow", "x: T, y: T", "z: T", "T: type"),
    ("Maximum", "x: T, y: T", "z: T", "T: type"),
    ("Minimum", "x: T, y: T", "z: T", "T: type"),
    ("Neg", "x: T", "y: T", "T: type"),
    ("Abs", "x: T", "y: T", "T: type"),
    ("Sqrt", "x: T", "y: T", "T: type"),
    ("Rsqrt", "x: T", "y: T", "T: type"),
    ("Exp", "x: T", "y: T", "T: type"),
    ("Log", "x: T", "y: T", "T: type"),
    ("Tanh", "x: T", "y: T", "T: type"),
    ("Sigmoid", "x: T", "y: T", "T: type"),
    ("Erf", "x: T", "y: T", "T: type"),
    ("Erfc", "x: T", "y: T", "T: type"),
    ("Relu", "features: T", "activations: T", "T: type"),
    ("Relu6", "features: T", "activations: T", "T: type"),
    ("Softmax", "logits: T", "softmax: T", "T: type"),
    ("LogSoftmax", "logits: T", "logsoftmax: T", "T: type"),
    ("Square", "x: T", "y: T", "T: type"),
    ("Reciprocal", "x: T", "y: T", "T: type"),
    ("Floor", "x: T", "y: T", "T: type"),
    ("Ceil", "x: T", "y: T", "T: type"),
    ("Sin", "x: T", "y: T", "T: type"),
    ("Cos", "x: T", "y: T", "T: type"),
    ("Sign", "x: T", "y: T", "T: type"),
    ("Round", "x: T", "y: T", "T: type"),
    ("Log1p", "x: T", "y: T", "T: type"),
    ("ReverseV2", "tensor: T, axis: Tidx", "output: T", "Tidx: type = int32; T: type"),
    ("TopKV2", "input: T, k: Tk", "values: T, indices: index_type",
     "sorted: bool = true; T: type; Tk: type = int32; index_type: type = int32"),
    ("Cumprod", "x: T, axis: Tidx", "out: T",
     "exclusive: bool = false; reverse: bool = false; T: type; Tidx: type = int32"),
    ("Expm1", "x: T", "y: T", "T: type"),
    ("ResizeNearestNeighbor", "images: T, size: int32", "resized_images: T",
     "T: type; align_corners: bool = false; half_pixel_centers: bool = false"),
    ("ResizeBilinear", "images: T, size: int32", "resized_images: float",
     "T: type; align_corners: bool = false; half_pixel_centers: bool = false"),
    ("Equal", "x: T, y: T", "z: bool", "T: type; incompatible_shape_error: bool = true", "is_commutative"),
    ("NotEqual", "x: T, y: T", "z: bool", "T: type; incompatible_shape_error: bool = true", "is_commutative"),
    ("Less", "x: T, y: T", "z: bool", "T: type"),
    ("LessEqual", "x: T, y: T", "z: bool", "T: type"),
    ("Greater", "x: T, y: T", "z: bool", "T: type"),
    ("GreaterEqual", "x: T, y: T", "z: bool", "T: type"),
    ("LogicalNot", "x: bool", "y: bool", ""),
    ("LogicalAnd", "x: bool, y: bool", "z: bool", "", "is_commutative"),
    ("LogicalOr", "x: bool, y: bool", "z: bool", "", "is_commutative"),
    ("SelectV2", "condition: bool, t: T, e: T", "output: T", "T: type"),
    ("Cast", "x: SrcT", "y: DstT", "SrcT: type; DstT: type; Truncate: bool = false"),
    ("Sum", "input: T, reduction_indices: Tidx", "output: T",
     "keep_dims: bool = false; T: type; Tidx: type = int32"),
    ("Mean", "input: T, reduction_indices: Tidx", "output: T",
     "keep_dims: bool = false; T: type; Tidx: type = int32"),
    ("Max", "input: T, reduction_indices: Tidx", "output: T",
     "keep_dims: bool = false; T: type; Tidx: type = int32"),
    ("Min", "input: T, reduction_indices: Tidx", "output: T",
     "keep_dims: bool = false; T: type; Tidx: type = int32"),
    ("Prod", "input: T, reduction_indices: Tidx", "output: T",
     "keep_dims: bool = false; T: type; Tidx: type = int32"),
    ("Any", "input: bool, reduction_indices: Tidx", "output: bool",
     "keep_dims: bool = false; Tidx: type = int32"),
    ("All", "input: bool, reduction_indices: Tidx", "output: bool",
     "keep_dims: bool = false; Tidx: type = int32"),
    ("ArgMax", "input: T, dimension: Tidx", "output: output_type",
     "T: type; Tidx: type = int32; output_type: type = int64"),
    ("ArgMin", "input: T, dimension: Tidx", "output: output_type",
     "T: type; Tidx: type = int32; output_type: type = int64"),
    ("Conv2D", "input: T, filter: T", "output: T",
     "T: type; strides: list(int); use_cudnn_on_gpu: bool = true; padding: string; "
     "explicit_paddings: list(int) = []; data_format: string = 'NHWC'; "
     "dilations: list(int) = [1, 1, 1, 1]"),
    ("DepthwiseConv2dNative", "input: T, filter: T", "output: T",
     "T: type; strides: list(int); padding: string; explicit_paddings: list(int) = []; "
     "data_format: string = 'NHWC'; dilations: list(int) = [1, 1, 1, 1]"),
    ("Conv2DBackpropInput", "input_sizes: int32, filter: T, out_backprop: T", "output: T",
     "T: type; strides: list(int); use_cudnn_on_gpu: bool = true; padding: string; "
     "explicit_paddings: list(int) = []; data_format: string = 'NHWC'; "
     "dilations: list(int) = [1, 1, 1, 1]"),
    ("MaxPool", "input: T", "output: T",
     "T: type = float; ksize: list(int) >= 4; strides: list(int) >= 4; padding: string; "
     "explicit_paddings: list(int) = []; data_format: string = 'NHWC'"),
    ("AvgPool", "value: T", "output: T",
     "ksize: list(int) >= 4; strides: list(int) >= 4; padding: string; "
     "data_format: string = 'NHWC'; T: type"),
    ("BiasAdd", "value: T, bias: T", "output: T", "T: type; data_format: string = 'NHWC'"),
    ("FusedBatchNormV3", "x: T, scale: U, offset: U, mean: U, variance: U",
     "y: T, batch_mean: U, batch_variance: U, reserve_space_1: U, reserve_space_2: U, "
     "reserve_space_3: U",
     "T: type; U: type; epsilon: float = 0.0001; exponential_avg_factor: float = 1; "
     "data_format: string = 'NHWC'; is_training: bool = true"),
    ("Reshape", "tensor: T, shape: Tshape", "output: T", "T: type; Tshape: type = int32"),
    ("Transpose", "x: T, perm: Tperm", "y: T", "T: type; Tperm: type = int32"),
    ("ConcatV2", "values: N * T, axis: Tidx", "output: T", "N: int >= 2; T: type; Tidx: type = int32"),
    ("Pack", "values: N * T", "output: T", "N: int >= 1; T: type; axis: int = 0"),
    ("SplitV", "value: T, size_splits: Tlen, split_dim: int32", "output: num_split * T",
     "num_split: int >= 1; T: type; Tlen: type = int64"),
    ("StridedSlice", "input: T, begin: Index, end: Index, strides: Index", "output: T",
     "T: type; Index: type; begin_mask: int = 0; end_mask: int = 0; ellipsis_mask: int = 0; "
     "new_axis_mask: int = 0; shrink_axis_mask: int = 0"),
    ("Slice", "input: T, begin: Index, size: Index", "output: T", "T: type; Index: type"),
    ("GatherV2", "params: Tparams, indices: Tindices, axis: Taxis", "output: Tparams",
     "batch_dims: int = 0; Tparams: type; Tindices: type; Taxis: type"),
    ("ExpandDims", "input: T, dim: Tdim", "output: T", "T: type; Tdim: type = int32"),
    ("Squeeze", "input: T", "output: T", "T: type; squeeze_dims: list(int) >= 0 = []"),
    ("BroadcastTo", "input: T, shape: Tidx", "output: T", "T: type; Tidx: type = int32"),
    ("Tile", "input: T, multiples: Tmultiples", "output: T", "T: type; Tmultiples: type = int32"),
    ("Fill", "dims: index_type, value: T", "output: T", "T: type; index_type: type = int32"),
    ("Shape", "input: T", "output: out_type", "T: type; out_type: type = int32"),
    ("Pad", "input: T, paddings: Tpaddings", "output: T", "T: type; Tpaddings: type = int32"),
    ("PadV2", "input: T, paddings: Tpaddings, constant_values: T", "output: T",
     "T: type; Tpaddings: type = int32"),
    ("ZerosLike", "x: T", "y: T", "T: type"),
    ("Range", "start: Tidx, limit: Tidx, delta: Tidx", "output: Tidx", "Tidx: type = int32"),
    ("Cumsum", "x: T, axis: Tidx", "out: T",
     "exclusive: bool = false; reverse: bool = false; T: type; Tidx: type = int32"),
    ("SquaredDifference", "x: T, y: T", "z: T", "T: type", "is_commutative"),
    ("BitwiseAnd", "x: T, y: T", "z: T", "T: type", "is_commutative"),
    ("BitwiseOr", "x: T, y: T", "z: T", "T: type", "is_commutative"),
    ("BitwiseXor", "x: T, y: T", "z: T", "T: type", "is_commutative"),
    ("Invert", "x: T", "y: T", "T: type"),
    ("TruncateMod", "x: T, y: T", "z: T", "T: type"),
    ("GatherNd", "params: Tparams, indices: Tindices", "output: Tparams",
     "Tparams: type; Tindices: type; bad_indices_policy: string = ''"),
    ("TensorScatterUpdate", "tensor: T, indices: Tindices, updates: T", "output: T",
     "T: type; Tindices: type; bad_indices_policy: string = ''"),
    ("TensorScatterAdd", "tensor: T, indices: Tindices, updates: T", "output: T",
     "T: type; Tindices: type; bad_indices_policy: string = ''"),
    ("UnsortedSegmentSum", "data: T, segment_ids: Tindices, num_segments: Tnumsegments", "output: T",
     "T: type; Tindices: type; Tnumsegments: type = int32"),
    ("UnsortedSegmentProd", "data: T, segment_ids: Tindices, num_segments: Tnumsegments", "output: T",
     "T: type; Tindices: type; Tnumsegments: type = int32"),
    ("UnsortedSegmentMax", "data: T, segment_ids: Tindices, num_segments: Tnumsegments", "output: T",
     "T: type; Tindices: type; Tnumsegments: type = int32"),
    ("UnsortedSegmentMin", "data: T, segment_ids: Tindices, num_segments: Tnumsegments", "output: T",
     "T: type; Tindices: type; Tnumsegments: type = int32"),
    ("Where", "input: T", "index: int64", "T: type = bool"),
    ("LowerBound", "sorted_inputs: T, values: T", "output: out_type", "T: type; out_type: type = int32"),
    ("UpperBound", "sorted_inputs: T, values: T", "output: out_type", "T: type; out_type: type = int32"),
    ("CumulativeLogsumexp", "x: T, axis: Tidx", "out: T",
     "exclusive: bool = false; reverse: bool = false; T: type; Tidx: type = int32"),
    ("Atan2", "y: T, x: T", "z: T", "T: type"),
    ("Tan", "x: T", "y: T", "T: type"),
    ("Asin", "x: T", "y: T", "T: type"),
    ("Acos", "x: T", "y: T", "T: type"),
    ("Atan", "x: T", "y: T", "T: type"),
    ("Sinh", "x: T", "y: T", "T: type"),
    ("Cosh", "x: T", "y: T", "T: type"),
    ("Asinh", "x: T", "y: T", "T: type"),
    ("Acosh", "x: T", "y: T", "T: type"),
    ("Atanh", "x: T", "y: T", "T: type"),
    ("IsNan", "x: T", "y: bool", "T: type"),
    ("IsInf", "x: T", "y: bool", "T: type"),
    ("IsFinite", "x: T", "y: bool", "T: type"),
)

_ATTR = re.compile(r"(\w+): ([\w()]+)(?: >= (\d+))?(?: = (.+))?")
_SPECS: dict[str, tuple[str, ...]] = {row[0]: row for row in _ROWS}


def _dtype(name: str) -> int:
    return int(types_pb2.DataType.Value("DT_" + name.upper()))


def _is_dtype_name(name: str) -> bool:
    return ("DT_" + name.upper()) in types_pb2.DataType.keys()


def _default_value(attr_type: str, text: str) -> attr_value_pb2.AttrValue:
    value = attr_value_pb2.AttrValue()
    if attr_type == "shape":
        value.shape.unknown_rank = True  # only "unknown" occurs as a shape default
    elif attr_type == "type":
        value.type = _dtype(text)  # type: ignore[assignment]
    elif attr_type.startswith("list("):
        value.list.SetInParent()
        items = ast.literal_eval(text)
        if attr_type == "list(int)":
            value.list.i.extend(items)
    else:
        fill_attr(value, attr_type, {"true": True, "false": False}.get(text, None) if attr_type == "bool"
                  else ast.literal_eval(text))
    return value


def _parse_arg(text: str, attr_types: dict[str, str]) -> op_def_pb2.OpDef.ArgDef:
    name, spec = (part.strip() for part in text.split(":"))
    arg = op_def_pb2.OpDef.ArgDef(name=name)
    if spec.startswith("Ref("):
        arg.is_ref = True
        spec = spec[4:-1]
    if "*" in spec:
        arg.number_attr, spec = (part.strip() for part in spec.split("*"))
    if _is_dtype_name(spec) and spec not in attr_types:
        arg.type = _dtype(spec)  # type: ignore[assignment]
    elif attr_types.get(spec) == "list(type)":
        arg.type_list_attr = spec
    else:
        arg.type_attr = spec
    return arg


@cache
def op_def(op: str) -> op_def_pb2.OpDef:
    """The OpDef of ``op``; ``KeyError`` naming the op when the exporter does not know it."""
    try:
        row = _SPECS[op]
    except KeyError:
        raise KeyError(f"TensorFlow export: op {op!r} has no OpDef in tf_export/op_defs.py") from None
    _, inputs, outputs, attrs = row[:4]
    result = op_def_pb2.OpDef(name=op)
    attr_types: dict[str, str] = {}
    for text in filter(None, (a.strip() for a in attrs.split(";"))):
        match = _ATTR.fullmatch(text)
        if match is None:
            raise ValueError(f"TensorFlow export: bad attr spec {text!r} for op {op!r}")
        name, attr_type, minimum, default = match.groups()
        attr = result.attr.add(name=name)
        attr.type = attr_type
        attr_types[name] = attr_type
        if minimum:
            attr.has_minimum = True
            attr.minimum = int(minimum)
        if default:
            attr.default_value.CopyFrom(_default_value(attr_type, default))
    for text in filter(None, (a.strip() for a in inputs.split(","))):
        result.input_arg.append(_parse_arg(text, attr_types))
    for text in filter(None, (a.strip() for a in outputs.split(","))):
        result.output_arg.append(_parse_arg(text, attr_types))
    for flag in (row[4].split() if len(row) > 4 else ()):
        setattr(result, flag, True)
    return result


def known_ops() -> list[str]:
    """Every op the exporter may emit."""
    return list(_SPECS)


def fill_attr(value: attr_value_pb2.AttrValue, attr_type: str, python_value: Any) -> None:
    """Write ``python_value`` into ``value`` as the OpDef type ``attr_type`` says."""
    if attr_type == "bool":
        value.b = bool(python_value)
    elif attr_type == "int":
        value.i = int(python_value)
    elif attr_type == "float":
        value.f = float(python_value)
    elif attr_type == "string":
        value.s = python_value.encode() if isinstance(python_value, str) else bytes(python_value)
    elif attr_type == "type":
        value.type = int(python_value)  # type: ignore[assignment]
    elif attr_type == "list(int)":
        value.list.SetInParent()
        value.list.i.extend(int(v) for v in python_value)
    elif attr_type == "list(type)":
        value.list.SetInParent()
        value.list.type.extend(int(v) for v in python_value)
    elif attr_type == "shape":
        value.shape.CopyFrom(shape_proto(python_value))
    elif attr_type == "tensor":
        value.tensor.CopyFrom(python_value)
    else:
        raise TypeError(f"TensorFlow export: attr type {attr_type!r} is not supported")


def shape_proto(shape: Any) -> tensor_shape_pb2.TensorShapeProto:
    """A TensorShapeProto from a tuple (``None`` = unknown dim) or ``None`` (unknown rank)."""
    proto = tensor_shape_pb2.TensorShapeProto()
    if shape is None:
        proto.unknown_rank = True
    else:
        for dim in shape:
            proto.dim.add(size=-1 if dim is None else int(dim))
    return proto
