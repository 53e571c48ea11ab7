"""A plan's steps as one generated Python function: ``graph.run``'s interpreter, compiled once.

Running the steps from a dict (``env[ref]`` per input and output, the constants copied into it on
every call, each step's tuple unpacked) cost a small CNN's ``graph.run`` about a tenth of its time
at batch 1 against the ``to_module`` module, whose forward is generated code. So a plan is turned
into a function too: each tensor is a local variable (``v3``), each step one line calling its
converter with its inputs and keyword arguments, constants and converters globals of that function,
``del`` where an intermediate is read for the last time. A step's errors get the note naming its
TensorFlow node, found from the line the traceback ends on. Only plans without run-time tf.cond
(Switch/Merge) are compiled; those run with dead-tensor rules (``cond.py``).

Element-wise activations run in place when their input dies at that step (no fresh output buffer:
a big CPU win), checked at run time: the input must be seen only by the generated function (no
other local, fetch or constant holds it, counted with ``sys.getrefcount`` and calibrated below
through the same generated code) and own its storage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.importer import Ref, ref_name

# element-wise activations run in place when their input dies at that step; only in ``run``,
# never in modules, which autograd must see whole
IN_PLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": torch.relu_,
    "Relu6": lambda x: x.clamp_(0.0, 6.0),
    "Tanh": torch.tanh_,
    "Sigmoid": torch.sigmoid_,
}
# tensors holding a storage: a private intermediate's is held by itself (and the probe's handle);
# more means an alias the Python refcount cannot see (a detach(), a view's base)
_storage_users = getattr(torch._C, "_storage_Use_Count", None)


def _storage_baseline() -> int:
    probe = torch.empty(1)  # alive while counted, exactly as an intermediate is in is_private
    return _storage_users(probe.untyped_storage()._cdata) if _storage_users else -1


_PRIVATE_STORAGE = _storage_baseline()


def _outs(out: Any, wanted: tuple[int, ...], name: str) -> Any:
    """Outputs ``wanted`` of a step's result (a tuple or list for multi-output ops, else one value)."""
    if type(out) is tuple or type(out) is list:
        if wanted[-1] < len(out):
            return [out[k] for k in wanted]
        k = wanted[-1]
    elif wanted == (0,):
        return [out]
    else:
        k = wanted[-1]
    return _absent((name, k))


def _absent(ref: Ref) -> Any:
    raise GraphImportError(f"tensor {ref_name(ref)} does not exist: its op has fewer outputs")


