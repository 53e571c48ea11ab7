"""``ckpt_path="last"`` for the Saver.

Lightning resolves ``"last"`` in its checkpoint connector, from ``ModelCheckpoint`` callbacks only,
before any callback hook runs. ``install()`` wraps that one method so that, when the trainer has a
callback offering ``find_last_checkpoint(trainer)`` (the ``Saver``), ``"last"`` becomes the newest
checkpoint among those and the ``ModelCheckpoint``s' own "last" files. Every other value goes to
Lightning unchanged. The wrapper is installed once, when the first ``Saver`` is created.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from lightning_saver.integration import compat
from lightning_saver.storage import is_url

_MARK = "_lightning_saver_last"


def install(package: str = "pytorch_lightning") -> None:
    """Wrap ``_CheckpointConnector._parse_ckpt_path`` of ``package`` (idempotent)."""
    connector = compat.module(package, "trainer.connectors.checkpoint_connector")._CheckpointConnector
    original = connector._parse_ckpt_path
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def parse_ckpt_path(self: Any, state_fn: Any, ckpt_path: Any, *args: Any,
                        **kwargs: Any) -> Any:
        if ckpt_path == "last":
            found = find_last(self.trainer)
            if found is not None:
                return found
        return original(self, state_fn, ckpt_path, *args, **kwargs)

    setattr(parse_ckpt_path, _MARK, True)
    connector._parse_ckpt_path = parse_ckpt_path


def find_last(trainer: Any) -> str | None:
    """The newest checkpoint any Saver (or ModelCheckpoint) of ``trainer`` wrote; None if none."""
    finders = [cb for cb in trainer.callbacks if callable(getattr(cb, "find_last_checkpoint", None))]
    if not finders:
        return None
    candidates = {cb.find_last_checkpoint(trainer) for cb in finders}
    model_checkpoint = compat.module(compat.package_of(trainer), "callbacks").ModelCheckpoint
    for cb in trainer.callbacks:
        if isinstance(cb, model_checkpoint):
            candidates |= cb._find_last_checkpoints(trainer)
    urls = [p for p in candidates if p and is_url(p)]  # found in the store by latest_checkpoint just now
    existing = [p for p in candidates if p and not is_url(p) and os.path.exists(p)]
    if urls:
        return urls[0]
    return max(existing, key=os.path.getmtime) if existing else None
