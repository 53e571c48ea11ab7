"""Restore a torch module from a TensorFlow checkpoint written from one of our exported graphs.

A model exported with ``export_meta_graph``, trained further in TensorFlow and saved with the graph's
own ``Saver`` (``saver.save(sess, "run/model_trained")``) comes back with
``Saver().restore(model, "run/model_trained")`` or ``load("run/model_trained")``. The variable names
and layouts are mapped back to the ``state_dict`` strictly through the record the export left in the
``.meta`` (``formats/tf_layouts.py``), which TensorFlow's ``Saver.save`` writes again beside its
checkpoint (``model_trained.meta``).

Example::

    Saver().restore(model, "run/model_trained")    # run/model_trained.index + .data-* + .meta
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_saver.errors import StateMismatchError
from lightning_saver.formats import tf_layouts
from lightning_saver.saving.loading import RestoreResult
from lightning_saver.storage import is_url


def is_tf_prefix(path: str | os.PathLike[str]) -> bool:
    """A local TF V2 checkpoint prefix (``<path>.index`` exists) rather than one of our files."""
    text = os.fspath(path)
    return not is_url(text) and not text.endswith(".safetensors") and os.path.isfile(text + ".index")


def load_tf(prefix: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in a TF checkpoint of one of our exported graphs (torch keys and layouts).

    Raises:
        CheckpointNotFoundError: no ``<prefix>.meta`` beside the checkpoint.
        StateMismatchError: the graph was not exported by us, or a variable is missing or reshaped.
        CorruptCheckpointError: the checkpoint is damaged.
    """
    from lightning_saver.tf import read_checkpoint

    text = os.fspath(prefix)
    layouts = tf_layouts.read_layouts(text + ".meta")
    tensors = read_checkpoint(text, names=list(layouts), framework="torch")
    return tf_layouts.to_torch(layouts, tensors, text)


def restore_tf(target: Any, prefix: str | os.PathLike[str], *, strict: bool = True) -> RestoreResult:
    """Copy the checkpoint's weights into ``target`` (an ``nn.Module`` or a mapping of tensors), in place.

    Raises:
        StateMismatchError: (strict) a key of the target is not in the checkpoint or the other way
            round; (always) a shape or dtype differs. Nothing is copied then.
    """
    text = os.fspath(prefix)
    state = load_tf(text)
    current: Mapping[str, torch.Tensor] = target.state_dict() if isinstance(target, nn.Module) else target
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    if strict and (missing or unexpected):
        raise StateMismatchError(f"{text}: the TF checkpoint does not fit the target: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]} (pass strict=False to restore the rest)")
    for key in state.keys() & current.keys():
        have, got = current[key], state[key]
        if tuple(have.shape) != tuple(got.shape) or have.dtype != got.dtype:
            raise StateMismatchError(f"{text}: {key!r} is {got.dtype} {tuple(got.shape)} in the checkpoint, "
                                     f"{have.dtype} {tuple(have.shape)} in the target")
    with torch.no_grad():
        for key in state.keys() & current.keys():
            current[key].copy_(state[key])
    return RestoreResult(missing, unexpected)
