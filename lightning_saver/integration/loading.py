"""``MyModel.load_from_checkpoint("model_200.safetensors")``, and the same without touching Lightning.

Lightning's ``LightningModule.load_from_checkpoint`` / ``LightningDataModule.load_from_checkpoint``
read the file in one place, ``core/saving.py``'s module-level ``pl_load`` (``torch.load``), and then
do everything else (hyper-parameters, ``**kwargs`` overrides, ``strict``, the device) from the
dict it returns. There is no hook for another file format there, so :func:`install` replaces that
one name, ``pl_load`` of ``core/saving.py``, with a function that reads safetensors files (ours, by
their first bytes) and hands every other file to the original. It is installed when a ``Saver``
class is bound to a Lightning package, and only for the versions this was tested with
(``TESTED``); elsewhere it is left out and :func:`load_from_checkpoint` does the same without a patch.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_saver.integration import compat

__all__ = ["install", "load_from_checkpoint", "TESTED"]

# Lightning minor versions whose core/saving.py reads through a module-level pl_load(path, map_location, ...)
TESTED = ("2.6",)
_MARK = "_lightning_saver_pl_load"


def install(package: str) -> bool:
    """Let ``package``'s ``load_from_checkpoint`` read safetensors files; False where not tested.

    Idempotent. Only ``core/saving.py``'s ``pl_load`` is replaced; ``torch.load`` and every other
    caller of Lightning's loader are untouched.
    """
    version = str(compat.module(package).__version__)
    if ".".join(version.split(".")[:2]) not in TESTED:
        return False
    saving = compat.module(package, "core.saving")
    original = saving.__dict__.get("pl_load")
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    def pl_load(path_or_url: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if _is_ours(path_or_url):
            return _read(path_or_url, map_location)
        return original(path_or_url, map_location, *args, **kwargs)

    setattr(pl_load, _MARK, True)
    saving.pl_load = pl_load
    return True


def _is_ours(path: Any) -> bool:
    from lightning_saver.integration.checkpoint_io import is_safetensors_file

    return isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and is_safetensors_file(path)


def _device(map_location: Any) -> torch.device | None:
    """Where tensors read on the CPU go: a device or its name, or ``{"cpu": ...}``; callables keep the CPU."""
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu")
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def _read(path: Any, map_location: Any) -> dict[str, Any]:
    from lightning_saver.integration.checkpoint_io import load_state

    checkpoint = load_state(path)
    device = _device(map_location)
    if device is not None and device.type != "cpu":
        moved: dict[int, torch.Tensor] = {}  # tied weights stay tied
        checkpoint["state_dict"] = {k: moved.setdefault(id(t), t.to(device))
                                    for k, t in checkpoint.get("state_dict", {}).items()}
    return checkpoint


def load_from_checkpoint(cls: type, checkpoint_path: str | os.PathLike[str], map_location: Any = None,
                         strict: bool | None = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a safetensors checkpoint, without any patch.

    Works for a ``LightningModule`` or ``LightningDataModule`` class of either Lightning package:
    the stored hyper-parameters (overridden by ``kwargs``) build the object, then the weights (or
    the datamodule's state) are loaded, ``strict`` as in Lightning.

    Args:
        cls: the class to build.
        checkpoint_path: a ``.safetensors`` file written by the ``Saver`` or ``SafetensorsCheckpointIO``.
        map_location: a device (or its name) for the weights; CPU by default.
        strict: passed to ``load_state_dict`` (default: the module's ``strict_loading``).
        **kwargs: hyper-parameters that override the stored ones.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError; torch's ``RuntimeError``
        for weights that do not fit, as Lightning.

    Example:
        >>> model = load_from_checkpoint(MyModel, "ckpts/model_200.safetensors", lr=1e-3)  # doctest: +SKIP
    """
    from lightning_saver.errors import CheckpointNotFoundError

    if not os.path.isfile(checkpoint_path):
        raise CheckpointNotFoundError(f"checkpoint {os.fspath(checkpoint_path)!r} does not exist")
    package = compat.package_of(cls)
    saving = compat.module(package, "core.saving")
    checkpoint = _read(checkpoint_path, map_location)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})  # type: ignore[attr-defined]
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)  # type: ignore[attr-defined]
    if issubclass(cls, compat.module(package).LightningDataModule):
        return saving._load_state(cls, checkpoint, **kwargs)
    model = saving._load_state(cls, checkpoint, strict=strict, **kwargs)
    device = _device(map_location)
    return model.to(device) if device is not None else model

