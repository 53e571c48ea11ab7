"""TF1 variables (VariableV2 + Assign initializer + Identity read) and the Saver subgraph that saves
and restores them with SaveV2/RestoreV2, as ``tf.compat.v1.train.Saver`` builds it.

A variable ``fc1.weight`` becomes the nodes ``fc1/weight`` (VariableV2), ``fc1/weight/Initializer/zeros``
(a Const storing one zero), ``fc1/weight/Assign`` and ``fc1/weight/read``; its value lives in the
checkpoint under ``fc1/weight``. The initializer holds zeros so the ``.meta`` stays small: the trained
values come from ``saver.restore``.

A weight is created when an op first reads it, in the layout the converters asked of it on the way
(a Conv2d filter transposed to HWIO, a Linear weight to ``[in, out]``): TensorFlow then reads it
as it is, with no Transpose per run. The steps are recorded (``formats/tf_layouts.py``) so that
``restore``, ``load`` and ``convert`` map the variables back to the ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tensorboard.compat.proto import saver_pb2, variable_pb2

from lightning_saver.formats import tf_dtypes, tf_layouts
from lightning_saver.graph.tf_export.builder import GraphBuilder, LazyVariable, TfTensor, splat_proto


@dataclass
class Variable:
    key: str  # the state_dict key
    name: str  # the VariableV2 node name (and checkpoint key)
    value: np.ndarray
    trainable: bool
    ref: TfTensor
    proto: variable_pb2.VariableDef
    torch_shape: tuple[int, ...] = ()
    steps: tuple[tuple[str, tuple[int, ...]], ...] = ()
    read: TfTensor | None = None

    def node_names(self) -> tuple[str, ...]:
        """The nodes the VariableDef names (kept in the graph whether or not an op reads them)."""
        return tuple(ref.split(":")[0] for ref in (self.proto.variable_name, self.proto.initial_value_name,
                                                    self.proto.initializer_name, self.proto.snapshot_name))


class VariableStore:
    """Creates variables in a GraphBuilder and, at the end, the Saver subgraph for them."""

    def __init__(self, g: GraphBuilder) -> None:
        self.g = g
        self.variables: list[Variable] = []
        self._pending: dict[str, tuple[np.ndarray, bool]] = {}
        self._created: dict[str, Variable] = {}
        g.materialize = self.materialize

    def add(self, key: str, value: np.ndarray, *, trainable: bool) -> TfTensor:
        """A lazy read of state_dict entry ``key``: its variable is made when an op reads it."""
        self._pending[key] = (value, trainable)
        return TfTensor("", tf_dtypes.from_numpy(value.dtype), tuple(value.shape), lazy=LazyVariable(key))

    def materialize(self, x: TfTensor) -> TfTensor:
        """The graph tensor for lazy ``x``: the variable's read, created in ``x``'s layout the first time;
        a later read in another layout is computed from it with ops."""
        lazy = x.lazy
        assert lazy is not None
        made = self._created.get(lazy.key)
        if made is None:
            value, trainable = self._pending.pop(lazy.key)
            made = self._create(lazy.key, value, trainable, lazy.steps)
        assert made.read is not None
        if made.steps == lazy.steps:
            return made.read
        g, y = self.g, made.read
        befores = tf_layouts.shapes_along(made.torch_shape, made.steps)[:-1]
        for (kind, arg), before in zip(reversed(made.steps), reversed(befores), strict=True):
            # back to torch's layout, then on to the one asked
            y = g.transpose(y, np.argsort(arg)) if kind == "transpose" else g.reshape(y, list(before))
        for kind, arg in lazy.steps:
            y = g.transpose(y, arg) if kind == "transpose" else g.reshape(y, list(arg))
        return y.with_meta(x.dtype, x.shape)

    def finish(self) -> None:
        """Create the variables no op read (kept so the checkpoint holds the whole state_dict)."""
        for key in list(self._pending):
            value, trainable = self._pending.pop(key)
            self._create(key, value, trainable, ())

    def layouts(self) -> bytes:
        """The layout record for the ``.meta`` (``formats/tf_layouts.py``)."""
        return tf_layouts.encode({v.name: (v.key, v.torch_shape, v.steps) for v in self.variables})

    def _create(self, key: str, torch_value: np.ndarray, trainable: bool,
                steps: tuple[tuple[str, tuple[int, ...]], ...]) -> Variable:
        g = self.g
        scope, g.scope = g.scope, ""
        value = tf_layouts.apply_steps(torch_value, steps)
        dtype = tf_dtypes.from_numpy(value.dtype)
        shape = tuple(value.shape)
        var = g.op("VariableV2", name=key.replace(".", "/"), scoped=False, shape=shape, dtype=dtype)
        var = var.with_meta(dtype, shape)
        name = var.node_name
        zeros = g.op("Const", name=f"{name}/Initializer/zeros", scoped=False,
                     value=splat_proto(dtype, shape), dtype=dtype).with_meta(dtype, shape)
        assign = g.op("Assign", var, zeros, name=f"{name}/Assign", scoped=False)
        read = g.op("Identity", var, name=f"{name}/read", scoped=False).with_meta(dtype, shape)
        proto = variable_pb2.VariableDef(
            variable_name=var.tensor_name, initial_value_name=zeros.tensor_name,
            initializer_name=assign.node_name, snapshot_name=read.tensor_name, trainable=trainable)
        made = Variable(key, name, value, trainable, var, proto, tuple(torch_value.shape), steps, read)
        self.variables.append(made)
        self._created[key] = made
        g.scope = scope
        return made

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        """Checkpoint key -> value, for ``write_checkpoint``."""
        return {v.name: v.value for v in self.variables}

    def add_saver(self) -> saver_pb2.SaverDef:
        """The ``save/`` subgraph (SaveV2, RestoreV2, Assigns) and the SaverDef naming its tensors."""
        g = self.g
        g.scope = ""
        variables = sorted(self.variables, key=lambda v: v.name)
        names = np.asarray([v.name for v in variables], dtype=object)
        slices = np.asarray([""] * len(variables), dtype=object)
        default = g.const(np.asarray("model", dtype=object), name="save/filename")
        prefix = g.op("PlaceholderWithDefault", default, name="save/Const", scoped=False, shape=())
        save = g.op("SaveV2", prefix, g.const(names, name="save/SaveV2/tensor_names"),
                    g.const(slices, name="save/SaveV2/shape_and_slices"), [v.ref for v in variables],
                    name="save/SaveV2", scoped=False)
        saved = g.op("Identity", prefix, name="save/control_dependency", scoped=False, control=[save])
        restored = g.op("RestoreV2", prefix, g.const(names, name="save/RestoreV2/tensor_names"),
                        g.const(slices, name="save/RestoreV2/shape_and_slices"), name="save/RestoreV2",
                        scoped=False, dtypes=[v.ref.dtype for v in variables])
        if isinstance(restored, TfTensor):
            restored = [restored]
        assigns = [g.op("Assign", v.ref, out, name="save/Assign", scoped=False).node_name
                   for v, out in zip(variables, restored, strict=True)]
        restore_all = g.op("NoOp", name="save/restore_all", scoped=False, control=assigns)
        return saver_pb2.SaverDef(
            filename_tensor_name=prefix.tensor_name, save_tensor_name=saved.tensor_name,
            restore_op_name=restore_all, max_to_keep=5, keep_checkpoint_every_n_hours=10000.0,
            version=saver_pb2.SaverDef.V2)

