"""Types of the optional C++ extension ``_dnnl_conv.cpp`` (oneDNN's convolution, its primitive made once)."""

from collections.abc import Sequence
from typing import Any

class Conv:
    out_shape: tuple[int, int, int, int]
    impl: str
    def __init__(self, shape: Sequence[int], nhwc: bool, weight: Any, groups: int, bias: Any | None,
                 strides: Sequence[int], dilations: Sequence[int], pads_before: Sequence[int],
                 pads_after: Sequence[int], act: str, sum: bool) -> None: ...
    def run(self, src_address: int, dst_address: int, /) -> None: ...