class Runner:
    """``run(feeds, values)``: the generated function, and the step each of its lines runs."""

    def __init__(self, steps: Sequence[tuple[str, str, Callable[..., Any], tuple[Ref, ...], dict[str, Any],
                                             tuple[Ref, ...]]],
                 reads: Sequence[tuple[Ref, str]], consts: dict[Ref, Any], feeds: frozenset[Ref],
                 fetches: Sequence[Ref], read: Callable[[str], Any], in_place: frozenset[int] = frozenset(),
                 private_refs: int = -1) -> None:
        """``steps``: (name, op, func, inputs, kwargs, refs dropped after it); ``reads``: variables
        read once up front (ref, variable); ``in_place``: indices of steps whose only input dies
        there and whose op is in ``IN_PLACE``."""
        names: dict[Ref, str] = {}
        space: dict[str, Any] = {"_outs": _outs, "_absent": _absent, "_read": read}

        def local(ref: Ref) -> str:
            if ref not in names:
                names[ref] = f"v{len(names)}"
            return names[ref]

        def glob(prefix: str, value: Any) -> str:
            key = f"{prefix}{len(space)}"
            space[key] = value
            return key

        used: dict[str, set[int]] = {}
        for _, _, _, inputs, _, _ in steps:
            for ref in inputs:
                used.setdefault(ref[0], set()).add(ref[1])
        for ref in fetches:
            used.setdefault(ref[0], set()).add(ref[1])
        defined = {(s[0], k) for s in steps for k in used.get(s[0], ())} | {ref for ref, _ in reads}

        const_names: dict[Ref, str] = {}

        def value(ref: Ref) -> str:
            if ref in defined or ref in feeds:
                return local(ref)
            if ref in consts:
                if ref not in const_names:
                    const_names[ref] = glob("c", consts[ref])
                return const_names[ref]
            return f"_absent({glob('r', ref)})"

        lines = ["def run(feeds, values):", "    get = values.get"]
        for ref in sorted(feeds & set(r for s in steps for r in s[3]) | (feeds & set(fetches))):
            lines.append(f"    {local(ref)} = feeds[{glob('r', ref)}]")
        for ref, variable in reads:
            key = glob("n", variable)
            lines.append(f"    {local(ref)} = get({key})")
            lines.append(f"    if {local(ref)} is None: {local(ref)} = _read({key})")
        self.line_steps: dict[int, int] = {}
        for i, (name, op, func, inputs, kwargs, drops) in enumerate(steps):
            if i in in_place:
                func = _in_place(op, func, private_refs)
            call = f"{glob('f', func)}({', '.join(value(r) for r in inputs)}"
            if kwargs:
                call += f"{', ' if inputs else ''}**{glob('k', kwargs)}"
            call += ")"
            wanted = tuple(sorted(used.get(name, ())))
            outs = [local((name, k)) for k in wanted]
            self.line_steps[len(lines) + 1] = i
            if not wanted:
                lines.append(f"    {call}")
            elif wanted == (0,):
                lines.append(f"    {outs[0]} = {call}")
                self.line_steps[len(lines) + 1] = i
                lines.append(f"    if type({outs[0]}) is tuple or type({outs[0]}) is list: "
                             f"{outs[0]} = _outs({outs[0]}, (0,), {name!r})[0]")
            else:
                lines.append(f"    {', '.join(outs)}, = _outs({call}, {wanted!r}, {name!r})")
            gone = [names[r] for r in drops if r in names and r in defined]
            if gone:
                lines.append(f"    del {', '.join(gone)}")
        lines.append(f"    return [{', '.join(value(r) for r in fetches)}]")
        self.source = "\n".join(lines) + "\n"
        code = compile(self.source, "<tf_import plan>", "exec")
        exec(code, space)
        self.run: Callable[[dict[Ref, Any], dict[str, Any]], list[Any]] = space["run"]
        self.code = self.run.__code__

    def failed_step(self, tb: TracebackType | None) -> int | None:
        """The step whose line an exception passed through in the generated function, if any."""
        line = None
        while tb is not None:
            if tb.tb_frame.f_code is self.code:
                line = tb.tb_lineno
            tb = tb.tb_next
        return None if line is None else self.line_steps.get(line)


def is_private(x: Any, refs: int, private_refs: int) -> bool:
    """``x`` (seen ``refs`` times from the consumer's frame) is an intermediate nobody else can see."""
    return (refs <= private_refs and type(x) is torch.Tensor and x.is_floating_point()
            and not x._is_view() and _storage_users is not None
            and _storage_users(x.untyped_storage()._cdata) <= _PRIVATE_STORAGE)


def _in_place(op: str, fallback: Callable[..., Any], private_refs: int) -> Callable[..., Any]:
    mutate = IN_PLACE[op]

    def run(x: torch.Tensor, **kwargs: Any) -> Any:
        refs = sys.getrefcount(x)  # the same frame shape and statement as _count_refs
        if is_private(x, refs, private_refs):
            return mutate(x)
        return fallback(x, **kwargs)

    return run


def _count_refs(x: torch.Tensor, **kwargs: Any) -> Any:
    refs = sys.getrefcount(x)  # the same statement as in _in_place's run
    return torch.tensor(refs)


def refs_when_private(count: Callable[..., Any], position: int = 0) -> int:
    """References to an intermediate while its consumer runs in generated code (its local, the
    parameter, ...), as ``count`` (a step function returning ``torch.tensor(refs)``) sees the
    intermediate passed as its input ``position``: measured through the same code, because what
    ``getrefcount`` sees differs between Python versions; -1 (never in place) when a second holder
    is not visible."""
    def make() -> torch.Tensor:
        return torch.empty(1)

    def same(x: torch.Tensor) -> torch.Tensor:
        return x

    inputs = (("z", 0),) * position + (("a", 0),)
    made = [("z", "P", make, (), {}, ()), ("a", "P", make, (), {}, ())]
    counted = ("b", "C", count, inputs, {}, (("a", 0),))
    private = Runner([*made, counted], (), {}, frozenset(), [("b", 0), ("z", 0)],
                     lambda name: None).run({}, {})[0]
    shared = Runner([*made, ("s", "I", same, (("a", 0),), {}, ()), counted], (), {}, frozenset(),
                    [("b", 0), ("s", 0), ("z", 0)], lambda name: None).run({}, {})[0]
    return int(private) if int(shared) > int(private) else -1


PRIVATE_REFS = refs_when_private(_count_refs)
