"""Both Lightning packages: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

They are two copies of the same code with distinct classes, and a Trainer of one does not take the
other's (measured with 2.6.6: ``L.Trainer`` does not count a ``pytorch_lightning`` ``Checkpoint`` as
its checkpoint callback and adds a ``ModelCheckpoint`` beside it; a ``CheckpointIO`` of the other
package is "an invalid type" of plugin; a module of the other package is refused by ``fit``).

So our Lightning classes are *bound* on demand: built on the base classes of every Lightning
package the program has imported (``sys.modules``; both when both are), and the hooks look up what
they need in the package of the trainer calling them. Nothing here imports Lightning until a class
is bound, so ``from lightning_saver import Saver`` in a program without Lightning stays light.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from abc import ABCMeta
from collections.abc import Callable
from types import ModuleType
from typing import Any

# the importable name of each package's Trainer side, and of its Fabric twin
PACKAGES = ("pytorch_lightning", "lightning.pytorch")
FABRIC = {"pytorch_lightning": "lightning_fabric", "lightning.pytorch": "lightning.fabric"}


def loaded() -> tuple[str, ...]:
    """The Lightning packages this program has imported, in ``PACKAGES`` order."""
    return tuple(p for p in PACKAGES if p in sys.modules)


def installed() -> tuple[str, ...]:
    """The Lightning packages that can be imported (found without importing them)."""
    # names from the fixed PACKAGES table
    return tuple(p for p in PACKAGES if importlib.util.find_spec(p.split(".")[0]) is not None)


def default_package() -> str:
    """The package to use when nothing says which: an imported one, else ``pytorch_lightning`` if
    installed, else ``lightning``.

    Raises:
        ImportError: neither package is installed.
    """
    for candidates in (loaded(), installed()):
        if candidates:
            return candidates[0]
    raise ImportError("lightning_saver's Lightning integration needs `pip install pytorch-lightning` "
                      "(or `pip install lightning`); the standalone Saver works without either")


def checked(package: str) -> str:
    """``package`` if it is one of ``PACKAGES``; the gate for every name this module imports.

    A bound class records its packages, and a pickle of it (``rebuild``) carries them: a crafted
    file must not make us import a module of its choosing.

    Raises:
        ValueError: ``package`` is not a Lightning package we bind to.
    """
    if package not in PACKAGES:
        raise ValueError(f"Lightning package {package!r} refused: lightning_saver binds only to one of "
                         f"{', '.join(PACKAGES)} (a pickled Saver / CheckpointIO naming another "
                         "is not loaded)")
    return package


def module(package: str, name: str = "") -> ModuleType:
    """``package`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``) or one of its submodules."""
    # package: one of PACKAGES (checked); name: a literal at every call site in lightning_saver
    return importlib.import_module(f"{checked(package)}.{name}" if name else checked(package))


def fabric_module(package: str, name: str) -> ModuleType:
    """The ``name`` submodule of ``package``'s Fabric twin (``lightning_fabric`` / ``lightning.fabric``)."""
    # the Fabric package from the fixed FABRIC table; name: a literal at every call site
    return importlib.import_module(f"{FABRIC[checked(package)]}.{name}")


def package_of(obj: Any) -> str:
    """The Lightning package a trainer, module or strategy (an instance or a class) comes from."""
    for klass in (obj if isinstance(obj, type) else type(obj)).__mro__:
        top = klass.__module__.split(".")[0]
        if top == "pytorch_lightning":
            return "pytorch_lightning"
        if top == "lightning":
            return "lightning.pytorch"
    raise TypeError(f"{type(obj).__name__} is not a class of pytorch_lightning or lightning.pytorch")


class BoundMeta(ABCMeta):
    """``isinstance(obj, C)`` asks about the class the user named, whatever packages it was bound to."""

    def __instancecheck__(cls, obj: Any) -> bool:
        plain = cls.__dict__.get("_plain", cls)
        return type.__instancecheck__(plain, obj) or super().__instancecheck__(obj)


def bind(plain: type, mixin: type, bases_of: Callable[[str], tuple[type, ...]],
         packages: tuple[str, ...]) -> type:
    """The class ``plain`` + ``mixin`` + each package's ``bases_of(package)``, cached."""
    return _bind(plain, mixin, bases_of, packages)


@functools.cache
def _bind(plain: type, mixin: type, bases_of: Callable[[str], tuple[type, ...]],
          packages: tuple[str, ...]) -> type:
    bases: tuple[type, ...] = (plain, mixin)
    for package in packages:
        bases += tuple(b for b in bases_of(package) if b not in bases)
    namespace = {"_plain": plain, "_bound_packages": packages, "__module__": plain.__module__,
                 "__qualname__": plain.__qualname__, "__doc__": plain.__doc__}
    return type(plain.__name__, bases, namespace)


def new_instance(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
                 bound_for: Callable[[type, tuple[str, ...]], type], packages: tuple[str, ...]) -> Any:
    """``cls.__new__`` for bound classes: an instance of ``cls`` bound to ``packages``.

    A user's subclass of a bound class is instantiated as it is.
    """
    if "_plain" in cls.__dict__:
        plain = cls.__dict__["_plain"]
    elif getattr(cls, "_plain", None) is not None or not packages:
        return object.__new__(cls)
    else:
        plain = cls
    target = bound_for(plain, packages) if packages else plain
    obj = object.__new__(target)
    if not type.__instancecheck__(cls, obj):  # type.__call__ runs __init__ only on instances of cls
        obj.__init__(*args, **kwargs)
    return obj


def rebuild(bound_for: Callable[[type, tuple[str, ...]], type], plain: type,
            packages: tuple[str, ...]) -> Any:
    """Unpickling: an empty instance of ``plain`` bound to ``packages`` (``__setstate__`` fills it).

    ``packages`` comes from the pickle (a file): each is checked against ``PACKAGES`` before any import.
    """
    for package in packages:
        module(package)
    return object.__new__(bound_for(plain, packages))
