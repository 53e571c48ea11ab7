"""Op tables: converters registered under an explicit key.

Registering a key twice, or looking up a key that is not there, is an error naming the key.
Converters register through explicit imports of their modules, never reflection.

Example::

    TF_OPS = OpTable("TensorFlow import")

    @TF_OPS.register("Relu6")
    def relu6(features):
        return torch.clamp(features, 0.0, 6.0)

    TF_OPS.lookup("Relu6")          # -> relu6
    TF_OPS.lookup("Foo")            # UnsupportedOpError: TensorFlow import has no converter for op 'Foo' ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from lightning_saver.errors import UnsupportedOpError

F = TypeVar("F", bound=Callable[..., Any])


class OpTable:
    """A named mapping from op keys (strings, or torch op objects) to converter functions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._table: dict[Any, Callable[..., Any]] = {}

    def register(self, *keys: Any) -> Callable[[F], F]:
        """Decorator registering one function under one or more keys."""
        if not keys:
            raise ValueError(f"{self.name}: register() needs at least one op key")

        def decorator(func: F) -> F:
            for key in keys:
                if key in self._table:
                    raise KeyError(
                        f"{self.name}: op {key!r} is registered twice "
                        f"({self._table[key].__module__}.{self._table[key].__name__} and "
                        f"{func.__module__}.{func.__name__})"
                    )
                self._table[key] = func
            return func

        return decorator

    def lookup(self, key: Any, where: str = "") -> Callable[..., Any]:
        """The converter for ``key``; ``where`` (node name, module path, consumers) goes in the error."""
        try:
            return self._table[key]
        except KeyError:
            suffix = f" {where}" if where else ""
            raise UnsupportedOpError(
                f"{self.name} has no converter for op {key!r}{suffix}. "
                f"{len(self._table)} ops are supported; register a converter for {key!r} "
                "or rewrite the model to avoid it."
            ) from None

    def __contains__(self, key: Any) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[Any]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)
