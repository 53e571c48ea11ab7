"""Nested training state <-> flat tensors + tagged JSON, without pickle.

A Lightning checkpoint is a tree of dicts, lists and tuples holding tensors, numbers, strings and a
few library types. ``encode_state`` splits it into

* ``tensors``: a flat ``{name: Tensor}``. The weights (``state["state_dict"]``) keep their own key
  names, so any safetensors tool sees them; every other tensor (optimizer moments, RNG states, ...)
  is named under ``RESERVED_PREFIX`` after its key path, e.g.
  ``__state__/optimizer_states/0/state/0/exp_avg``;
* ``metadata``: one string entry (``STATE_KEY``) holding the tree as JSON, with each tensor replaced by
  a reference to its name.

JSON cannot say "tuple", "int key", "NaN" or "torch.float16", so such values are tagged: a tag is a
one-key object whose key starts with ``$``::

    (1, 2)              -> {"$tuple": [1, 2]}
    {3: "a"}            -> {"$dict": [[3, "a"]]}       (also used when a str key starts with "$")
    float("nan")        -> {"$float": "nan"}
    torch.float16       -> {"$dtype": "float16"}
    Path("runs/x")      -> {"$path": ["PosixPath", "runs/x"]}
    TrainerFn.FITTING   -> {"$enum": ["pytorch_lightning.trainer.states", "TrainerFn", "FITTING"]}

Anything else raises :class:`EncodingError` naming its key path and type, unless the caller opts in
to pickle with ``allow_pickle=True`` (and then must opt in again to load it).
"""

from __future__ import annotations

import base64
import enum
import importlib
import json
import math
import pathlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import EncodingError, FormatVersionError

__all__ = [
    "STATE_KEY",
    "STATE_VERSION",
    "RESERVED_PREFIX",
    "EncodedState",
    "encode_state",
    "decode_state",
    "has_state",
]

STATE_KEY = "lightning_saver.training_state"
STATE_VERSION = 1
RESERVED_PREFIX = "__state__/"
# numpy arrays up to this size go into the JSON; larger ones become tensors
_INLINE_ARRAY_BYTES = 1 << 16
_PATH_TYPES = {cls.__name__: cls for cls in (
    pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath,
)}


@dataclass
class EncodedState:
    """The two halves of an encoded state: tensors for the file body, strings for its header."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def has_state(metadata: Mapping[str, str]) -> bool:
    """Whether a file's header metadata holds an encoded training state (vs. bare weights)."""
    return STATE_KEY in metadata


def encode_state(
    state: Mapping[str, Any], *, weights_key: str | None = "state_dict", allow_pickle: bool = False
) -> EncodedState:
    """Split a nested training state into flat tensors and tagged-JSON metadata.

    Args:
        state: the tree to encode; its top level must be a mapping with str keys.
        weights_key: the top-level entry whose ``{name: Tensor}`` is stored under its own names.
        allow_pickle: store values that have no JSON form pickled instead of raising.

    Returns:
        An :class:`EncodedState`; ``decode_state(out.tensors, out.metadata)`` gives the state back.

    Raises:
        EncodingError: a value cannot be encoded (the message names its key path and type), or a
            weight name collides with the reserved prefix.

    Example:
        >>> out = encode_state({"state_dict": {"w": torch.zeros(2)}, "epoch": 3, "betas": (0.9, 0.99)})
        >>> sorted(out.tensors), decode_state(out.tensors, out.metadata)["betas"]
        (['w'], (0.9, 0.99))
    """
    encoder = _Encoder(allow_pickle)
    root: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise EncodingError(f"top-level keys of a training state must be str; found {key!r} "
                                f"({_type(key)})")
        if key == weights_key and _is_weights(value):
            root[key] = {"$weights": encoder.add_weights(value)}
        else:
            root[key] = encoder.encode(value, (key,))
    document = {"version": STATE_VERSION, "state": root}
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    return EncodedState(tensors=encoder.tensors, metadata={STATE_KEY: text})


