"""Restore an imported graph's variables from a TF checkpoint or one of our safetensors files.

Which file key fills which variable, first match wins:

1. the variable's checkpoint key (the name its TF Saver wrote, possibly renamed);
2. the variable's node name (``dense/kernel``);
3. its module parameter name, alone or after a module prefix: ``dense/kernel``, ``net.dense/kernel``,
   ``a%2Eb/c`` for the variable ``a.b/c`` (``to_module`` parameters saved by the ``Saver``,
   also from inside a LightningModule).

Keys that match no variable are ignored; variables with no key keep their value (or their
initializer runs on first read). ``strict=True`` makes a missing variable an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lightning_saver.errors import CheckpointNotFoundError, StateMismatchError
from lightning_saver.graph.tf_import.variables import VariableInfo, VariableStore, param_name, variable_name


def _kind(path: str) -> tuple[str, str]:
    """("tf", prefix) or ("safetensors", file) for a user's path."""
    if path.endswith(".index") and os.path.isfile(path):
        return "tf", path[: -len(".index")]
    if os.path.isfile(path) and ".data-" not in os.path.basename(path):
        return "safetensors", path
    if os.path.isfile(path + ".index"):
        return "tf", path
    if os.path.isfile(path + ".safetensors"):
        return "safetensors", path + ".safetensors"
    raise CheckpointNotFoundError(
        f"no checkpoint at {path!r}: expected a TensorFlow checkpoint prefix ({path}.index next to "
        f"{path}.data-00000-of-00001) or a .safetensors file"
    )


def _load(path: str) -> tuple[str, dict[str, Any]]:
    kind, target = _kind(path)
    if kind == "tf":
        from lightning_saver.tf import read_checkpoint

        return target, dict(read_checkpoint(target, framework="torch"))
    from lightning_saver.formats.safetensors_io import load_file

    return target, dict(load_file(target))


def match_keys(variables: dict[str, VariableInfo], keys: Iterable[str]) -> dict[str, str]:
    """Variable name -> the file key that fills it, by the rules in the module docstring."""
    keys = list(keys)
    key_set = set(keys)
    by_suffix: dict[str, list[str]] = {}
    for key in keys:
        by_suffix.setdefault(variable_name(key.rsplit(".", 1)[-1]), []).append(key)
    matched: dict[str, str] = {}
    for name, info in variables.items():
        for candidate in (info.checkpoint_key, name, param_name(name)):
            if candidate in key_set:
                matched[name] = candidate
                break
        else:
            if len(by_suffix.get(name, [])) == 1:
                matched[name] = by_suffix[name][0]
    return matched


def restore_variables(store: VariableStore, path: Any, *, strict: bool = False) -> list[str]:
    """Fill ``store`` from the checkpoint at ``path``; return the restored variable names.

    Args:
        store: the imported graph's variables.
        path: a TF checkpoint prefix (or its ``.index``), or a ``.safetensors`` file.
        strict: raise when a variable of the graph has no key in the file.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        StateMismatchError: no key matches any variable, a shape differs, or (strict) keys are missing.

    Example::

        graph.restore("model.ckpt-100")      # TF Saver output
        graph.restore("ckpt/model-3.safetensors")
    """
    target, tensors = _load(os.fspath(path))
    matched = match_keys(store.variables, tensors)
    if store.variables and not matched:
        wanted = [info.checkpoint_key for info in store.variables.values()][:5]
        raise StateMismatchError(
            f"{target}: none of its {len(tensors)} keys ({', '.join(list(tensors)[:5])}) names a variable "
            f"of the graph; the graph restores {', '.join(wanted)}; is this the checkpoint of this graph?"
        )
    missing = sorted(set(store.variables) - set(matched))
    if strict and missing:
        raise StateMismatchError(
            f"{target}: no value for variable(s) {', '.join(missing[:10])} (checkpoint keys "
            f"{', '.join(store.variables[m].checkpoint_key for m in missing[:10])}); pass strict=False to "
            "keep their current values"
        )
    for name, key in matched.items():
        try:
            store.set(name, tensors[key])
        except StateMismatchError as err:
            raise StateMismatchError(f"{target}: key {key!r}: {err}") from None
    return sorted(matched)
