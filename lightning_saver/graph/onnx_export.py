"""Export a torch model to ONNX with PyTorch's own exporter, batch dimension dynamic.

We use the torch.export-based ("dynamo") exporter by default: it is the exporter PyTorch maintains
(the TorchScript one is deprecated), and it converts the same ``torch.export`` capture as our
TensorFlow export, so a model that exports to one exports to the other. It costs a few seconds per
call (it rebuilds its op registry from onnxscript each time); ``exporter="torchscript"`` is the
fast legacy path for models that trace cleanly.

Example::

    export_onnx(model, (torch.randn(2, 3, 32, 32),), "model.onnx")
    # onnxruntime.InferenceSession("model.onnx").run(None, {"x": batch})   # any batch size
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_saver.errors import CaptureError, UnsupportedOpError
from lightning_saver.graph.capture import capture, describe_node, eval_mode
from lightning_saver.graph.onnx_lowering import lower_for_onnx
from lightning_saver.storage import storage_for

__all__ = ["export_onnx"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # the exporter prints progress lines and warns about optional torchvision ops
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _output_count(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    return len(torch.utils._pytree.tree_leaves(out))


def export_onnx(model: nn.Module, args: Sequence[Any], path: str | os.PathLike[str], *,
                dynamic_batch: bool = True, exporter: str = "dynamo", opset_version: int | None = None,
                check: bool = True, kwargs: dict[str, Any] | None = None) -> str:
    """Write ``model`` as an ONNX file whose inputs are named after the forward arguments.

    Args:
        model: the module (exported in eval mode; its mode is restored).
        args: example positional inputs.
        path: the ``.onnx`` file to write (weights inside it).
        dynamic_batch: make dim 0 of every tensor input dynamic when the model allows it.
        exporter: ``"dynamo"`` (torch.export based, default) or ``"torchscript"`` (legacy tracer).
        opset_version: ONNX opset; the exporter's default when None.
        check: run ``onnx.checker.check_model`` on the written file.
        kwargs: example keyword inputs; the ONNX inputs are named after the keywords (dynamo only).

    Returns:
        The path written. Outputs are named ``output_0``, ``output_1``, ...

    Raises:
        CaptureError: the model cannot be captured or converted (the message says why).
        UnsupportedOpError: PyTorch's ONNX exporter has no translation for an op (named, with its node).
        ValueError: ``exporter`` is neither ``"dynamo"`` nor ``"torchscript"``.

    Example::

        export_onnx(nn.Linear(4, 2), (torch.randn(3, 4),), "linear.onnx")
    """
    args = tuple(args)
    out = os.fspath(path)
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"export_onnx: exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    store = storage_for(out)
    directory, name = store.split(out)
    # exported into a private folder under the final name (external data files are named after
    # it), then committed through the store: a failed export leaves nothing behind
    with tempfile.TemporaryDirectory(prefix="lightning_saver-onnx-") as work:
        tmp = os.path.join(work, name)
        _export(model, args, dict(kwargs or {}), tmp, dynamic_batch, exporter, opset_version)
        if check:
            import onnx

            onnx.checker.check_model(tmp, full_check=True)
        store.makedirs(directory)
        for file in sorted(os.listdir(work), key=lambda f: f == name):  # the model itself last
            store.write_atomic(store.join(directory, file), partial(_copy, os.path.join(work, file)))
    return out


def _copy(path: str, sink: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sink.write(chunk)


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tmp: str, dynamic_batch: bool,
            exporter: str, opset_version: int | None) -> None:
    output_names = [f"output_{i}" for i in range(_output_count(model, args, kwargs))]
    if exporter == "dynamo":
        captured = capture(model, args, kwargs, dynamic_batch=dynamic_batch, decompose=False)
        with _quiet():
            # ops torch.onnx cannot translate or gets wrong (SDPA on GPT-2/T5, scatter means...)
            lowered = lower_for_onnx(captured.program)
            convert = partial(_convert, model, lowered, args, kwargs, output_names, opset_version)
            program = convert(optimize=True)
            if not _in_order(program.model_proto.graph):
                # torch.onnx's optimizer merges equal nodes (x.clamp(-1, 1) used twice) and can put
                # the survivor after a node that reads it: the checker refuses such a graph
                program = convert(optimize=False)
            program.save(tmp)
    else:
        if kwargs:
            raise ValueError("export_onnx: keyword inputs need exporter='dynamo'")
        names = _argument_names(model, len(args))
        axes = {name: {0: "batch"} for name, a in zip(names, args, strict=True)
                if dynamic_batch and _batched(a)}
        axes.update({name: {0: "batch"} for name in output_names} if dynamic_batch else {})
        with eval_mode(model), _quiet():
            torch.onnx.export(model, args, tmp, dynamo=False, input_names=names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset_version)


def _convert(model: nn.Module, program: torch.export.ExportedProgram, args: tuple[Any, ...],
             kwargs: dict[str, Any], output_names: list[str], opset_version: int | None, *,
             optimize: bool) -> Any:
    try:
        return torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, output_names=output_names,
                                 opset_version=opset_version, optimize=optimize)
    except Exception as error:
        missing = _untranslated_op(error, program)
        if missing:
            raise UnsupportedOpError(missing) from error
        raise CaptureError(f"torch.onnx could not convert {type(model).__name__}: "
                           f"{str(error).strip().splitlines()[0]}") from error


def _in_order(graph: Any) -> bool:
    """Whether every node of an ONNX graph reads only values defined before it."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if any(name not in known for name in node.input):
            return False
        known.update(node.output)
    return True


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_NODE = re.compile(r"Error when translating node %(\w+) ")


def _untranslated_op(error: BaseException, program: torch.export.ExportedProgram) -> str | None:
    """The message for an op torch.onnx has no translation for (None: the export failed otherwise)."""
    text, cause = "", error
    while cause is not None:  # the op is named in the exporter's chained DispatchError
        text += str(cause) + "\n"
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    found = _NO_FUNCTION.search(text)
    if not found:
        return None
    op = f"{found.group(1)}.{found.group(2)}"
    named = _NODE.search(text)
    nodes = [n for n in program.graph.nodes if named and n.name == named.group(1)]
    where = f" {describe_node(nodes[0])}" if nodes else ""
    return (f"ONNX export: PyTorch's ONNX exporter has no translation for op {op}{where}; rewrite that "
            "part of the model with other ops, or use export_meta_graph (TensorFlow) for it")


def _batched(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _argument_names(model: nn.Module, count: int) -> list[str]:
    import inspect

    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (params + [f"input_{i}" for i in range(len(params), count)])[:count]
