"""Capture a torch model once, as an fx graph of core ATen ops, for every exporter.

We capture with ``torch.export`` and lower to the core ATen op set (``run_decompositions()``):

* every node carries its output's shape and dtype (``node.meta["val"]``), which a TensorFlow graph
  needs for placeholders, casts and layout changes;
* parameters and buffers are lifted to graph inputs under their ``state_dict`` names, which become
  the TensorFlow variable names;
* the core ATen set is small and closed (~180 ops), so one converter per ATen op covers every
  ``nn.Module``, functional and tensor method that lowers to it (``nn.Linear``, ``F.linear`` and
  ``x @ w.T`` all reach ``aten.addmm``/``aten.mm``). ``torch.fx.symbolic_trace`` keeps module calls,
  so it would need converters for modules, functionals *and* methods, and it records no shapes.

The batch dimension (dim 0 of every tensor argument) is captured as dynamic; when the model cannot
be captured that way (it reshapes with a literal batch size, say), capture falls back to static shapes.

Example::

    captured = capture(model, (torch.randn(2, 3, 32, 32),))
    captured.program.graph          # fx graph of core ATen ops
    captured.dynamic_batch          # True when dim 0 is symbolic
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_saver.errors import CaptureError

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


@dataclass
class Captured:
    """A captured model: the ``ExportedProgram`` (core ATen) and how it was captured."""

    program: torch.export.ExportedProgram
    dynamic_batch: bool
    input_names: list[str]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _twice(a: Any) -> Any:
    # torch.export specializes a size-1 dim to the constant 1; capture on a batch of 2 instead
    if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1:
        return a.repeat(2, *([1] * (a.dim() - 1)))
    return a


def _own(value: Any) -> Any:
    # an example input that is a view (x[:, :3]) makes torch.export record a guard on its base, which
    # run_decompositions then evaluates without one ("'NoneType' object has no attribute 'size'")
    return torch.utils._pytree.tree_map(
        lambda a: a.clone() if isinstance(a, torch.Tensor) and a._is_view() else a, value)


def _batch_of_two(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_twice(a) for a in args)


def _batch_spec(value: Any) -> Any:
    auto = torch.export.Dim.AUTO
    return torch.utils._pytree.tree_map(
        lambda a: {0: auto} if isinstance(a, torch.Tensor) and a.dim() else None, value)


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    if kwargs:  # by parameter name, as torch.export binds them to the signature
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        return {name: _batch_spec(value) for name, value in bound.arguments.items()}
    specs = [_batch_spec(arg) for arg in args]
    params = inspect.signature(model.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        return tuple(specs)
    # torch.export binds dynamic_shapes to the signature: a *args parameter takes one tuple
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return (*specs[:n], tuple(specs[n:]))


def capture(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
            dynamic_batch: bool = True, decompose: bool = True) -> Captured:
    """Capture ``model(*args, **kwargs)`` with ``torch.export``, in eval mode, lowered to core ATen.

    Args:
        model: the module to capture; it is put in eval mode for the capture and restored after.
        args: example positional inputs (tensors; other values are baked in as constants).
        kwargs: example keyword inputs (``input_ids=..., attention_mask=...``); their graph inputs are
            named after the keywords.
        dynamic_batch: capture dim 0 of the tensor inputs as a dynamic size when the model allows it.
        decompose: lower to the core ATen op set (``ExportedProgram.run_decompositions()``), with
            ``scaled_dot_product_attention`` lowered by ``graph.attention`` first.

    Returns:
        A ``Captured`` with the program, whether the batch is dynamic, and the input names.

    Raises:
        CaptureError: the model cannot be captured or lowered; the message names the model line and
            the reason.

    Example::

        captured = capture(nn.Linear(4, 2), (torch.randn(3, 4),))
    """
    args, kwargs = _own(tuple(args)), _own(dict(kwargs or {}))
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()]
    with eval_mode(model), torch.no_grad():
        program, dynamic = None, False
        if dynamic_batch and tensors:
            try:
                program = torch.export.export(
                    model, _batch_of_two(args), {k: _twice(v) for k, v in kwargs.items()},
                    dynamic_shapes=_dynamic_shapes(model, args, kwargs))
                dynamic = _has_symbolic_batch(program)
                if not dynamic:  # torch.export specialized the batch: the model fixes it somewhere
                    program = None
                    warnings.warn(f"{type(model).__name__} fixes its batch size; using static shapes",
                                  stacklevel=2)
            except Exception as error:  # any capture failure: retry with static shapes
                warnings.warn(f"capturing {type(model).__name__} with a dynamic batch failed "
                              f"({_first_line(error)}); using static shapes", stacklevel=2)
        if program is None:
            try:
                program = torch.export.export(model, args, kwargs)
            except Exception as error:
                raise CaptureError(_capture_message(model, error)) from error
        if decompose:
            program = _decompose(model, program)
    names = [spec.arg.name for spec in program.graph_signature.input_specs
             if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    return Captured(program, dynamic, names)


def _decompose(model: nn.Module, program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    from lightning_saver.graph.attention import decompositions

    try:
        return program.run_decompositions(decompositions())
    except Exception as error:
        raise CaptureError(_capture_message(model, error, "lower to core ATen")) from error


def static_size(size: Any) -> int | None:
    """A dimension from an fx ``meta["val"]`` shape: its int value, or None when it is symbolic."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    # a SymInt the capture pinned to one value (a batch the model fixes) is static
    return int(size) if is_concrete_int(size) else None


def _has_symbolic_batch(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim():
            if static_size(val.shape[0]) is None:
                return True
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _user_frame(text: str) -> str | None:
    frames = [m for m in _FRAME.finditer(text)
              if "/torch/" not in m.group(1) and not m.group(1).startswith("<")]
    if not frames:
        return None
    file, line, func, code = frames[-1].groups()
    return f'{file}:{line} in {func}: "{code.strip()}"'


def _capture_message(model: nn.Module, error: BaseException, step: str = "capture") -> str:
    import traceback

    where = _user_frame(str(error)) or _user_frame("".join(traceback.format_tb(error.__traceback__)))
    at = f" at {where}" if where else ""
    return (f"could not {step} {type(model).__name__} with torch.export{at}: {_first_line(error)}. "
            "Data-dependent Python control flow and non-tensor outputs cannot be captured; rewrite that "
            "line with tensor ops (torch.where, torch.cond) or pass the value as a constant.")


def describe_node(node: torch.fx.Node) -> str:
    """Where an fx node came from: node name, module path and class, and the model's source line."""
    parts = [f"at node {node.name!r}"]
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        parts.append(f"in module {path or '<root>'!r} ({cls_name})")
    trace = node.meta.get("stack_trace")
    if trace:
        frame = _user_frame(trace)
        if frame:
            parts.append(f"from {frame}")
    return " ".join(parts)


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module that emitted ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # paths of nested calls look like "L['self'].layers[0]" in some versions; keep the plain form
    return re.sub(r"\[(\d+)\]", r".\1", str(path)).replace("L['self'].", "")
