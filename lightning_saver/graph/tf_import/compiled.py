"""Opt-in ``torch.compile`` of a ``to_module`` module for inference on CPU (inductor, C++).

``compile_module(module)`` returns a callable that, for each input signature (shapes and dtypes),
traces the module once into aten ops (``make_fx``, with the fused convolutions' plain torch ops
rather than their prepared oneDNN kernels) and compiles that with inductor: ``freezing`` (the
weights become constants, so the folded batch norms and biases are computed once, the filters are
prepacked for oneDNN and convolution, bias and activation run as one kernel) and ``cpp_wrapper``
(the compiled graph is called from C++, without a Python line per op). At batch 1 and one thread
the Python per op is what separates torch from TensorFlow; see ``benchmarks/tf_import.py``.

The module is left as it was (trainable, savable). The compiled code holds a snapshot of the
weights: when a parameter or buffer changes (its version moves), the next call compiles again.

A graph that reads the values of its inputs to decide shapes or control flow (``tf.where`` with one
argument, a ``while_loop`` whose trip count depends on the input) cannot be traced this way, and
compiling needs a C++ compiler: in those cases, or when inductor fails, a warning says why and the
module runs eagerly, as without compiling.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from lightning_saver.graph.tf_import.fused_conv import PLAIN_OPS

MAX_SIGNATURES = 4  # compiled input signatures kept per module; more run eagerly
_REFUSED_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)

# input shapes and dtypes, and the thread count (inductor's C++ kernels fix it when compiled)
Signature = tuple[tuple[tuple[tuple[int, ...], torch.dtype], ...], int]


class CompileFailed(Exception):
    """Why a signature runs eagerly (the message goes into the warning)."""


def _cpp_compiler() -> str:
    from torch._inductor import cpp_builder

    try:
        return str(cpp_builder.get_cpp_compiler())
    except Exception as err:  # inductor raises its own InvalidCxxCompiler
        raise CompileFailed(f"no C++ compiler found ({err}); install g++ or clang++, or set CXX") from err


def _trace(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The module's forward as aten ops, with every shape fixed by ``inputs``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    token = PLAIN_OPS.set(True)
    try:
        with torch.no_grad():
            traced = make_fx(module, tracing_mode="real")(*inputs)
    except RuntimeError as err:
        if "_local_scalar_dense" in str(err):
            raise CompileFailed(
                "the graph reads values of its inputs to decide shapes or control flow") from err
        raise
    finally:
        PLAIN_OPS.reset(token)
    for node in traced.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and any(
                tag in target.tags for tag in _REFUSED_TAGS) and not _plain_index(node):
            raise CompileFailed(f"the graph computes shapes from its input values ({target}); "
                                "the traced shapes would be wrong for other inputs")
    return traced


def _plain_index(node: fx.Node) -> bool:
    """``aten.index`` with integer indices (a gather) has a static shape; boolean masks do not."""
    if node.target is not torch.ops.aten.index.Tensor:
        return False
    indices = node.args[1] if len(node.args) > 1 else []
    vals = [i.meta.get("val") if isinstance(i, fx.Node) else i for i in indices]  # type: ignore[union-attr]
    return all(v is None or (isinstance(v, torch.Tensor) and v.dtype not in (torch.bool, torch.uint8))
               for v in vals) and any(v is not None for v in vals)


def _compile(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    import torch._inductor.config as inductor_config

    _cpp_compiler()
    traced = _trace(module, inputs)
    compiled = torch.compile(traced, dynamic=False)
    # inductor compiles on the first call: run it under the options, then it keeps them
    with inductor_config.patch(freezing=True, cpp_wrapper=True), torch.no_grad():
        compiled(*inputs)
    return compiled


class CompiledModule(nn.Module):
    """``module`` compiled per input signature, for inference; see the module docstring.

    ``compile_seconds`` maps each signature to how long its trace and compile took (None where it
    fell back to eager); ``eager_reasons`` to why it fell back.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled: dict[Signature, Callable[..., Any] | None] = {}
        self.compile_seconds: dict[Signature, float | None] = {}
        self.eager_reasons: dict[Signature, str] = {}
        self._tensors: list[torch.Tensor] = []
        self._versions: tuple[int, ...] = ()

    def _weights_changed(self) -> bool:
        return any(t._version != v for t, v in zip(self._tensors, self._versions, strict=True))

    def _snapshot(self) -> None:
        """The parameters and state-dict buffers, whose changes the compiled code would miss (folded
        constants, the non-persistent buffers, are left out: nothing writes them)."""
        self._tensors = [*self.module.parameters()]
        for sub in self.module.modules():
            skip = sub._non_persistent_buffers_set
            self._tensors += [b for name, b in sub.named_buffers(recurse=False) if name not in skip]
        self._versions = tuple(t._version for t in self._tensors)

    def forward(self, *inputs: Any) -> Any:
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            return self.module(*inputs)
        if torch.is_grad_enabled() and (any(x.requires_grad for x in inputs) or any(
                p.requires_grad for p in self.module.parameters())):
            return self.module(*inputs)  # training: the module itself, so gradients flow
        signature = (tuple((tuple(x.shape), x.dtype) for x in inputs), torch.get_num_threads())
        if self.compiled and self._weights_changed():
            warnings.warn("compile_module: the module's weights changed since they were compiled; "
                          "compiling again", stacklevel=2)
            self.compiled.clear()
        fn = self.compiled.get(signature, False)
        if fn is False:
            fn = self._add(signature, inputs)
        if fn is None:
            return self.module(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    def _add(self, signature: Signature, inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any] | None:
        if len(self.compiled) >= MAX_SIGNATURES:
            self.eager_reasons[signature] = f"{MAX_SIGNATURES} input signatures are compiled already"
            return None
        if not self.compiled:
            self._snapshot()
        start = time.perf_counter()
        fn: Callable[..., Any] | None = None
        try:
            fn = _compile(self.module, inputs)
        except Exception as err:
            reason = str(err) if isinstance(err, CompileFailed) else f"{type(err).__name__}: {err}"
            reason = reason.strip().splitlines()[0] if reason.strip() else type(err).__name__
            self.eager_reasons[signature] = reason
            shapes = [list(shape) for shape, _ in signature[0]]
            warnings.warn(f"compile_module: inputs {shapes} run eagerly: {reason}", stacklevel=3)
        self.compiled[signature] = fn
        self.compile_seconds[signature] = None if fn is None else time.perf_counter() - start
        return fn


def compile_module(module: nn.Module) -> CompiledModule:
    """``module`` (from ``ImportedGraph.to_module``) compiled with inductor for CPU inference.

    Each new input signature (shapes, dtypes, ``torch.get_num_threads()``) traces and compiles on
    its first call, which takes seconds to minutes; later calls run the compiled code. Outputs
    match the module's.

    Args:
        module: a module from ``to_module``; it is not changed.

    Returns:
        A ``CompiledModule``: call it like the module. With autograd recording and trainable
        parameters it runs the module itself; where compiling is impossible (no C++ compiler, a
        graph whose shapes depend on input values, an inductor error) it warns and runs eagerly.

    Example::

        module = graph.to_module(inputs=["x:0"], outputs="probs:0").eval()
        fast = compile_module(module)
        with torch.no_grad():
            probs = fast(batch)          # the first call compiles
    """
    return CompiledModule(module)
