"""TensorFlow import converters: ops_list (``TensorList*`` and the ``TensorArrayV3`` family).

Both are lists of tensors that loops fill one step at a time. Here a list is an immutable
``TensorList`` value (a tuple of tensors, ``None`` where nothing was written yet), so each op
returns a new list and autograd follows every element. TF2 threads the list itself through the
graph (a ``variant`` tensor). A TF1 ``TensorArrayV3`` has a resource handle and a ``flow`` float
that every write returns and every read takes; the flow is what orders the ops, so here the flow
*is* the list and the handle only carries the dtype and the element shape. ``Optional*`` values
(``tf.gradients`` makes ``If`` branches return their intermediates as optionals) are ``Optional``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.table import TF_OPS

# ops producing lists: never folded into constants (a module holds tensors, not lists)
LIST_OPS = frozenset({
    "TensorListReserve", "EmptyTensorList", "TensorListFromTensor", "TensorListSetItem",
    "TensorListPushBack", "TensorListPopBack", "TensorListScatterIntoExistingList",
    "TensorArrayV3", "TensorArrayWriteV3", "TensorArrayScatterV3", "TensorArraySplitV3",
    "OptionalFromValue", "OptionalNone",
})


@dataclass(frozen=True)
class TensorList:
    """A TF tensor list: its items (``None`` = never written), element dtype and shape."""

    items: tuple[Any, ...]
    element_dtype: Any = None
    element_shape: tuple[int, ...] | None = None  # -1 for unknown dims

    def set(self, index: int, value: torch.Tensor, grow: bool = False) -> TensorList:
        items = list(self.items)
        if index >= len(items) and grow:
            items.extend([None] * (index + 1 - len(items)))
        if not 0 <= index < len(items):
            raise GraphImportError(f"tensor list index {index} is out of range for a list of {len(items)}")
        items[index] = value
        return TensorList(tuple(items), self.element_dtype, self.element_shape)

    def get(self, index: int, shape: Any = None) -> torch.Tensor:
        if not 0 <= index < len(self.items):
            raise GraphImportError(
                f"tensor list index {index} is out of range for a list of {len(self.items)}")
        item = self.items[index]
        return self._zeros(shape) if item is None else item

    def _zeros(self, shape: Any = None) -> torch.Tensor:
        known = next((t for t in self.items if t is not None), None)
        if known is not None:
            return torch.zeros_like(known)
        dims = _shape(shape) or self.element_shape
        if dims is None or any(d < 0 for d in dims):
            raise GraphImportError(
                f"reading an unwritten element of a tensor list whose element shape {dims} is not known"
            )
        dtype = self.element_dtype if isinstance(self.element_dtype, torch.dtype) else torch.float32
        return torch.zeros(dims, dtype=dtype)

    def stack(self, indices: Any = None, shape: Any = None) -> torch.Tensor:
        chosen = range(len(self.items)) if indices is None else [int(i) for i in indices]
        if not chosen:
            dims = _shape(shape) or self.element_shape or ()
            dtype = self.element_dtype if isinstance(self.element_dtype, torch.dtype) else torch.float32
            return torch.zeros((0, *[max(d, 0) for d in dims]), dtype=dtype)
        return torch.stack([self.get(i, shape) for i in chosen])


@dataclass(frozen=True)
class TensorArrayHandle:
    """What a TF1 TensorArray's resource handle carries here: its dtype and element shape."""

    dtype: Any
    element_shape: tuple[int, ...] | None
    dynamic_size: bool = False


def _shape(value: Any) -> tuple[int, ...] | None:
    """An element shape from a shape tensor or attr; -1 (or a -1 scalar) means unknown."""
    if value is None:
        return None
    dims = value.tolist() if isinstance(value, torch.Tensor) else value
    if isinstance(dims, int):
        return None
    return tuple(int(d) for d in dims)


def _list(handle: Any, op: str) -> TensorList:
    if not isinstance(handle, TensorList):
        raise GraphImportError(f"{op} expects a tensor list, got {type(handle).__name__}")
    return handle


# ---- TF2 TensorList -----------------------------------------------------------------------------
@TF_OPS.register("TensorListReserve")
def TensorListReserve(element_shape: torch.Tensor, num_elements: torch.Tensor, *, element_dtype: Any = None,
                      shape_type: Any = None) -> TensorList:
    return TensorList((None,) * int(num_elements), element_dtype, _shape(element_shape))


