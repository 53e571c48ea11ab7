"""Walk a captured fx graph (core ATen) and emit TensorFlow nodes through the op table."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.capture import describe_node, module_path
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.table import Ctx, load_converters, meta_dtype, meta_shape
from lightning_saver.graph.tf_export.variables import VariableStore


@dataclass
class Converted:
    """The graph's inputs (by argument name) and outputs, in the order the model returns them."""

    inputs: dict[str, TfTensor] = field(default_factory=dict)
    outputs: list[TfTensor] = field(default_factory=list)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def convert(program: torch.export.ExportedProgram, g: GraphBuilder, store: VariableStore | None) -> Converted:
    """Emit ``program`` into ``g``; weights become variables in ``store``, or constants when it is None."""
    table = load_converters()
    sig = program.graph_signature
    env: dict[torch.fx.Node, Any] = {}
    result = Converted()
    for node in program.graph.nodes:
        g.scope = module_path(node).replace(".", "/")
        if node.op == "placeholder":
            env[node] = _placeholder(node, program, g, store, result)
        elif node.op == "call_function" and node.target is operator.getitem:
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "call_function":
            if node.target not in table:
                raise UnsupportedOpError(
                    f"TensorFlow export has no converter for op {node.target} {describe_node(node)}. "
                    f"{len(table)} ATen ops are supported; rewrite that part of the model, or register a "
                    f"converter with @TF_EXPORT.register({node.target}) (see tf_export/table.py).")
            converter = table.lookup(node.target)
            args = torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            try:
                out = converter(Ctx(g, node), *args, **kwargs)
            except UnsupportedOpError as error:  # say where in the model the attribute came from
                raise UnsupportedOpError(f"{error} (op {node.target} {describe_node(node)})") from None
            env[node] = _with_meta(out, node.meta.get("val"))
        elif node.op == "output":
            g.scope = ""
            user = {spec.arg.name for spec in sig.output_specs
                    if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT}
            for i, value in enumerate(node.args[0]):
                if isinstance(value, torch.fx.Node) and value.name not in user:
                    continue
                tensor = env[value] if isinstance(value, torch.fx.Node) else g.const(np.asarray(value))
                out = g.op("Identity", tensor, name=f"output_{i}", out_shape=tensor.shape)
                result.outputs.append(out.with_meta(tensor.dtype, tensor.shape))
    return result


def _with_meta(out: Any, val: Any) -> Any:
    """The converter's result with torch's recorded dtype and shape (per element for several outputs)."""
    if isinstance(out, TfTensor) and isinstance(val, torch.Tensor | torch.SymInt):
        return out.with_meta(meta_dtype(val), meta_shape(val))
    if isinstance(out, list | tuple) and isinstance(val, list | tuple) and len(out) == len(val):
        return [_with_meta(o, v) for o, v in zip(out, val, strict=True)]
    return out


def _placeholder(node: torch.fx.Node, program: torch.export.ExportedProgram, g: GraphBuilder,
                 store: VariableStore | None, result: Converted) -> TfTensor:
    sig = program.graph_signature
    name = node.name
    if name in sig.inputs_to_parameters or name in sig.inputs_to_buffers:
        trainable = name in sig.inputs_to_parameters
        key = sig.inputs_to_parameters[name] if trainable else sig.inputs_to_buffers[name]
        persistent = key in program.state_dict
        tensor = program.state_dict[key] if persistent else program.constants[key]
        if store is not None and persistent:
            return store.add(key, to_numpy(tensor), trainable=trainable)
        return g.const(to_numpy(tensor), name=key.replace(".", "/"))
    if name in sig.inputs_to_lifted_tensor_constants:
        key = sig.inputs_to_lifted_tensor_constants[name]
        return g.const(to_numpy(program.constants[key]), name=key)
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"TensorFlow export: input {name!r} is a {type(val).__name__}; only tensors "
                        "can be graph inputs (other values are baked in when captured)")
    placeholder = g.placeholder(name, tf_dtypes.from_torch(val.dtype), meta_shape(val))
    result.inputs[name] = placeholder
    return placeholder
