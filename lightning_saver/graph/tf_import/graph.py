"""``ImportedGraph``: a TensorFlow MetaGraph you can run, restore, and turn into a torch module."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.attrs import decode_shape, decode_type
from lightning_saver.graph.tf_import.calls import MAX_CALLS, Call, call_key, checker
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, parse_tensor_name, ref_name
from lightning_saver.graph.tf_import.plan import Plan, compile_plan
from lightning_saver.graph.tf_import.variables import VariableInfo, VariableStore, find_variables


@dataclass(frozen=True)
class Tensor:
    """A handle on one output of a node, like ``tf.Tensor`` in a graph: ``name`` is ``"op:index"``."""

    op_name: str
    value_index: int
    op_type: str
    dtype: torch.dtype | str | None
    shape: tuple[int, ...] | None  # the ``_output_shapes`` hint (-1 unknown), when the graph has one

    @property
    def name(self) -> str:
        return f"{self.op_name}:{self.value_index}"

    @property
    def ref(self) -> Ref:
        return (self.op_name, self.value_index)


def _dtype_hint(node: Any, index: int) -> torch.dtype | str | None:
    for key in ("dtype", "T", "out_type", "DstT", "output_type"):
        if key in node.attr and node.attr[key].WhichOneof("value") == "type":
            return decode_type(node.attr[key].type)
    if "T" in node.attr and node.attr["T"].list.type and index < len(node.attr["T"].list.type):
        return decode_type(node.attr["T"].list.type[index])
    return None


def _flatten(fetches: Any, leaves: list[Any]) -> Any:
    """Collect the leaves of a fetch structure; return a rebuilder taking an iterator of results."""
    if isinstance(fetches, Mapping):
        builders = {k: _flatten(v, leaves) for k, v in fetches.items()}
        return lambda it: type(fetches)({k: b(it) for k, b in builders.items()})
    if isinstance(fetches, (list, tuple)):
        builders_list = [_flatten(v, leaves) for v in fetches]
        if isinstance(fetches, tuple) and hasattr(fetches, "_fields"):
            return lambda it: type(fetches)(*[b(it) for b in builders_list])
        return lambda it: type(fetches)(b(it) for b in builders_list)
    leaves.append(fetches)
    return lambda it: next(it)


_LEAVES = (str, Tensor)


class ImportedGraph:
    """A parsed MetaGraph with its variables; see ``import_meta_graph`` for the whole tour."""

    def __init__(self, meta_graph_def: Any) -> None:
        self.meta_graph_def = meta_graph_def
        self._index = GraphIndex(meta_graph_def)
        self.variables: dict[str, VariableInfo] = find_variables(self._index)
        self._store = VariableStore(self.variables, self._initialize)
        self._plans: dict[tuple[tuple[Ref, ...], frozenset[Ref]], Plan] = {}
        self._initializing: set[str] = set()
        self._feed_specs: dict[Ref, tuple[Any, list[int] | None]] = {}
        self._refs: dict[str, Ref] = {}
        self._calls: dict[tuple[Any, ...], Call] = {}  # run's signatures (see calls.py)

    # ---- names -------------------------------------------------------------------------------
    def get_tensor_by_name(self, name: str) -> Tensor:
        """The tensor ``"y:0"``; ``"y"`` means its first output.

        Raises:
            GraphImportError: no such node, or the node has fewer outputs than the index asks.

        Example::

            y = graph.get_tensor_by_name("y")   # Tensor(op_name='y', value_index=0, ...)
        """
        op_name, index = parse_tensor_name(name)
        node = self._index.node(op_name, f"get_tensor_by_name({name!r})")
        op_def = self._index.op_defs.get(node.op)
        if op_def is not None and len(op_def.output_arg) == 1 and not (
            op_def.output_arg[0].number_attr or op_def.output_arg[0].type_list_attr
        ) and index > 0:
            raise GraphImportError(
                f"tensor {name!r}: op {op_name!r} ({node.op}) has only one output, {op_name}:0"
            )
        hint = self._index.output_shape_hint((op_name, index))
        shape = None if hint is None else tuple(hint)
        return Tensor(op_name, index, node.op, _dtype_hint(node, index), shape)

    def get_operation_names(self) -> list[str]:
        """Every node name in the graph, in GraphDef order."""
        return list(self._index.nodes)

    def _ref(self, item: Any) -> Ref:
        if isinstance(item, Tensor):
            return item.ref
        if isinstance(item, str):
            known = self._refs.get(item)
            if known is not None:
                return known
            ref = parse_tensor_name(item)
            if ref[1] < 0:
                raise GraphImportError(f"{item!r} is a control input; fetch the op name {ref[0]!r} instead")
            self._index.node(ref[0], f"the fetch {item!r}")
            self._refs[item] = ref
            return ref
        raise TypeError(
            f"fetches and feed_dict keys must be tensor names or Tensors, got {type(item).__name__}"
        )

    # ---- running -----------------------------------------------------------------------------
    def plan(self, fetches: list[Ref], feeds: frozenset[Ref]) -> Plan:
        """The cached compiled plan for these fetches and fed tensors."""
        key = (tuple(fetches), feeds)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = compile_plan(self._index, self._store, fetches, feeds)
        return plan

    def _feed_spec(self, ref: Ref) -> tuple[Any, list[int] | None]:
        spec = self._feed_specs.get(ref)
        if spec is None:
            node = self._index.nodes[ref[0]]
            shape = None
            if node.op in ("Placeholder", "PlaceholderWithDefault") and "shape" in node.attr:
                shape = decode_shape(node.attr["shape"].shape)
            spec = self._feed_specs[ref] = (_dtype_hint(node, ref[1]), shape)
        return spec

    def _evaluate(self, fetches: list[Ref], feeds: dict[Ref, torch.Tensor]) -> list[Any]:
        plan = self.plan(fetches, frozenset(feeds))
        with torch.no_grad():
            return plan.execute(feeds)

    def run(self, fetches: Any, feed_dict: Mapping[Any, Any] | None = None) -> Any:
        """Compute ``fetches`` like ``session.run``: numpy values in the same list/tuple/dict shape.

        Args:
            fetches: a tensor name (``"y:0"``; ``"y"`` is its first output), a ``Tensor``, or a
                list, tuple, namedtuple or dict of them. An op with no outputs (NoOp, an init
                group) gives None after running.
            feed_dict: tensor name or ``Tensor`` -> value (numpy, torch, Python); any tensor may be
                fed, not only placeholders.

        Returns:
            numpy arrays (numpy scalars for 0-d tensors), shaped like ``fetches``.

        Raises:
            UnsupportedOpError: an op the fetches need has no converter.
            GraphImportError: an unfed placeholder, a bad name, or a wrongly shaped feed.

        Example::

            graph.run(["logits:0", "probs:0"], feed_dict={"x:0": batch})  # [array(...), array(...)]
        """
        key = call_key(fetches, feed_dict, _LEAVES)
        call = None if key is None else self._calls.get(key)
        if call is None:
            call = self._call(fetches, feed_dict)
            if key is not None:
                if len(self._calls) >= MAX_CALLS:
                    self._calls.pop(next(iter(self._calls)))
                self._calls[key] = call
        return call(feed_dict)

    def _call(self, fetches: Any, feed_dict: Mapping[Any, Any] | None) -> Call:
        """``run``'s names, feed converters and plan for this signature (see ``calls.py``)."""
        leaves: list[Any] = []
        rebuild = _flatten(fetches, leaves)
        refs = [self._ref(leaf) for leaf in leaves]
        feed_refs = [self._ref(key) for key in (feed_dict or {})]
        converters = [checker(ref, *self._feed_spec(ref)) for ref in feed_refs]
        plan = self.plan(refs, frozenset(feed_refs))
        return Call(rebuild, isinstance(fetches, _LEAVES), feed_refs, converters, plan.execute)

    # ---- variables ---------------------------------------------------------------------------
    def _initialize(self, name: str) -> torch.Tensor:
        info = self.variables[name]
        hint = "; restore a checkpoint first with graph.restore(path)"
        if info.initial_value is None:
            raise GraphImportError(
                f"variable {name!r} has no value: it was not restored and has no initializer{hint}"
            )
        if name in self._initializing:
            raise GraphImportError(f"variable {name!r}: its initializer reads the variable itself{hint}")
        self._initializing.add(name)
        try:
            return self._evaluate([info.initial_value], {})[0]
        except Exception as err:
            raise GraphImportError(
                f"variable {name!r} has no value: it was not restored, and its initializer "
                f"{ref_name(info.initial_value)} could not run ({type(err).__name__}: {err}){hint}"
            ) from err
        finally:
            self._initializing.discard(name)

    def variable_values(self) -> dict[str, torch.Tensor]:
        """The current value of every variable that has one (restored, assigned or initialised)."""
        return dict(self._store.values)

    def restore(self, path: Any, *, strict: bool = False) -> list[str]:
        """Load variable values from a TF checkpoint prefix or one of our ``.safetensors`` files.

        See ``restore.py`` for the key matching rules. Returns the restored variable names.
        """
        from lightning_saver.graph.tf_import.restore import restore_variables

        return restore_variables(self._store, path, strict=strict)

    def signature(self, key: str = "serving_default") -> tuple[list[str], list[str]]:
        """The (input, output) tensor names of a ``signature_def``, ordered by their keys.

        Raises:
            GraphImportError: the MetaGraph has no such signature (names the ones it has).
        """
        signatures = self.meta_graph_def.signature_def
        if key not in signatures:
            if len(signatures) == 1 and key == "serving_default":
                key = next(iter(signatures))
            else:
                raise GraphImportError(
                    f"the MetaGraph has no signature {key!r} (it has {sorted(signatures) or 'none'}); "
                    "pass inputs=[...] and outputs=[...] tensor names"
                )
        sig = signatures[key]

        def natural(name: str) -> list[Any]:  # output_2 before output_10
            return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

        return ([sig.inputs[k].name for k in sorted(sig.inputs, key=natural)],
                [sig.outputs[k].name for k in sorted(sig.outputs, key=natural)])

    def to_module(self, inputs: Any = None, outputs: Any = None) -> torch.fx.GraphModule:
        """A ``torch.fx.GraphModule`` computing ``outputs`` from ``inputs``; see ``module.py``.

        Without ``inputs``/``outputs`` the ``serving_default`` signature gives them (outputs then
        come back as a tuple in the order of the signature's output keys).

        Example::

            module = graph.to_module(inputs=["x:0"], outputs="logits:0")   # module(x) -> logits
        """
        from lightning_saver.graph.tf_import.module import build_module

        if inputs is None or outputs is None:
            sig_inputs, sig_outputs = self.signature()
            inputs = sig_inputs if inputs is None else inputs
            outputs = sig_outputs if outputs is None else outputs
        in_refs = [self._ref(i) for i in ([inputs] if isinstance(inputs, (str, Tensor)) else inputs)]
        single = isinstance(outputs, (str, Tensor))
        out_refs = [self._ref(o) for o in ([outputs] if single else outputs)]
        if not out_refs:
            raise GraphImportError("to_module needs at least one output, e.g. outputs=['logits:0']")
        plan = compile_plan(self._index, self._store, out_refs, frozenset(in_refs))
        module = build_module(plan, self._index, self._store, in_refs, single)
        module.tf_outputs = [ref_name(r) for r in out_refs]  # the names asked for, not what they alias
        return module
