"""Background writer for async saves (placeholder: runs jobs synchronously until the real one lands).

Interface the saver relies on:

* ``AsyncWriter(max_in_flight=1)``
* ``submit(job)``: blocks while ``max_in_flight`` jobs are pending; re-raises a previous job's
  error first; then runs ``job`` in the background.
* ``wait()``: blocks until every submitted job finished; re-raises the first unreported error.
* ``close()``: ``wait()`` and stop the thread (also run at interpreter exit).
* ``snapshot(tensors)``: CPU copies that later in-place updates cannot affect, aliasing kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


class AsyncWriter:
    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight

    def submit(self, job: Callable[[], object]) -> None:
        job()

    def wait(self) -> None:
        return None

    def close(self) -> None:
        return None


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    copies: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = id(t)
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out
