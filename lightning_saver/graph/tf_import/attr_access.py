"""Fast reads of a GraphModule's parameters and buffers from its generated ``forward``.

fx's ``forward`` reads each filter, bias and folded constant with ``getattr(self, "const:...")``.
Those live in ``_parameters`` / ``_buffers``, not in the instance ``__dict__``, so every read
first fails the normal lookup and then runs ``nn.Module.__getattr__`` in Python: about 1.1 us a
read, 177 us per MobileNetV2 forward (159 reads, 1.7% of its batch-1 time on one thread). A
reader (a descriptor) on the class is found before ``__getattr__``: 31 us for the 159 as a property;
as a non-data descriptor (no ``__set__``) 172 ns a read against a property's 136 and ``__getattr__``'s
635 (one micro-benchmark, load 1.8), which keeps plain attributes of the same name working.

fx gives every GraphModule its own class, so the readers touch no other module. They only
read: assignment still goes through ``nn.Module.__setattr__`` (which files parameters and buffers
in their dicts, and a plain tensor in the instance ``__dict__``, which then wins over the reader),
and a name that is neither falls back to ``nn.Module.__getattr__``.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn


class _Reader:
    """Reads ``name`` from ``_parameters`` / ``_buffers``. Without ``__set__`` it is a non-data
    descriptor: a plain attribute of the same name in the instance ``__dict__`` wins, so
    ``del m.w; m.w = tensor`` (torch.nn.utils.prune, the old weight_norm) works as on any nn.Module."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        name = self.name
        value = module._parameters.get(name)
        if value is None:
            value = module._buffers.get(name)
            if value is None:
                return nn.Module.__getattr__(module, name)
        return value


def direct_attributes(module: fx.GraphModule) -> None:
    """Give ``module``'s own class a reader for each top-level ``get_attr`` target."""
    cls = type(module)
    if cls is fx.GraphModule:  # fx made no class of its own for this instance
        return
    for node in module.graph.nodes:
        name = node.target
        if node.op == "get_attr" and "." not in name and name not in cls.__dict__ \
                and (name in module._parameters or name in module._buffers):
            setattr(cls, name, _Reader(name))
