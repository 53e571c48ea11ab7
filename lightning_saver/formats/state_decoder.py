"""Decoding the training state's tagged JSON from an untrusted file (the reading half of ``state_codec``).

Reading a file never runs code from it and never allocates more than the file's own bytes justify:

* enums are looked up only among modules that are already imported, through their ``__dict__``
  (no ``importlib``, no module ``__getattr__`` hooks that import lazily); torch dtypes and path
  classes come from fixed tables;
* every size taken from the file is checked before it is used: a numpy dtype must be a plain number
  type (at most 16 bytes an item), a shape's product times the item size must equal the bytes the
  file holds for it, nesting is capped at ``MAX_DEPTH``;
* anything malformed raises :class:`CorruptCheckpointError` naming the file and the key path.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import pathlib
import pickle
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import CorruptCheckpointError, EncodingError, LightningSaverError

__all__ = ["MAX_DEPTH", "decode_document"]

MAX_DEPTH = 200  # deeper trees are refused (real training states are < 10 levels)
_MAX_ITEMSIZE = 16  # complex128, the widest plain number type
PATH_TYPES = {cls.__name__: cls for cls in (
    pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath,
)}  # fmt: skip
_TORCH_DTYPES = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}


def _where(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{part!r}]" for part in path)


class _Bad(Exception):
    """A malformed value; ``decode_document`` turns it into a CorruptCheckpointError with the file name."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def decode_document(
    document: Any, tensors: Mapping[str, torch.Tensor], *, allow_pickle: bool, source: str
) -> dict[str, Any]:
    """Rebuild the state tree from a parsed ``{"version": .., "state": {...}}`` document.

    Raises:
        CorruptCheckpointError: anything malformed (names ``source`` and the key path).
        EncodingError: a pickled value and ``allow_pickle`` is False.
    """
    decoder = _Decoder(tensors, allow_pickle, source)
    try:
        _need(isinstance(document, dict) and isinstance(document.get("state"), dict),
              "the training state is not a JSON object with a 'state' object")
        out: dict[str, Any] = {}
        # top-level values are read one by one, so a top-level key never looks like a tag
        for key, value in document["state"].items():
            if isinstance(value, dict) and set(value) == {"$weights"}:
                names = value["$weights"]
                _need(isinstance(names, list) and all(isinstance(n, str) for n in names),
                      f"{_where((key,))}: $weights is not a list of tensor names")
                out[key] = {name: decoder.tensor(name, (key, name)) for name in names}
            else:
                out[key] = decoder.decode(value, (key,))
        return out
    except LightningSaverError:
        raise
    except _Bad as exc:
        raise CorruptCheckpointError(f"{source}: malformed training state: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, binascii.Error) as exc:
        raise CorruptCheckpointError(
            f"{source}: malformed training state ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], allow_pickle: bool, source: str) -> None:
        self.tensors = tensors
        self.allow_pickle = allow_pickle
        self.source = source

    def tensor(self, name: Any, path: tuple[Any, ...]) -> torch.Tensor:
        _need(isinstance(name, str), f"{_where(path)}: a tensor reference is not a name: {name!r}")
        if name not in self.tensors:
            raise CorruptCheckpointError(
                f"{self.source}: the state at {_where(path)} refers to tensor {name!r}, "
                "which the file does not hold (damaged or edited file)"
            )
        return self.tensors[name]

    def decode(self, value: Any, path: tuple[Any, ...]) -> Any:
        _need(len(path) <= MAX_DEPTH, f"{_where(path[:3])}...: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            return [self.decode(v, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((tag, body),) = value.items()
            if tag.startswith("$"):
                return self._tagged(tag, body, path)
        return {k: self.decode(v, (*path, k)) for k, v in value.items()}

    def _tagged(self, tag: str, body: Any, path: tuple[Any, ...]) -> Any:
        simple = _SIMPLE.get(tag)
        if simple is not None:
            return simple(body, path)
        if tag in ("$tuple", "$set", "$frozenset"):
            _need(isinstance(body, list), f"{_where(path)}: {tag} body is not a list")
            items = [self.decode(v, (*path, i)) for i, v in enumerate(body)]
            return tuple(items) if tag == "$tuple" else set(items) if tag == "$set" else frozenset(items)
        if tag == "$dict":
            _need(isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body),
                  f"{_where(path)}: $dict body is not a list of [key, value] pairs")
            out = {}
            for i, (key, value) in enumerate(body):
                out[self.decode(key, (*path, "<key>"))] = self.decode(value, (*path, i))
            return out
        if tag == "$tensor":
            return self.tensor(body, path)
        if tag == "$enum":
            return _enum_member(body, path)
        if tag == "$ndarray":
            return self._array(body, path)
        if tag == "$pickle":
            return self._unpickle(body, path)
        raise CorruptCheckpointError(
            f"{self.source}: unknown tag {tag!r} at {_where(path)}; written by a newer lightning_saver? "
            "Upgrade to load it"
        )

    def _array(self, spec: Any, path: tuple[Any, ...]) -> np.ndarray:
        _need(isinstance(spec, dict), f"{_where(path)}: $ndarray body is not an object")
        dtype = _np_dtype(spec.get("dtype"), path)
        shape = _shape(spec.get("shape"), path)
        nbytes = math.prod(shape) * dtype.itemsize
        if "data" in spec:
            data = _b64(spec["data"], path)
            _need(len(data) == nbytes, f"{_where(path)}: array of {dtype.str} {shape} needs {nbytes} bytes, "
                                       f"the file holds {len(data)}")
            flat = np.frombuffer(data, dtype=dtype).copy()
        else:
            source = self.tensor(spec.get("tensor"), path)
            found = source.numel() * source.element_size()
            _need(found == nbytes and source.dtype != torch.bfloat16,
                  f"{_where(path)}: array of {dtype.str} {shape} needs {nbytes} bytes, "
                  f"its tensor holds {found} ({source.dtype})")
            flat = source.numpy().astype(dtype, copy=True)
        return flat.reshape(shape)

    def _unpickle(self, body: Any, path: tuple[Any, ...]) -> Any:
        _need(isinstance(body, list) and len(body) == 2, f"{_where(path)}: $pickle body is malformed")
        if not self.allow_pickle:
            raise EncodingError(
                f"{self.source}: the value at {_where(path)} (type {body[0]}) was stored pickled; "
                "unpickling runs code from the file, so it is refused. Pass allow_pickle=True only if you "
                "trust this file"
            )
        return pickle.loads(_b64(body[1], path))  # noqa: S301 - explicit opt-in above


def _b64(text: Any, path: tuple[Any, ...]) -> bytes:
    _need(isinstance(text, str), f"{_where(path)}: expected base64 text, found {type(text).__name__}")
    return base64.b64decode(text, validate=True)


def _shape(raw: Any, path: tuple[Any, ...]) -> tuple[int, ...]:
    ok = isinstance(raw, list) and len(raw) <= 64 and all(
        type(d) is int and 0 <= d < 2**63 for d in raw
    )
    _need(ok, f"{_where(path)}: invalid shape {str(raw)[:80]}")
    return tuple(raw)


def _np_dtype(raw: Any, path: tuple[Any, ...]) -> np.dtype[Any]:
    _need(isinstance(raw, str) and len(raw) <= 8, f"{_where(path)}: invalid numpy dtype {str(raw)[:80]!r}")
    try:
        dtype = np.dtype(raw)
    except TypeError:
        raise _Bad(f"{_where(path)}: invalid numpy dtype {raw!r}") from None
    _need(dtype.kind in "biufc" and 0 < dtype.itemsize <= _MAX_ITEMSIZE and dtype.fields is None,
          f"{_where(path)}: numpy dtype {raw!r} is not a plain number type")
    return dtype


def _npscalar(body: Any, path: tuple[Any, ...]) -> Any:
    _need(isinstance(body, list) and len(body) == 2, f"{_where(path)}: $npscalar body is malformed")
    dtype = _np_dtype(body[0], path)
    data = _b64(body[1], path)
    _need(len(data) == dtype.itemsize, f"{_where(path)}: {dtype.str} scalar needs {dtype.itemsize} bytes, "
                                       f"found {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _size(body: Any, path: tuple[Any, ...]) -> torch.Size:
    return torch.Size(_shape(body, path))


def _float(body: Any, path: tuple[Any, ...]) -> float:
    _need(isinstance(body, str) and body.lstrip("-").lower() in ("nan", "inf", "infinity"),
          f"{_where(path)}: $float body {str(body)[:40]!r} is not nan/inf")
    return float(body)


def _dtype(body: Any, path: tuple[Any, ...]) -> torch.dtype:
    value = _TORCH_DTYPES.get(body) if isinstance(body, str) else None
    _need(value is not None, f"{_where(path)}: unknown torch dtype {str(body)[:40]!r}")
    assert value is not None
    return value


def _device(body: Any, path: tuple[Any, ...]) -> torch.device:
    _need(isinstance(body, str) and len(body) <= 64, f"{_where(path)}: invalid device {str(body)[:40]!r}")
    return torch.device(body)


def _path(body: Any, path: tuple[Any, ...]) -> pathlib.PurePath:
    ok = isinstance(body, list) and len(body) == 2 and body[0] in PATH_TYPES and isinstance(body[1], str)
    _need(ok, f"{_where(path)}: $path body is malformed")
    return PATH_TYPES[body[0]](body[1])


def _bytes(body: Any, path: tuple[Any, ...]) -> bytes:
    return _b64(body, path)


def _enum_member(body: Any, path: tuple[Any, ...]) -> enum.Enum:
    """The member named by ``[module, qualname, name]``, found only among already imported modules."""
    ok = isinstance(body, list) and len(body) == 3 and all(isinstance(p, str) for p in body)
    _need(ok, f"{_where(path)}: $enum body is malformed")
    module, qualname, name = body
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise _Bad(
            f"{_where(path)} holds an enum of module {module!r}, which is not imported; reading a "
            f"checkpoint never imports a module it names. Import the module that defines {qualname} "
            "before loading"
        )
    for part in qualname.split("."):
        # plain attribute lookups only: a module __getattr__ may import things lazily
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise _Bad(f"{_where(path)}: {module}.{qualname} is not an enum class")
    member = obj.__members__.get(name)
    _need(member is not None, f"{_where(path)}: enum {module}.{qualname} has no member {name!r}")
    return member  # type: ignore[return-value]


_SIMPLE = {
    "$size": _size, "$float": _float, "$dtype": _dtype, "$device": _device, "$path": _path,
    "$bytes": _bytes, "$npscalar": _npscalar,
}  # fmt: skip
