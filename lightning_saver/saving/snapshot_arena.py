"""CPU snapshots for async saves: copies of tensors that in-place training updates cannot reach.

Tensors that share memory (tied weights, views) are laid out in one span of the copy so that they
still share memory; everything else is packed densely into one buffer (an "arena"). The
:func:`take_arena` hands an arena out again once no tensor of an earlier snapshot points into it,
so an async saver holds one snapshot of extra memory and pays no page faults after its first save.
The background thread that writes the snapshots lives in :mod:`lightning_saver.saving.async_writer`.

Example::

    frozen = snapshot(model.state_dict())
    model.weight.data.add_(1.0)          # ``frozen["weight"]`` keeps the old values
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch

from lightning_saver.formats import memcopy
from lightning_saver.saving.deferred_copy import DeferredCopy, defer_copies

__all__ = ["Arena", "snapshot", "snapshot_deferred", "snapshot_into", "take_arena"]

_ALIGN = 64  # every block starts on a cache line, which also satisfies every dtype's alignment
_SPAN_ALIGN = 16  # largest itemsize (complex128): span starts keep every member's offset aligned


@dataclass
class _Block:
    """One contiguous region of the arena: a lone tensor, or overlapping views of one storage."""

    members: list[tuple[str, torch.Tensor]]
    src_start: int  # byte offset in the source storage (span blocks only)
    nbytes: int
    span: bool  # copy raw storage bytes so that the members keep aliasing each other
    offset: int = 0  # byte offset in the arena, set by _layout


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    size = t.element_size()
    start = int(t.storage_offset()) * size
    last = sum((int(n) - 1) * int(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * size


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides: list[int] = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[_Block], dict[str, torch.Tensor], int]:
    """Plan the arena: blocks in first-seen order, the tensors copied on their own, total bytes.

    Tensors whose byte ranges overlap in one storage (tied weights, views) land in one span block,
    so the copies alias exactly like the originals. Disjoint tensors are copied densely.
    """
    by_storage: dict[tuple[str, int], list[tuple[int, int, str, torch.Tensor]]] = {}
    loose: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().resolve_conj().resolve_neg()  # lazy conj/neg bits: copy what they mean
        if t.layout != torch.strided:
            loose[name] = t.to("cpu", copy=True)  # sparse and friends: no storage to share
            continue
        if t.numel() == 0:
            by_storage[("empty", id(t))] = [(0, 0, name, t)]
            continue
        start, end = _byte_extent(t)
        key = (str(t.device), t.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append((start, end, name, t))
    blocks: list[_Block] = []
    for members in by_storage.values():
        members.sort(key=lambda m: m[0])
        cluster = [members[0]]
        cluster_end = members[0][1]
        for m in members[1:]:
            if m[0] < cluster_end:
                cluster.append(m)
                cluster_end = max(cluster_end, m[1])
                continue
            blocks.append(_block(cluster, cluster_end))
            cluster, cluster_end = [m], m[1]
        blocks.append(_block(cluster, cluster_end))
    total = 0
    for b in blocks:
        b.offset = total
        total += -(-b.nbytes // _ALIGN) * _ALIGN
    return blocks, loose, max(total, _ALIGN)


def _block(cluster: list[tuple[int, int, str, torch.Tensor]], end: int) -> _Block:
    named = [(name, t) for _, _, name, t in cluster]
    if len(cluster) == 1:
        t = cluster[0][3]
        return _Block(named, 0, t.numel() * t.element_size(), span=False)
    start = cluster[0][0] // _SPAN_ALIGN * _SPAN_ALIGN
    return _Block(named, start, end - start, span=True)


@dataclass
class _Copies:
    """Copies planned for one snapshot: plain memory copies, and tensor copies (devices, strides)."""

    cpu: list[tuple[int, int, int]] = field(default_factory=list)  # (dst address, src address, nbytes)
    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dst, src)

    def run(self, pinned: bool, threads: int = 2) -> None:
        # CPU copies are plain memory copies with the GIL released, shared by two threads when large:
        # under CPU contention torch's multi-threaded copy_ waits at its thread barrier (a 32-tensor
        # 8 MiB state took 0.8 s instead of 1 ms on a busy 2-core machine)
        memcopy.copy_regions(self.cpu, threads=threads)
        for dst, src in self.tensors:
            dst.copy_(src, non_blocking=pinned)
        if pinned and self.tensors:
            torch.cuda.synchronize()  # non_blocking device->host copies must land before we hand them out


def _plan(
    arena: torch.Tensor, blocks: list[_Block], deferred: Callable[[_Block], bool]
) -> tuple[dict[str, torch.Tensor], _Copies, _Copies]:
    """The snapshot's tensors (views of ``arena``), the copies to run now, the copies that may wait."""
    out: dict[str, torch.Tensor] = {}
    base_ptr = arena.data_ptr()
    now, later = _Copies(), _Copies()
    for b in blocks:
        copies = later if deferred(b) else now
        if b.span:
            src_t = b.members[0][1]
            if src_t.device.type == "cpu":
                source = src_t.untyped_storage().data_ptr() + b.src_start
                copies.cpu.append((base_ptr + b.offset, source, b.nbytes))
            else:
                src = torch.empty(0, dtype=torch.uint8, device=src_t.device)
                src.set_(src_t.untyped_storage(), b.src_start, (b.nbytes,), (1,))
                copies.tensors.append((arena[b.offset : b.offset + b.nbytes], src))
        for name, t in b.members:
            typed = arena.view(t.dtype)
            size = t.element_size()
            if b.span:
                base = (b.offset + t.storage_offset() * size - b.src_start) // size
                out[name] = typed.as_strided(t.shape, t.stride(), base)
                continue
            dst = typed.as_strided(t.shape, _contiguous_strides(t.shape), b.offset // size)
            if t.device.type == "cpu" and t.is_contiguous():
                copies.cpu.append((base_ptr + b.offset, t.data_ptr(), b.nbytes))
            else:
                copies.tensors.append((dst, t))
            out[name] = dst
    return out, now, later


def _wants_pinned(blocks: list[_Block]) -> bool:
    on_gpu = any(t.is_cuda for b in blocks for _, t in b.members)
    return on_gpu and torch.cuda.is_available()


def _alloc(nbytes: int, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _in_order(tensors: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: out[name] for name in tensors}


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` to fresh CPU memory that later in-place updates cannot affect.

    Tensors that share memory (tied weights, views) share memory in the copy too, so a saver that
    detects ties sees the same ties. Non-contiguous lone tensors come back contiguous.

    Args:
        tensors: name -> tensor, on any device.

    Returns:
        name -> CPU tensor, in the same order.

    Example::

        frozen = snapshot(model.state_dict())
        model.weight.data.add_(1.0)          # ``frozen["weight"]`` keeps the old values
    """
    return snapshot_into(tensors, _alloc)


def snapshot_into(
    tensors: Mapping[str, torch.Tensor], take_buffer: Callable[[int, bool], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """:func:`snapshot`, copying into ``take_buffer(nbytes, pinned)`` (a uint8 CPU tensor) instead.

    The returned tensors are views of that buffer; the buffer is used only while one of them lives.
    """
    out, deferred = snapshot_deferred(tensors, take_buffer, ())
    assert deferred is None  # nothing was named for deferring
    return out


def snapshot_deferred(
    tensors: Mapping[str, torch.Tensor],
    take_buffer: Callable[[int, bool], torch.Tensor],
    defer: Collection[str] | bool,
) -> tuple[dict[str, torch.Tensor], DeferredCopy | None]:
    """:func:`snapshot_into`, but the copies of the tensors named in ``defer`` (``True``: all) are
    left to the returned :class:`DeferredCopy` (``None`` when there are none).

    The snapshot's deferred tensors hold their values only after ``DeferredCopy.complete()``; the
    caller must call ``DeferredCopy.wait()`` before anything changes their sources. Tensors that
    share memory with a tensor copied now are copied now too (one block is copied as a whole).
    CUDA sources are copied on a side stream into pinned memory, started before this returns.
    """
    blocks, loose, total = _layout(tensors)
    pinned = _wants_pinned(blocks)
    buffer = take_buffer(total, pinned)
    names = None if isinstance(defer, bool) else set(defer)

    def deferred(block: _Block) -> bool:
        return bool(defer) if names is None else all(name in names for name, _ in block.members)

    out, now, later = _plan(buffer, blocks, deferred)
    now.run(pinned)
    out.update(loose)
    out = _in_order(tensors, out)
    if not later.cpu and not later.tensors:
        return out, None  # the buffer goes with this frame: only the snapshot's tensors keep it busy
    # the host copies go by address: keep the arena and every source alive until they ran
    alive = (buffer, [t for b in blocks if deferred(b) for _, t in b.members])
    pieces = [partial(ctypes.memmove, d, s, n) for d, s, n in memcopy.split_regions(later.cpu, memcopy.PIECE)]
    return out, defer_copies(pieces, later.tensors, pinned, alive)


def _use_count(t: torch.Tensor) -> int | None:
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    return int(counter(t.untyped_storage()._cdata))


class Arena:
    """A reusable snapshot buffer; free when no tensor but our own handle points into it."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.tensor = _alloc(nbytes, pinned)
        self.pinned = pinned
        self.idle_count = _use_count(self.tensor)

    def is_free(self) -> bool:
        return self.idle_count is not None and _use_count(self.tensor) == self.idle_count


def take_arena(arenas: list[Arena], nbytes: int, pinned: bool) -> torch.Tensor:
    """A view of a free arena of ``arenas`` (or of a new one, appended); the caller holds a lock.

    Holding the view marks the arena busy for other threads. Idle arenas that are too small or of
    the wrong kind are dropped from ``arenas``, so memory stays one snapshot.

    Example::

        arenas: list[Arena] = []
        frozen = snapshot_into(state, lambda n, pinned: take_arena(arenas, n, pinned))
    """
    if getattr(torch._C, "_storage_Use_Count", None) is None:
        return Arena(nbytes, pinned).tensor  # this torch cannot tell when an arena is free: no pool
    for arena in arenas:
        if arena.pinned == pinned and arena.tensor.numel() >= nbytes and arena.is_free():
            claim = arena.tensor[:]
            arenas[:] = [a for a in arenas if a is arena or not a.is_free()]
            return claim
    arenas[:] = [a for a in arenas if not a.is_free()]
    arena = Arena(nbytes, pinned)
    arenas.append(arena)
    return arena.tensor[:]
