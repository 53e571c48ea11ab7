"""The part of a snapshot that is copied after ``save()`` returned, and the fence that waits for it.

Parameters and optimizer state change only in an optimizer's step; forward and backward only read
them. So their copy need not block ``save()``: it can run on the writer thread while the next
forward and backward run, as long as the next optimizer step waits for it. A :class:`DeferredCopy`
holds those copies:

* host copies (CPU tensors into the CPU arena) run exactly once, on the writer thread before its
  job writes the file, or inline by :meth:`DeferredCopy.wait` when the writer has not started them
  yet (the training loop never waits for a writer that is busy with something else);
* device-to-host copies (CUDA tensors into the pinned arena) were already queued on a side stream
  of their own when the snapshot was taken; :meth:`DeferredCopy.wait` makes the training stream wait
  for them on the device (the CPU does not block), and the writer synchronizes on them before it
  reads the arena.

Example::

    copy = DeferredCopy([partial(ctypes.memmove, dst, src, n) for dst, src, n in regions])
    ...                      # forward, backward: parameters are only read
    copy.wait()              # before optimizer.step(): the copy is complete (or runs now)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from lightning_saver.formats import checksum

__all__ = ["DeferredCopy", "defer_copies", "start_device_copies", "step_only_names"]


class DeferredCopy:
    """Host copies to run once, and device copies in flight on side streams (see the module docs).

    The host copies come in pieces (a few MiB each) that whoever works on them takes one at a time:
    the writer thread, and a training thread that must not wait any longer. So a training thread
    that arrives while the (lower-priority) writer is copying takes the remaining pieces itself and
    waits at most for the piece in progress.

    Args:
        pieces: the host copies; each runs exactly once, on whichever thread takes it.
        device_events: ``(device, event)`` recorded on each side stream after its copies.
        keep_alive: what keeps the copies' source and destination memory alive; dropped once
            every piece ran (so the arena can be reused).
    """

    def __init__(
        self,
        pieces: Sequence[Callable[[], object]],
        device_events: list[tuple[torch.device, Any]] | None = None,
        keep_alive: object = None,
    ) -> None:
        self._pieces = list(pieces)
        self._events = device_events or []
        self._keep_alive = keep_alive
        self._lock = threading.Lock()
        self._next = 0
        self._left = len(self._pieces)
        self._done = threading.Event()
        self._error: BaseException | None = None
        if not self._pieces:
            self._finish()

    def _finish(self) -> None:
        self._pieces, self._keep_alive = [], None  # the memory they kept alive is free to go
        self._done.set()

    def _work(self, on_block: Callable[[], object] | None = None) -> None:
        """Take pieces until none is left, then wait for those other threads took (calling
        ``on_block`` first, when there is something to wait for)."""
        self._take()
        if on_block is not None and not self._done.is_set():
            on_block()
        self._done.wait()

    def _take(self) -> None:
        """Copy pieces until none is left to take."""
        while True:
            with self._lock:
                if self._next >= len(self._pieces):
                    break
                piece = self._pieces[self._next]
                self._next += 1
            try:
                piece()
            except BaseException as exc:  # raised by complete(), i.e. by the save's job
                self._error = self._error or exc
            del piece
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self._finish()

    @property
    def done(self) -> bool:
        """Whether :meth:`wait` would return at once (no host copy left, device copies landed)."""
        return self._done.is_set() and all(event.query() for _, event in self._events)

    def wait(self, on_block: Callable[[], object] | None = None) -> None:
        """Before the source tensors change: host copies done (the pieces left are copied here), and
        the current CUDA stream of each device ordered after the device copies (no CPU wait for those).

        ``on_block`` runs before waiting for a piece another thread is copying (the async writer
        raises its thread's priority there). A failed copy is not raised here: the save it belongs
        to fails and reports it.
        """
        helper = None
        with self._lock:
            several_left = len(self._pieces) - self._next >= 2
        if several_left:
            # the training thread waits here with torch's other threads idle: the helper thread
            # (normal priority) takes pieces beside it, so the copy left takes about half as long
            helper = checksum.run_beside(self._take)
        self._work(on_block)
        if helper is not None:
            helper.result()  # it has taken its last piece (its errors went to self._error)
        for device, event in self._events:
            torch.cuda.current_stream(device).wait_event(event)

    def complete(self) -> None:
        """Before the copy is read (the writer thread): everything has landed.

        Raises:
            Exception: the error of a host copy.
        """
        self._work()
        for _, event in self._events:
            event.synchronize()
        if self._error is not None:
            raise self._error


def start_device_copies(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.device, Any]]:
    """Queue ``dst.copy_(src)`` for CUDA sources on a side stream per device, after the work already
    queued on the current stream; return each device's completion event.

    ``dst`` is pinned host memory, so the copies run asynchronously to the CPU and to the training
    stream, which later waits for the event only where it would change the sources.
    """
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in pairs:
        by_device.setdefault(src.device, []).append((dst, src))
    events: list[tuple[torch.device, Any]] = []
    for device, work in by_device.items():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the values as of save(), not before
        with torch.cuda.stream(stream):
            for dst, src in work:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)  # the allocator must not reuse src's memory before the copy
            event = torch.cuda.Event()
            event.record(stream)
        events.append((device, event))
    return events


def defer_copies(
    pieces: Sequence[Callable[[], object]],
    tensor_copies: Sequence[tuple[torch.Tensor, torch.Tensor]],
    pinned: bool,
    keep_alive: object,
) -> DeferredCopy:
    """The :class:`DeferredCopy` of a snapshot's deferred part: the host ``pieces``, then each
    ``(dst, src)`` of ``tensor_copies`` copied by torch; where ``pinned`` (``dst`` is pinned memory),
    the CUDA sources' copies are started here on side streams (:func:`start_device_copies`)."""
    on_device = [(d, s) for d, s in tensor_copies if s.is_cuda and pinned]
    events = start_device_copies(on_device) if on_device else []
    host = [partial(_copy_tensor, d, s) for d, s in tensor_copies if not (s.is_cuda and pinned)]
    return DeferredCopy([*pieces, *host], events, keep_alive=keep_alive)


def _copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def step_only_names(
    tensors: Mapping[str, torch.Tensor], optimizers: Iterable[torch.optim.Optimizer]
) -> set[str]:
    """The names of ``tensors`` that share memory with the optimizers' parameters or state: the
    tensors only an optimizer step changes, whose copy may wait for that step.

    Everything else (buffers such as BatchNorm's running statistics, which the forward pass updates,
    parameters no optimizer holds, the loops' counters) must be copied before ``save()`` returns.

    Example:
        >>> step_only_names(model.state_dict(), [opt])  # doctest: +SKIP
        {'0.weight', '0.bias'}
    """
    owned: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            owned.update(_address(p) for p in group["params"])
        for state in optimizer.state.values():
            tensors_of_state = (v for v in state.values() if isinstance(v, torch.Tensor))
            owned.update(_address(v) for v in tensors_of_state)
    owned.discard(0)  # storages without memory (empty tensors) all have address 0
    return {name for name, t in tensors.items() if _address(t) in owned}


def _address(tensor: torch.Tensor) -> int:
    # a DTensor (FSDP2) has no storage of its own: its local shard's is the memory
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.untyped_storage().data_ptr())
