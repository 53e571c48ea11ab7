"""CRC-32C of tensor memory, zero-copy, at hardware speed.

``google_crc32c.extend`` accepts only ``bytes``, which would force a copy of every tensor. Its wheel
ships the C library (SSE4.2 / ARM CRC instructions) with a plain ``crc32c_extend`` symbol, so we call
it through ctypes on the memory's address: no copy, and ctypes releases the GIL during the call.
Where that library cannot be found we fall back to ``google_crc32c`` on ``bytes`` copies, chunked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import lru_cache, partial
from pathlib import Path

import google_crc32c
import torch

__all__ = [
    "ALGORITHM", "NATIVE", "extend_address", "tensor_crc32c", "combine", "format_crc", "parse_crc",
    "CrcPipeline", "run_beside", "keep_in_this_thread", "kept_in_this_thread",
]  # fmt: skip

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
if not NATIVE:
    logging.getLogger("lightning_saver").warning(
        "google-crc32c's C library was not found (implementation %r): checksums fall back to a slow "
        "copying path; reinstall google-crc32c from a binary wheel",
        google_crc32c.implementation,
    )


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
        'f16177d2'
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.detach().to("cpu").contiguous()
    return extend_address(crc, tensor.data_ptr(), tensor.numel() * tensor.element_size())


_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected


def _multiply(a: int, b: int) -> int:
    """Product of two polynomials modulo the CRC polynomial (bit-reflected: bit 31 is x^0)."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _squarings() -> list[int]:
    powers = [1 << 30]  # x^1; entry k is x^(2^k)
    for _ in range(63):
        powers.append(_multiply(powers[-1], powers[-1]))
    return powers


_X_POW_2K = _squarings()


@lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending ``nbytes`` bytes does to a CRC register."""
    shift, k = 1 << 31, 3  # x^0; bit i of nbytes stands for x^(8 * 2^i) = x^(2^(i+3))
    while nbytes:
        if nbytes & 1:
            shift = _multiply(_X_POW_2K[k], shift)
        nbytes >>= 1
        k += 1
    return shift


def combine(crc_a: int, crc_b: int, nbytes_b: int) -> int:
    """CRC-32C of ``A + B`` from ``crc_a``, ``crc_b`` and ``len(B)``, without the bytes.

    Appending ``n`` bytes multiplies A's register by ``x^(8n)`` modulo the polynomial (the pre- and
    post-inversions of the two CRCs cancel). In Python this costs ~0.2 ms for a new length and
    ~10 us for a recent one (cached), so threads can checksum parts of one tensor and join them.

    Example:
        >>> combine(google_crc32c.value(b"ab"), google_crc32c.value(b"cd"), 2) == google_crc32c.value(b"abcd")
        True
    """
    return _multiply(_shift(nbytes_b), crc_a & 0xFFFFFFFF) ^ (crc_b & 0xFFFFFFFF)


def format_crc(crc: int) -> str:
    """Fixed-width lower-case hex, so a header can be rewritten in place with the same length."""
    return f"{crc & 0xFFFFFFFF:08x}"


def parse_crc(text: str) -> int:
    """Inverse of :func:`format_crc`; ``ValueError`` on anything else."""
    if len(text) != 8:
        raise ValueError(f"expected 8 hex digits, found {text!r}")
    return int(text, 16)


_THREAD_MIN = 1 << 20  # below this, a hand-off to the helper thread costs more than the checksum


class _Helper:
    """One daemon thread running submitted calls in order.

    Not a ThreadPoolExecutor: those refuse work once interpreter shutdown begins, and an async save
    finished by an exit hook still has to checksum its tensors.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="lightning_saver_crc", daemon=True).start()

    def _loop(self) -> None:
        while True:
            call, future = self._queue.get()
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)
            else:
                future.set_result(None)

    def submit(self, call: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        self._queue.put((call, future))
        return future


_helper_obj: _Helper | None = None
_helper_lock = threading.Lock()
_local = threading.local()


def keep_in_this_thread(keep: bool = True) -> None:
    """Make the calling thread do its checksums and copies itself, never on the helper thread.

    For a thread running at low priority (the async writer): the helper runs at normal priority, so
    work handed to it would compete with training at full weight.
    """
    _local.keep = keep


def kept_in_this_thread() -> bool:
    """Whether the calling thread asked (:func:`keep_in_this_thread`) to do its checksums itself."""
    return bool(getattr(_local, "keep", False))


def _helper() -> _Helper | None:
    global _helper_obj
    if kept_in_this_thread():
        return None
    with _helper_lock:
        if _helper_obj is None or _helper_obj.pid != os.getpid():  # a thread does not survive fork
            try:
                _helper_obj = _Helper()
            except RuntimeError:  # no new threads at interpreter shutdown: checksum inline
                return None
        return _helper_obj


def run_beside(call: Callable[[], None]) -> Future[None] | None:
    """Start ``call`` on the helper thread; None when no thread can run it (the caller runs it inline)."""
    helper = _helper()
    return None if helper is None else helper.submit(call)


class CrcPipeline:
    """CRC-32C of named regions, computed on a helper thread while the caller does the file I/O.

    Regions of one name are checksummed in the order they were added (the helper is one FIFO
    thread). The caller keeps the memory alive and unchanged until :meth:`wait` (or
    :meth:`results`) returns. Small regions are checksummed inline.

    Example:
        >>> crc = CrcPipeline()
        >>> crc.add("w", t.data_ptr(), t.numel() * t.element_size())
        >>> os.write(fd, ...)                      # runs while the checksum is computed
        >>> crc.results()["w"]
    """

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._pending: list[Future[None]] = []
        self._threaded: set[str] = set()

    def _extend(self, name: str, address: int, nbytes: int) -> None:
        self._values[name] = extend_address(self._values.get(name, 0), address, nbytes)

    def add(self, name: str, address: int, nbytes: int, *, total: int | None = None) -> None:
        """Queue ``nbytes`` at ``address`` as the next part of ``name`` (``total``: the name's full size)."""
        if name not in self._values and name not in self._threaded and (total or nbytes) >= _THREAD_MIN:
            self._threaded.add(name)
        helper = _helper() if name in self._threaded else None
        if helper is not None:
            self._pending.append(helper.submit(partial(self._extend, name, address, nbytes)))
        else:
            self._extend(name, address, nbytes)

    def wait(self) -> None:
        """Block until every queued region is checksummed (re-raises a helper error)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def drain(self) -> None:
        """Block until the helper is done with every queued region, ignoring its errors (cleanup path)."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - cleanup after an error already being raised
                pass

    def results(self) -> dict[str, int]:
        """Name -> CRC-32C, once everything queued is done; a name never added with bytes maps to 0."""
        self.wait()
        return dict(self._values)
