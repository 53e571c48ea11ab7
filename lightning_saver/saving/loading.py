"""Restoring a checkpoint into a module or a mapping: matching keys, shapes and dtypes, then copying.

A mismatch is reported once, listing every name with what was expected and what was found. The
bytes go from the file straight into the parameters' memory when the module loads plainly (no
custom ``_load_from_state_dict``, no load hooks); otherwise through ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_saver.errors import CorruptCheckpointError, StateMismatchError
from lightning_saver.formats.safetensors_header import DTYPE_NAMES, Header, TensorInfo
from lightning_saver.formats.safetensors_io import load_tensors, read_into

__all__ = ["RestoreResult", "restore_into"]

# overrides that only matter for keys our files always contain (BatchNorm's num_batches_tracked)
_PLAIN_LOADERS = {nn.Module._load_from_state_dict, _NormBase._load_from_state_dict}
_MAX_LISTED = 30


class RestoreResult(NamedTuple):
    """Keys skipped by ``strict=False``: in the target but not the file, in the file but not the target."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} {list(shape)}"


def _file_desc(info: TensorInfo) -> str:
    return _describe(info.dtype, info.shape)


def _target_desc(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", "")), tuple(t.shape)


def _mismatches(header: Header, target: Mapping[str, torch.Tensor], strict: bool) -> RestoreResult:
    file_keys = header.tensors
    missing = [k for k in target if k not in file_keys]
    unexpected = [k for k in file_keys if k not in target]
    lines: list[str] = []
    if strict:
        lines += [
            f"  missing in the checkpoint: {k!r} (the model expects {_describe(*_target_desc(target[k]))})"
            for k in missing
        ]
        lines += [
            f"  unexpected in the checkpoint: {k!r} (found {_file_desc(file_keys[k])})"
            for k in unexpected
        ]
    for key in target:
        if key not in file_keys:
            continue
        info: TensorInfo = file_keys[key]
        dtype, shape = _target_desc(target[key])
        if shape != info.shape:
            lines.append(f"  shape mismatch for {key!r}: expected {list(shape)}, found {list(info.shape)}")
        if dtype != info.dtype:
            lines.append(f"  dtype mismatch for {key!r}: expected {dtype}, found {info.dtype}")
    if lines:
        more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
        fix = "restore into the model the checkpoint was saved from"
        if strict and (missing or unexpected):
            fix += ", or pass strict=False to skip missing and unexpected keys"
        raise StateMismatchError(
            f"checkpoint {header.path} does not match the target "
            f"({len(lines)} problem(s)):\n" + "\n".join(lines[:_MAX_LISTED]) + more + f"\nFix: {fix}."
        )
    return RestoreResult(missing, unexpected)


def _loads_plainly(module: nn.Module) -> bool:
    if type(module).load_state_dict is not nn.Module.load_state_dict:
        return False
    for m in module.modules():
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return False
        if type(m)._load_from_state_dict not in _PLAIN_LOADERS:
            return False
    return True


def _read_in_place(header: Header, targets: Mapping[str, torch.Tensor], verify: bool) -> None:
    try:
        read_into(header, targets, verify=verify)
    except CorruptCheckpointError as exc:
        # checksums are checked as the bytes arrive, straight in the target's memory
        raise CorruptCheckpointError(
            f"{exc} (the restore target now holds partial data: restore another checkpoint into it, "
            "e.g. latest_checkpoint(directory, verify=True))"
        ) from None


def restore_into(target: Any, header: Header, *, strict: bool = True, verify: bool = True) -> RestoreResult:
    """Load the file described by ``header`` into an ``nn.Module`` (in place) or a mutable mapping.

    A module keeps its tensors (ties included); a mapping's existing tensors are overwritten in
    place, and an empty mapping is filled with every tensor of the file.

    Raises:
        StateMismatchError: missing/unexpected keys (strict), or any shape/dtype difference.
        CorruptCheckpointError: a checksum differs (``verify=True``).
    """
    if isinstance(target, nn.Module):
        state = target.state_dict()
        result = _mismatches(header, state, strict)
        common = {k: v for k, v in state.items() if k in header.tensors}
        if _loads_plainly(target):
            _read_in_place(header, common, verify)
        else:
            loaded = load_tensors(header, names=list(common), verify=verify)
            target.load_state_dict(loaded, strict=strict)
        return result
    if isinstance(target, MutableMapping):
        if not target:
            target.update(load_tensors(header, verify=verify))
            return RestoreResult([], [])
        bad = [k for k, v in target.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(
                f"restore target entries {bad[:5]} are not tensors; restore fills tensors in place"
            )
        result = _mismatches(header, target, strict)
        _read_in_place(header, {k: v for k, v in target.items() if k in header.tensors}, verify)
        return result
    raise TypeError(
        f"restore target must be an nn.Module or a mutable mapping of tensors, found {type(target).__name__}"
    )
