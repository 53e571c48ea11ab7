"""Force which prepared convolution kernel (conv_kernels.py) the timed choice keeps, for the tests.

Shared by test_tf_conv_gemm.py, test_tf_conv_pad.py and test_tf_conv_dnnl.py (tests/graph is on sys.path)::

    from kernel_timing import handicap

    handicap(prepared, "gemm")  # the next trial calls keep `gemm`
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

# a kernel slowed by this much loses to one that is not, even when a loaded machine (tests run at
# nice 19) stalls some calls by several milliseconds: the fastest of three calls counts
HANDICAP = 0.05


def _slowed(kernel: Any) -> Any:
    def slow(x: Any, other: Any) -> Any:
        time.sleep(HANDICAP)
        return kernel(x, other)

    return slow


def handicap(prepared: Iterable[Any], keep: str) -> None:
    """Slow every kernel but ``keep`` down and restart the timing."""
    for p in prepared:
        for name in list(p.kernels):
            if name != keep:
                p.kernels[name] = _slowed(p.kernels[name])
        p.trials = {name: [] for name in p.kernels}
        p.kernel = p.chosen = None
