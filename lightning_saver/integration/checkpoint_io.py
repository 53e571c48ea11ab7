"""``SafetensorsCheckpointIO``: Lightning's checkpoint I/O plugin, on safetensors and without pickle.

Lightning reads every checkpoint (``fit(ckpt_path=...)``, ``validate``, ``test``) through the
strategy's ``CheckpointIO``. This plugin writes the whole training state as one safetensors file
(weights under their own names, the rest encoded by :mod:`lightning_saver.formats.state_codec`)
and reads three kinds of file:

* a training-state file written by the ``Saver`` or by this plugin;
* a bare weights file (``Saver(...).save(model, ...)`` or ``weights_only=True``): weights only;
* a pickled ``.ckpt`` written by ``ModelCheckpoint``: handed to ``fallback`` with
  ``weights_only=True``, torch's restricted unpickler, which loads tensors and plain containers and
  refuses code.

Like the ``Saver``, the class is bound (``compat.py``) to the ``CheckpointIO`` base of each imported
Lightning package, so ``Trainer(plugins=[SafetensorsCheckpointIO()])`` works with either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_saver.errors import CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError
from lightning_saver.formats import safetensors_io
from lightning_saver.formats.state_codec import decode_state, encode_state, has_state
from lightning_saver.integration import compat
from lightning_saver.saving import saver as saving
from lightning_saver.saving.names import INDEX_SUFFIX
from lightning_saver.saving.store_io import store_of
from lightning_saver.storage import Sink, is_url

SUFFIX = ".safetensors"


def is_safetensors_file(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
                        ) -> bool:
    """Whether ``path`` starts like a safetensors file (u64 header length, then a JSON object)."""
    store, text = store_of(path, storage_options)
    if store.size(text) < 9:
        return False
    head = store.read_range(text, 0, 9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def _io_bases(package: str) -> tuple[type, ...]:
    return (compat.fabric_module(package, "plugins.io.checkpoint_io").CheckpointIO,)


class _BoundIO:
    _plain: type
    _bound_packages: tuple[str, ...]

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (compat.rebuild, (_bind_io, self._plain, self._bound_packages), dict(self.__dict__))


def _bind_io(plain: type, packages: tuple[str, ...]) -> type:
    return compat.bind(plain, _BoundIO, _io_bases, packages)


def checkpoint_io_for(package: str) -> type:
    """``SafetensorsCheckpointIO`` bound to one package's ``CheckpointIO``."""
    return _bind_io(SafetensorsCheckpointIO, (package,))


