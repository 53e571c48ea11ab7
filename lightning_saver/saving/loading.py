"""Restoring a checkpoint into a module or a mapping: matching keys, shapes and dtypes, then copying.

A mismatch is reported once, listing every name with what was expected and what was found. The
bytes go from the file straight into the parameters' memory when the module loads plainly (no
custom ``_load_from_state_dict``, no load hooks); otherwise through ``load_state_dict``.

A module takes the weights of a whole training-state file (the Lightning ``Saver``'s) and ignores
its ``__state__/`` entries. ``dtype=`` casts the file's floating-point tensors on the way in, as
``load_state_dict`` users expect of ``param.copy_``; ``map_location=`` places new tensors; a module
on the ``meta`` device is materialised from the file (``load_state_dict(assign=True)``).
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
from lightning_saver.formats.state_codec import RESERVED_PREFIX

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


def _mismatches(header: Header, target: Mapping[str, torch.Tensor], strict: bool, *,
                weights_only: bool = False, dtype: torch.dtype | None = None) -> RestoreResult:
    file_keys = {k: v for k, v in header.tensors.items()
                 if not (weights_only and k.startswith(RESERVED_PREFIX))}
    cast = DTYPE_NAMES.get(dtype, str(dtype)) if dtype is not None else None
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
        expected, shape = _target_desc(target[key])
        found = cast if cast is not None and _is_float(info.dtype) else info.dtype
        if shape != info.shape:
            lines.append(f"  shape mismatch for {key!r}: expected {list(shape)}, found {list(info.shape)}")
        if expected != found and not target[key].is_meta:
            hint = "" if cast is not None else f" (pass dtype={target[key].dtype} to cast)"
            lines.append(f"  dtype mismatch for {key!r}: expected {expected}, found {found}{hint}")
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


def _is_float(dtype_name: str) -> bool:
    return dtype_name.startswith(("F", "BF"))


def _converted(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
               device: torch.device | None) -> dict[str, torch.Tensor]:
    """``tensors`` cast (floating point only) and moved; tied tensors stay tied."""
    if dtype is None and device is None:
        return tensors
    done: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    return {k: done.setdefault(id(t), convert(t)) for k, t in tensors.items()}


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


def restore_into(target: Any, header: Header, *, strict: bool = True, verify: bool = True,
                 dtype: torch.dtype | None = None, map_location: Any = None) -> RestoreResult:
    """Load the file described by ``header`` into an ``nn.Module`` (in place) or a mutable mapping.

    A module keeps its tensors (ties included) and ignores a training-state file's ``__state__/``
    entries; a module on the ``meta`` device gets new tensors from the file (``assign=True``). A
    mapping's existing tensors are overwritten in place, and an empty mapping is filled with every
    tensor of the file.

    Args:
        dtype: cast the file's floating-point tensors to this dtype (else dtypes must match).
        map_location: device of tensors created here (a meta module's, an empty mapping's); CPU by default.

    Raises:
        StateMismatchError: missing/unexpected keys (strict), or any shape/dtype difference.
        CorruptCheckpointError: a checksum differs (``verify=True``).
    """
    device = torch.device(map_location) if map_location is not None else None
    if isinstance(target, nn.Module):
        state = target.state_dict()
        result = _mismatches(header, state, strict, weights_only=True, dtype=dtype)
        common = {k: v for k, v in state.items() if k in header.tensors}
        meta = any(t.is_meta for t in common.values())
        if _loads_plainly(target) and not meta and dtype is None:
            _read_in_place(header, common, verify)
        else:
            loaded = _converted(load_tensors(header, names=list(common), verify=verify), dtype, device)
            target.load_state_dict(loaded, strict=strict, assign=meta)
        return result
    if isinstance(target, MutableMapping):
        if not target:
            target.update(_converted(load_tensors(header, verify=verify), dtype, device))
            return RestoreResult([], [])
        bad = [k for k, v in target.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(
                f"restore target entries {bad[:5]} are not tensors; restore fills tensors in place"
            )
        result = _mismatches(header, target, strict, dtype=dtype)
        common = {k: v for k, v in target.items() if k in header.tensors}
        if dtype is None:
            _read_in_place(header, common, verify)
        else:
            for key, value in load_tensors(header, names=list(common), verify=verify).items():
                common[key].copy_(value)
        return result
    raise TypeError(
        f"restore target must be an nn.Module or a mutable mapping of tensors, found {type(target).__name__}"
    )