@TF_OPS.register("EmptyTensorList")
def EmptyTensorList(element_shape: torch.Tensor, max_num_elements: torch.Tensor, *, element_dtype: Any = None,
                    shape_type: Any = None) -> TensorList:
    return TensorList((), element_dtype, _shape(element_shape))


@TF_OPS.register("TensorListFromTensor")
def TensorListFromTensor(tensor: torch.Tensor, element_shape: torch.Tensor, *, element_dtype: Any = None,
                         shape_type: Any = None) -> TensorList:
    return TensorList(tuple(tensor.unbind(0)), tensor.dtype, tuple(tensor.shape[1:]))


@TF_OPS.register("TensorListGetItem")
def TensorListGetItem(input_handle: TensorList, index: torch.Tensor, element_shape: torch.Tensor, *,
                      element_dtype: Any = None) -> torch.Tensor:
    return _list(input_handle, "TensorListGetItem").get(int(index), element_shape)


@TF_OPS.register("TensorListSetItem")
def TensorListSetItem(input_handle: TensorList, index: torch.Tensor, item: torch.Tensor, *,
                      element_dtype: Any = None, resize_if_index_out_of_bounds: bool = False) -> TensorList:
    return _list(input_handle, "TensorListSetItem").set(int(index), item, resize_if_index_out_of_bounds)


@TF_OPS.register("TensorListStack")
def TensorListStack(input_handle: TensorList, element_shape: torch.Tensor, *, element_dtype: Any = None,
                    num_elements: int = -1) -> torch.Tensor:
    return _list(input_handle, "TensorListStack").stack(shape=element_shape)


@TF_OPS.register("TensorListGather")
def TensorListGather(input_handle: TensorList, indices: torch.Tensor, element_shape: torch.Tensor, *,
                     element_dtype: Any = None) -> torch.Tensor:
    return _list(input_handle, "TensorListGather").stack(indices.reshape(-1).tolist(), element_shape)


@TF_OPS.register("TensorListLength")
def TensorListLength(input_handle: TensorList) -> torch.Tensor:
    return torch.tensor(len(_list(input_handle, "TensorListLength").items), dtype=torch.int32)


@TF_OPS.register("TensorListElementShape")
def TensorListElementShape(input_handle: TensorList, *, shape_type: Any = torch.int32) -> torch.Tensor:
    items = _list(input_handle, "TensorListElementShape")
    known = next((t for t in items.items if t is not None), None)
    dims = tuple(known.shape) if known is not None else items.element_shape
    if dims is None:
        return torch.tensor(-1, dtype=shape_type)
    return torch.tensor(dims, dtype=shape_type)


@TF_OPS.register("TensorListPushBack")
def TensorListPushBack(input_handle: TensorList, tensor: torch.Tensor, *,
                       element_dtype: Any = None) -> TensorList:
    items = _list(input_handle, "TensorListPushBack")
    return TensorList((*items.items, tensor), items.element_dtype, items.element_shape)


@TF_OPS.register("TensorListPopBack")
def TensorListPopBack(input_handle: TensorList, element_shape: torch.Tensor, *,
                      element_dtype: Any = None) -> tuple[TensorList, torch.Tensor]:
    items = _list(input_handle, "TensorListPopBack")
    if not items.items:
        raise GraphImportError("TensorListPopBack on an empty tensor list")
    last = items.get(len(items.items) - 1, element_shape)
    return TensorList(items.items[:-1], items.element_dtype, items.element_shape), last


@TF_OPS.register("TensorListScatterIntoExistingList")
def TensorListScatterIntoExistingList(input_handle: TensorList, tensor: torch.Tensor,
                                      indices: torch.Tensor, *, element_dtype: Any = None) -> TensorList:
    out = _list(input_handle, "TensorListScatterIntoExistingList")
    for row, index in zip(tensor.unbind(0), indices.reshape(-1).tolist(), strict=True):
        out = out.set(int(index), row, grow=True)
    return out


