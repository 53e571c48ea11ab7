"""Reading safetensors tensors by ranged requests, for files that are not local (object stores).

``header.source.read(offset, length)`` returns bytes (one HTTP range request remotely). A restore
cuts every wanted tensor into units of 8 MiB, fetches them on a few threads at once, copies each
into the target's memory and checksums it there; a tensor's unit CRCs are joined with
``checksum.combine``. Only the header and the wanted tensors' bytes are requested.

Example::

    header = read_header_ranged(url, size, source.read)    # header.source = source
    read_into_ranged(header, {"w": torch.empty(3, 4)}, verify=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import checksum
from lightning_saver.formats.safetensors_header import Header
from lightning_saver.formats.safetensors_writer import memory_view

__all__ = ["read_into_ranged", "crc_ranged", "check_all", "UNIT", "WORKERS"]

UNIT = 8 << 20  # bytes per ranged request
WORKERS = 8  # requests in flight: object stores serve ranges in parallel


def _fetch(header: Header, offset: int, nbytes: int) -> bytes:
    data = header.source.read(header.data_start + offset, nbytes)
    if len(data) != nbytes:
        raise CorruptCheckpointError(
            f"{header.path}: expected {nbytes} bytes at offset {header.data_start + offset}, got {len(data)}"
        )
    return bytes(data)


def _fill(header: Header, name: str, target: torch.Tensor, start: int, nbytes: int, verify: bool) -> int:
    """Fetch ``nbytes`` of tensor ``name`` from ``start`` into ``target``'s memory; their CRC."""
    data = _fetch(header, header.tensors[name].offset + start, nbytes)
    memory_view(target.data_ptr() + start, nbytes)[:] = data
    return checksum.extend_address(0, target.data_ptr() + start, nbytes) if verify else 0


def _units(nbytes: int) -> list[tuple[int, int]]:
    return [(s, min(UNIT, nbytes - s)) for s in range(0, nbytes, UNIT)]


def read_into_ranged(
    header: Header, targets: Mapping[str, torch.Tensor], *, verify: bool = True, workers: int = WORKERS
) -> None:
    """Fill ``targets`` (already checked against the header) from ``header.source``.

    Raises:
        CorruptCheckpointError: a checksum differs, or the object is shorter than its header says.
    """
    plan: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for name, target in targets.items():
        direct = target.device.type == "cpu" and target.is_contiguous()
        buf = target if direct else torch.empty(target.shape, dtype=target.dtype)
        plan.append((name, buf, None if direct else target))
    jobs = [(name, buf, s, n) for name, buf, _ in plan for s, n in _units(header.tensors[name].nbytes)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        crcs = list(pool.map(lambda j: _fill(header, j[0], j[1], j[2], j[3], verify), jobs))
    joined: dict[str, int] = {}
    for (name, _, _, n), crc in zip(jobs, crcs, strict=True):
        joined[name] = checksum.combine(joined[name], crc, n) if name in joined else crc
    for name, buf, original in plan:
        if original is not None:
            with torch.no_grad():
                original.copy_(buf)
        if verify:
            _check(header, name, joined.get(name, 0))


def _check(header: Header, name: str, computed: int) -> None:
    stored = header.tensors[name].crc32c
    if stored is None or stored == checksum.format_crc(computed):
        return
    raise CorruptCheckpointError(
        f"{header.path}: checksum mismatch in tensor {name!r}: stored crc32c {stored}, computed "
        f"{checksum.format_crc(computed)}; the object changed after it was written, restore an older "
        "checkpoint"
    )


def crc_ranged(header: Header, name: str) -> int:
    """CRC-32C of one tensor's bytes, fetched in units (constant memory)."""
    crc = 0
    for start, n in _units(header.tensors[name].nbytes):
        data = _fetch(header, header.tensors[name].offset + start, n)
        part = checksum.tensor_crc32c(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        crc = checksum.combine(crc, part, n) if start else part
    return crc


def check_all(header: Header) -> None:
    """Verify every tensor's checksum (``latest_checkpoint(verify=True)`` on a remote directory)."""
    for name in header.tensors:
        _check(header, name, crc_ranged(header, name))
