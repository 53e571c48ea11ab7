"""Sharded training states under Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``).

Saving needs nothing special: under this strategy ``dump_checkpoint`` gives DTensor weights and
sharded optimizer states, every rank encodes the state (``state_codec``) and calls ``save``, and
the saver writes a set (``saving/sharded.py``).

Loading does: ``ModelParallelStrategy.load_checkpoint`` reads DCP folders and ``torch.save`` files
itself, bypassing the ``CheckpointIO`` plugin. :func:`install` wraps that one method of the
trainer's strategy object so that a set's index loads here (every other path goes to Lightning):
the module's and the optimizers' own sharded state dicts are the targets, DCP's load planner
fills each rank's shards from whatever world size wrote the set, and the rest of the training state
(loops, callbacks, RNG states) comes back decoded from the index, as the dict Lightning restores.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from lightning_saver.formats.safetensors_header import DTYPES
from lightning_saver.formats.state_codec import decode_state, encode_state, has_state
from lightning_saver.integration import compat
from lightning_saver.saving import names

__all__ = ["is_sharded_strategy", "install", "load_set_checkpoint", "load_set_state"]

_MARK = "_lightning_saver_sets"


Strategy = Any  # either Lightning package's Strategy


def is_sharded_strategy(strategy: Strategy) -> bool:
    """Strategies whose checkpoints the Saver writes as sets (one file per rank)."""
    parallel = compat.module(compat.package_of(strategy), "strategies").ModelParallelStrategy
    return isinstance(strategy, parallel)


def install(strategy: Strategy, *, verify: bool = True, allow_pickle: bool = False) -> None:
    """Let ``strategy.load_checkpoint`` read sets (idempotent, on this strategy object only)."""
    original = strategy.load_checkpoint
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = strategy.broadcast(os.fspath(checkpoint_path))
        if names.is_set_index(path):
            return load_set_checkpoint(strategy, path, verify=verify, allow_pickle=allow_pickle)
        return original(checkpoint_path, *args, **kwargs)

    setattr(load_checkpoint, _MARK, True)
    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


def load_set_checkpoint(strategy: Strategy, path: str, *, verify: bool = True,
                        allow_pickle: bool = False) -> dict[str, Any]:
    """Restore the model and optimizers in place from a set; return the rest as Lightning's dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lightning_saver.saving import sharded  # torch.distributed.checkpoint: only when a set is read

    model = strategy.model
    assert model is not None  # load happens after setup (restore_checkpoint_after_setup)
    optimizers = [getattr(o, "_optimizer", o) for o in strategy.optimizers]
    live = {
        "state_dict": get_model_state_dict(model),
        "optimizer_states": [get_optimizer_state_dict(model, o) for o in optimizers],
    }
    # encoding the live state gives its tensors the names the save gave them
    targets: dict[str, Any] = dict(encode_state(live, sharded=True).tensors)
    index = sharded.read_index(path)
    strict = getattr(strategy.lightning_module, "strict_loading", True)
    sharded.check_fits(path, index, targets, strict=strict, unexpected_ok=True)
    for name, entry in index.tensors.items():
        if name not in targets:  # replicated values (RNG states, counters): whole, on every rank
            targets[name] = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    sharded.load_into(path, index, targets, verify=verify, collective=True)
    checkpoint = decode_state(targets, index.metadata, allow_pickle=allow_pickle, source=path)
    set_model_state_dict(model, checkpoint["state_dict"], options=StateDictOptions(strict=strict))
    for optimizer, state in zip(optimizers, checkpoint.get("optimizer_states", []), strict=False):
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
    return checkpoint


def load_set_state(path: str, *, verify: bool = True, allow_pickle: bool = False) -> dict[str, Any]:
    """A set as one Lightning checkpoint dict of whole tensors, in this process alone (DDP, one
    process, ``validate``/``test`` with an unsharded module)."""
    from lightning_saver.saving import sharded

    index = sharded.read_index(path)
    tensors = sharded.load_set(path, verify=verify)
    if has_state(index.metadata):
        return decode_state(tensors, index.metadata, allow_pickle=allow_pickle, source=path)
    version = compat.module(compat.default_package()).__version__
    return {"state_dict": tensors, "pytorch-lightning_version": version}