def decode_state(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    allow_pickle: bool = False,
    source: str = "<memory>",
) -> dict[str, Any]:
    """Rebuild the nested state written by :func:`encode_state`.

    Args:
        tensors: the file's tensors, by name.
        metadata: the file's header metadata.
        allow_pickle: unpickle values stored with ``allow_pickle=True``; only for trusted files.
        source: the file name, for error messages.

    Returns:
        The state, with the same types it was encoded from.

    Raises:
        FormatVersionError: the state was written by a newer lightning_saver.
        EncodingError: the state holds pickled values and ``allow_pickle`` is False.
        KeyError: the state refers to a tensor the file does not hold.
    """
    if STATE_KEY not in metadata:
        raise KeyError(f"{source}: no training state in the header (metadata key {STATE_KEY!r} missing)")
    document = json.loads(metadata[STATE_KEY])
    version = document.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise FormatVersionError(
            f"{source}: training state format version {version!r} is newer than the {STATE_VERSION} this "
            "lightning_saver reads; upgrade lightning_saver to load it"
        )
    decoder = _Decoder(tensors, allow_pickle, source)
    out: dict[str, Any] = {}
    # top-level values are read one by one, so a top-level key never looks like a tag
    for key, value in document["state"].items():
        if isinstance(value, dict) and set(value) == {"$weights"}:
            out[key] = {name: decoder.tensor(name, (key, name)) for name in value["$weights"]}
        else:
            out[key] = decoder.decode(value, (key,))
    return out