# ---- TF1 TensorArrayV3: the flow is the list ----------------------------------------------------
@TF_OPS.register("TensorArrayV3")
def TensorArrayV3(size: torch.Tensor, *, dtype: Any = None, element_shape: Any = None,
                  dynamic_size: bool = False, clear_after_read: bool = True,
                  identical_element_shapes: bool = False,
                  tensor_array_name: str = "") -> tuple[TensorArrayHandle, TensorList]:
    shape = None if element_shape is None else tuple(element_shape)
    return TensorArrayHandle(dtype, shape, dynamic_size), TensorList((None,) * int(size), dtype, shape)


@TF_OPS.register("TensorArrayWriteV3")
def TensorArrayWriteV3(handle: TensorArrayHandle, index: torch.Tensor, value: torch.Tensor,
                       flow_in: TensorList) -> TensorList:
    return _list(flow_in, "TensorArrayWriteV3").set(int(index), value, grow=handle.dynamic_size)


@TF_OPS.register("TensorArrayReadV3")
def TensorArrayReadV3(handle: TensorArrayHandle, index: torch.Tensor, flow_in: TensorList, *,
                      dtype: Any = None) -> torch.Tensor:
    return _list(flow_in, "TensorArrayReadV3").get(int(index), handle.element_shape)


@TF_OPS.register("TensorArrayScatterV3")
def TensorArrayScatterV3(handle: TensorArrayHandle, indices: torch.Tensor, value: torch.Tensor,
                         flow_in: TensorList) -> TensorList:
    return TensorListScatterIntoExistingList(_list(flow_in, "TensorArrayScatterV3"), value, indices)


@TF_OPS.register("TensorArrayGatherV3")
def TensorArrayGatherV3(handle: TensorArrayHandle, indices: torch.Tensor, flow_in: TensorList, *,
                        dtype: Any = None, element_shape: Any = None) -> torch.Tensor:
    return _list(flow_in, "TensorArrayGatherV3").stack(indices.reshape(-1).tolist(), element_shape)


@TF_OPS.register("TensorArraySizeV3")
def TensorArraySizeV3(handle: TensorArrayHandle, flow_in: TensorList) -> torch.Tensor:
    return torch.tensor(len(_list(flow_in, "TensorArraySizeV3").items), dtype=torch.int32)


@TF_OPS.register("TensorArrayConcatV3")
def TensorArrayConcatV3(handle: TensorArrayHandle, flow_in: TensorList, *, dtype: Any = None,
                        element_shape_except0: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    items = [_list(flow_in, "TensorArrayConcatV3").get(i) for i in range(len(flow_in.items))]
    lengths = torch.tensor([t.shape[0] for t in items], dtype=torch.int64)
    return torch.cat(items) if items else torch.zeros(0), lengths


@TF_OPS.register("TensorArraySplitV3")
def TensorArraySplitV3(handle: TensorArrayHandle, value: torch.Tensor, lengths: torch.Tensor,
                       flow_in: TensorList) -> TensorList:
    out = _list(flow_in, "TensorArraySplitV3")
    for k, piece in enumerate(torch.split(value, [int(n) for n in lengths.tolist()])):
        out = out.set(k, piece, grow=True)
    return out


@TF_OPS.register("TensorArrayCloseV3")
def TensorArrayCloseV3(handle: TensorArrayHandle) -> None:
    return None


# ---- Optional: a value or nothing ---------------------------------------------------------------
@dataclass(frozen=True)
class Optional:
    """A TF optional: ``components`` (a tuple of tensors) or None."""

    components: tuple[Any, ...] | None


@TF_OPS.register("OptionalFromValue")
def OptionalFromValue(*components: Any, Toutput_types: Any = None) -> Optional:
    return Optional(tuple(components))


@TF_OPS.register("OptionalNone")
def OptionalNone() -> Optional:
    return Optional(None)


@TF_OPS.register("OptionalHasValue")
def OptionalHasValue(optional: Optional) -> torch.Tensor:
    return torch.tensor(optional.components is not None)


@TF_OPS.register("OptionalGetValue")
def OptionalGetValue(optional: Optional, *, output_types: Any = None, output_shapes: Any = None) -> Any:
    if optional.components is None:
        raise GraphImportError("OptionalGetValue on an optional without a value")
    return optional.components if len(optional.components) != 1 else optional.components[0]
