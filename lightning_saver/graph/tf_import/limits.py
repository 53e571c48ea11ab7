"""A cap on the size of one tensor that importing or constant-folding a graph may create.

A crafted graph can ask for huge tensors from a few bytes: a ``Const`` of one value and shape
``[2**31]``, or ``Fill``/``Range``/``Tile``/``OneHot`` with huge sizes folded at import. Every such
size is checked against ``MAX_TENSOR_BYTES`` before anything is allocated, and refused with a
:class:`GraphImportError` naming the op and the size. The default, 4 GiB per tensor, is far above
the tensors of real models' graphs; set ``LIGHTNING_SAVER_MAX_TENSOR_BYTES`` (bytes) in the
environment, or assign ``limits.MAX_TENSOR_BYTES``, to change it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from lightning_saver.errors import GraphImportError

__all__ = ["MAX_TENSOR_BYTES", "check_size"]

MAX_TENSOR_BYTES = int(os.environ.get("LIGHTNING_SAVER_MAX_TENSOR_BYTES", 4 << 30))


def check_size(what: str, shape: Iterable[int], itemsize: int) -> None:
    """Raise when a tensor of ``shape`` (``itemsize`` bytes an element) is negative or over the cap."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise GraphImportError(f"{what}: negative dimension in shape {dims}")
    nbytes = math.prod(dims) * itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise GraphImportError(
            f"{what}: shape {dims[:8]}{'...' if len(dims) > 8 else ''} would allocate {nbytes} bytes, above "
            f"the cap of {MAX_TENSOR_BYTES} bytes per tensor (LIGHTNING_SAVER_MAX_TENSOR_BYTES raises it)"
        )