def _type(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _format_path(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{part!r}]" for part in path)


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Encoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, torch.Tensor] = {}
        self._names_by_id: dict[int, str] = {}

    def add_weights(self, weights: Mapping[str, torch.Tensor]) -> list[str]:
        for name, tensor in weights.items():
            if name.startswith(RESERVED_PREFIX):
                raise EncodingError(
                    f"weight name {name!r} starts with the reserved prefix {RESERVED_PREFIX!r}; rename it"
                )
            self.tensors[name] = tensor
            self._names_by_id.setdefault(id(tensor), name)
        return list(weights)

    def add_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
            raise EncodingError(
                f"cannot encode the tensor at {_format_path(path)}: {_type(tensor)} with layout "
                f"{tensor.layout} is not a plain dense tensor (sharded/DTensor states need a full state dict)"
            )
        known = self._names_by_id.get(id(tensor))
        if known is not None:
            return known
        base = RESERVED_PREFIX + "/".join(re.sub(r"[^\w.\-]", "_", str(p)) for p in path)
        name, n = base, 1
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = tensor
        self._names_by_id[id(tensor)] = name
        return name

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, enum.Enum):
            return self._enum(value, path)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and type(value) is int:
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"$tensor": self.add_tensor(value, path)}
        if type(value) is tuple:
            return {"$tuple": [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        if type(value) is torch.Size:
            return {"$size": list(value)}
        if type(value) is list:
            return [self.encode(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return self._dict(value, path)
        return self._other(value, path)

    def _dict(self, value: dict[Any, Any], path: tuple[Any, ...]) -> Any:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: self.encode(v, (*path, k)) for k, v in value.items()}
        return {"$dict": [[self.encode(k, (*path, f"<key {k!r}>")), self.encode(v, (*path, k))]
                          for k, v in value.items()]}

    def _enum(self, value: enum.Enum, path: tuple[Any, ...]) -> Any:
        cls = type(value)
        if "<locals>" in cls.__qualname__:
            return self._other(value, path)
        return {"$enum": [cls.__module__, cls.__qualname__, value.name]}

    def _other(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, pathlib.PurePath) and type(value).__name__ in _PATH_TYPES:
            return {"$path": [type(value).__name__, str(value)]}
        if type(value) is bytes:
            return {"$bytes": _b64(value)}
        if type(value) in (set, frozenset):
            items = [self.encode(v, (*path, "<item>")) for v in value]
            return {f"${type(value).__name__}": items}
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":
            return {"$npscalar": [value.dtype.str, _b64(value.tobytes())]}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            return self._array(value, path)
        if self.allow_pickle:
            return {"$pickle": [_type(value), _b64(pickle.dumps(value))]}
        hint = ""
        if path and path[0] == "hyper_parameters":
            hint = " (or leave it out of the checkpoint: self.save_hyperparameters(ignore=[...]))"
        raise EncodingError(
            f"cannot encode the value at {_format_path(path)} of type {_type(value)} without pickle. "
            "Supported: None, bool, int, float, str, bytes, list, tuple, dict, set, tensors, torch.dtype, "
            "torch.device, torch.Size, pathlib paths, enums, numpy numbers and arrays. Convert it to one "
            f"of these (e.g. in state_dict()){hint}, or pass allow_pickle=True if you accept that loading "
            "it runs code."
        )

    def _array(self, value: np.ndarray, path: tuple[Any, ...]) -> Any:
        spec: dict[str, Any] = {"dtype": value.dtype.str, "shape": list(value.shape)}
        # complex and big-endian arrays have no safetensors dtype, so they always stay inline
        if value.nbytes <= _INLINE_ARRAY_BYTES or value.dtype.kind == "c" or value.dtype.byteorder == ">":
            spec["data"] = _b64(np.ascontiguousarray(value).tobytes())
        else:
            spec["tensor"] = self.add_tensor(torch.from_numpy(np.ascontiguousarray(value)), path)
        return {"$ndarray": spec}


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], allow_pickle: bool, source: str) -> None:
        self.tensors = tensors
        self.allow_pickle = allow_pickle
        self.source = source

    def tensor(self, name: str, path: tuple[Any, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.source}: the state at {_format_path(path)} refers to tensor {name!r}, "
                           "which the file does not hold (damaged or edited file)")
        return self.tensors[name]

    def decode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, list):
            return [self.decode(v, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, body), = value.items()
            if tag.startswith("$"):
                return self._tagged(tag, body, path)
        return {k: self.decode(v, (*path, k)) for k, v in value.items()}

    def _tagged(self, tag: str, body: Any, path: tuple[Any, ...]) -> Any:
        if tag == "$tuple":
            return tuple(self.decode(v, (*path, i)) for i, v in enumerate(body))
        if tag == "$size":
            return torch.Size(body)
        if tag == "$dict":
            return {self.decode(k, path): self.decode(v, (*path, k)) for k, v in body}
        if tag == "$float":
            return float(body)
        if tag == "$tensor":
            return self.tensor(body, path)
        if tag == "$dtype":
            return _dtype(body)
        if tag == "$device":
            return torch.device(body)
        if tag == "$path":
            return _PATH_TYPES[body[0]](body[1])
        if tag == "$bytes":
            return base64.b64decode(body)
        if tag in ("$set", "$frozenset"):
            items = [self.decode(v, path) for v in body]
            return set(items) if tag == "$set" else frozenset(items)
        if tag == "$enum":
            return _enum_member(*body, where=f"{self.source} at {_format_path(path)}")
        if tag == "$npscalar":
            return np.frombuffer(base64.b64decode(body[1]), dtype=np.dtype(body[0]))[0]
        if tag == "$ndarray":
            return self._array(body, path)
        if tag == "$pickle":
            return self._unpickle(body, path)
        raise ValueError(f"{self.source}: unknown tag {tag!r} at {_format_path(path)}; written by a newer "
                         "lightning_saver? Upgrade to load it")

    def _array(self, spec: dict[str, Any], path: tuple[Any, ...]) -> np.ndarray:
        dtype = np.dtype(spec["dtype"])
        if "data" in spec:
            flat = np.frombuffer(base64.b64decode(spec["data"]), dtype=dtype).copy()
        else:
            flat = self.tensor(spec["tensor"], path).numpy().astype(dtype, copy=True)
        return flat.reshape(spec["shape"])

    def _unpickle(self, body: list[str], path: tuple[Any, ...]) -> Any:
        if not self.allow_pickle:
            raise EncodingError(
                f"{self.source}: the value at {_format_path(path)} (type {body[0]}) was stored pickled; "
                "unpickling runs code from the file, so it is refused. Pass allow_pickle=True only if you "
                "trust this file"
            )
        return pickle.loads(base64.b64decode(body[1]))  # noqa: S301 - explicit opt-in above


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in a training state")
    return value


def _enum_member(module: str, qualname: str, name: str, *, where: str) -> enum.Enum:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: enum {module}.{qualname} cannot be imported ({exc})") from exc
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise ValueError(f"{where}: {module}.{qualname} is not an enum class")
    return obj[name]
