"""CRC-32C of tensor memory, zero-copy, at hardware speed.

``google_crc32c.extend`` accepts only ``bytes``, which would force a copy of every tensor. Its wheel
ships the C library (SSE4.2 / ARM CRC instructions) with a plain ``crc32c_extend`` symbol, so we call
it through ctypes on the memory's address: no copy, and ctypes releases the GIL during the call.
Where that library cannot be found we fall back to ``google_crc32c`` on ``bytes`` copies, chunked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import torch

__all__ = ["ALGORITHM", "NATIVE", "extend_address", "tensor_crc32c", "format_crc", "parse_crc"]

ALGORITHM = "crc32c"
_FALLBACK_CHUNK = 16 << 20


def _load_native() -> Callable[[int, int, int], int] | None:
    here = Path(google_crc32c.__file__).resolve().parent
    candidates = sorted((here.parent / "google_crc32c.libs").glob("libcrc32c*.so*"))
    candidates += sorted(here.glob("libcrc32c*.so*"))
    system = ctypes.util.find_library("crc32c")
    for path in [str(p) for p in candidates] + ([system] if system else []):
        try:
            func = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        func.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        func.restype = ctypes.c_uint32
        return func  # type: ignore[no-any-return]
    return None


_NATIVE = _load_native()
# True when checksums run in C on the memory itself; False means the slow, copying fallback.
NATIVE = _NATIVE is not None and google_crc32c.implementation == "c"


def extend_address(crc: int, address: int, nbytes: int) -> int:
    """Extend ``crc`` with ``nbytes`` of memory starting at ``address`` (the caller keeps it alive)."""
    if nbytes <= 0:
        return crc
    if _NATIVE is not None:
        return int(_NATIVE(crc, address, nbytes))
    for start in range(0, nbytes, _FALLBACK_CHUNK):
        size = min(_FALLBACK_CHUNK, nbytes - start)
        crc = int(google_crc32c.extend(crc, ctypes.string_at(address + start, size)))
    return crc


def tensor_crc32c(tensor: torch.Tensor, crc: int = 0) -> int:
    """CRC-32C of a tensor's bytes in row-major order (copies only a non-contiguous or non-CPU tensor).

    Example:
        >>> format_crc(tensor_crc32c(torch.zeros(2, dtype=torch.uint8)))
        '1f9d9b1b'
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.detach().to("cpu").contiguous()
    return extend_address(crc, tensor.data_ptr(), tensor.numel() * tensor.element_size())


def format_crc(crc: int) -> str:
    """Fixed-width lower-case hex, so a header can be rewritten in place with the same length."""
    return f"{crc & 0xFFFFFFFF:08x}"


def parse_crc(text: str) -> int:
    """Inverse of :func:`format_crc`; ``ValueError`` on anything else."""
    if len(text) != 8:
        raise ValueError(f"expected 8 hex digits, found {text!r}")
    return int(text, 16)