class SafetensorsIO:
    """The implementation of :class:`SafetensorsCheckpointIO`, free of Lightning's base class."""

    module: torch.nn.Module | None
    fallback: Any
    verify: bool
    allow_pickle: bool
    storage_options: dict[str, Any]

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` (atomically); non-``.safetensors`` paths go to ``fallback``."""
        if not str(path).endswith(SUFFIX):
            self.fallback.save_checkpoint(checkpoint, path, storage_options)
            return
        encoded = encode_state(checkpoint, allow_pickle=self.allow_pickle)
        store, path = store_of(path, storage_options or self.storage_options)
        if not is_url(path):
            path = os.path.abspath(path)
        store.makedirs(store.split(path)[0])
        nbytes = safetensors_io.planned_nbytes(encoded.tensors, metadata=encoded.metadata)
        store.write_atomic(
            path, lambda sink: _write(encoded.tensors, encoded.metadata, sink), nbytes=nbytes,
        )

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint as the dict Lightning restores from.

        Raises:
            CheckpointNotFoundError: ``path`` does not exist.
            FormatVersionError: the file was written by a newer lightning_saver.
            CorruptCheckpointError: the file is damaged, or a ``.ckpt`` holds more than plain data.
        """
        options = self.storage_options
        store, path = store_of(path, options)
        if not store.exists(path) or (not is_url(path) and not os.path.isfile(path)):
            raise CheckpointNotFoundError(
                f"checkpoint {str(path)!r} does not exist; pass an existing .safetensors (or .ckpt) file, "
                "or ckpt_path='last' to resume from the newest checkpoint of the Saver's directory"
            )
        if str(path).endswith(INDEX_SUFFIX) and not is_url(path):  # a set, gathered whole (DDP, 1 process)
            from lightning_saver.integration.sharded import load_set_state

            state = load_set_state(str(path), verify=self.verify, allow_pickle=self.allow_pickle)
        elif not is_safetensors_file(path, options):
            if is_url(path):
                raise CorruptCheckpointError(f"{path}: not a safetensors file; pickled checkpoints are read "
                                             "from local paths only (download it first)")
            return self._load_pickled(path, map_location)
        else:
            state = load_state(path, verify=self.verify, allow_pickle=self.allow_pickle,
                               storage_options=options)
        if self.module is not None:
            check_weights(path, state.get("state_dict", {}), self.module,
                          strict=getattr(self.module, "strict_loading", True))
        return state

    def _load_pickled(self, path: Any, map_location: Any | None) -> dict[str, Any]:
        try:
            return self.fallback.load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            if "weights_only" not in str(exc) and "Unpickl" not in type(exc).__name__:
                raise
            raise CorruptCheckpointError(
                f"{path}: this pickled checkpoint holds objects beyond tensors and plain containers, and it "
                "is loaded with weights_only=True (torch's safe unpickler), which refuses them. Convert it "
                "once in a trusted environment, e.g. `lightning-saver convert`, or save it with the Saver"
            ) from exc

    def remove_checkpoint(self, path: Any) -> None:
        """Delete one checkpoint file (``fallback`` handles non-``.safetensors`` paths)."""
        if str(path).endswith(SUFFIX):
            store, text = store_of(path, self.storage_options)
            store.delete(text)
        else:
            self.fallback.remove_checkpoint(path)


def _write(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], sink: Sink) -> Any:
    fd = sink.fileno()
    if fd is not None:
        return safetensors_io.write_to_fd(tensors, fd, metadata=metadata)
    return safetensors_io.write_to_sink(tensors, sink, metadata=metadata)


class SafetensorsCheckpointIO(SafetensorsIO, metaclass=compat.BoundMeta):
    """Save and load Lightning checkpoints as safetensors files.

    Args:
        fallback: the plugin for files that are not safetensors (and for saving to paths that do
            not end in ``.safetensors``); ``TorchCheckpointIO`` by default.
        verify: check the tensor checksum on load.
        allow_pickle: let values with no JSON form be stored pickled, and load them back.

    Example:
        >>> trainer = L.Trainer(plugins=[SafetensorsCheckpointIO()])  # doctest: +SKIP
        >>> trainer.save_checkpoint("run/state.safetensors")  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="run/state.safetensors")  # doctest: +SKIP
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        packages = compat.loaded() or (compat.default_package(),)
        for package in packages:
            compat.module(package)
        return compat.new_instance(cls, args, kwargs, _bind_io, packages)

    def __init__(self, fallback: Any | None = None, *, verify: bool = True,
                 allow_pickle: bool = False) -> None:
        if fallback is None:
            package = getattr(self, "_bound_packages", (compat.default_package(),))[0]
            fabric = compat.fabric_module(package, "plugins.io.torch_io")
            fallback = fabric.TorchCheckpointIO()
        self.fallback = fallback
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.storage_options = {}  # for URL paths; the Saver passes its own
        # set by the Saver: the module a loaded checkpoint must fit, checked before Lightning loads it
        self.module = None


def check_weights(path: Any, weights: Mapping[str, torch.Tensor], module: torch.nn.Module, *,
                  strict: bool = True) -> None:
    """Raise one error listing every key and shape by which ``weights`` do not fit ``module``.

    Raises:
        StateMismatchError: names the file, each missing/unexpected key, each shape difference.
    """
    expected = module.state_dict()
    lines = []
    if strict:
        lines += [f"  missing in the checkpoint: {k!r} {list(expected[k].shape)}" for k in expected
                  if k not in weights]
        lines += [f"  unexpected in the checkpoint: {k!r} {list(weights[k].shape)}" for k in weights
                  if k not in expected]
    differ = [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    lines += [f"  shape mismatch for {k!r}: the model has {list(expected[k].shape)}, the checkpoint "
              f"{list(weights[k].shape)}" for k in differ]
    if lines:
        raise StateMismatchError(
            f"checkpoint {path} does not fit {type(module).__name__} ({len(lines)} problem(s)):\n"
            + "\n".join(lines[:30]) + "\nFix: resume with the model (and hyper-parameters) the checkpoint "
            "was saved from, or set `model.strict_loading = False` to skip missing and unexpected keys."
        )


def load_state(path: str | os.PathLike[str], *, verify: bool = True, allow_pickle: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load one safetensors checkpoint as a Lightning checkpoint dict.

    A training-state file gives the full state back; a bare weights file gives
    ``{"state_dict": weights}``, enough for ``validate``/``test``/``predict`` (``fit`` then needs
    a full state and Lightning says so).
    """
    tensors = saving.load(path, verify=verify, storage_options=storage_options)
    metadata = saving.read_metadata(path, storage_options=storage_options)
    if has_state(metadata):
        return decode_state(tensors, metadata, allow_pickle=allow_pickle, source=str(path))
    version = compat.module(compat.default_package()).__version__
    return {"state_dict": tensors, "pytorch-lightning_version": version}
