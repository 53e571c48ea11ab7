"""Compile the subgraph a set of fetches needs into an ordered list of steps, once, and run it.

A plan is made per (fetches, fed tensors) and cached by the graph, so ``run`` never walks the
proto again. Constant subgraphs (Const and pure ops on them) are folded while compiling.
Variable nodes produce no step: each consumer gets a ``read`` step just before it, so a read
placed after an Assign (through a control dependency) sees the assigned value, as in TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.attrs import decode_attrs
from lightning_saver.graph.tf_import.cond import (
    MERGE_OPS,
    SWITCH_OPS,
    execute_with_deadness,
    store_outputs,
    switch_output,
    switch_outputs,
)
from lightning_saver.graph.tf_import.conditionals import structure_conditionals, walk_steps
from lightning_saver.graph.tf_import.frames import INTERIOR_OP
from lightning_saver.graph.tf_import.functions import CASE_OPS, FUNCTION_OPS, IF_OPS, function_op
from lightning_saver.graph.tf_import.fuse import fuse_convolutions
from lightning_saver.graph.tf_import.importer import GraphIndex, Ref, execution_order, ref_name
from lightning_saver.graph.tf_import.memory import keep_freed_memory
from lightning_saver.graph.tf_import.ops_list import LIST_OPS
from lightning_saver.graph.tf_import.runner import IN_PLACE, PRIVATE_REFS, Runner
from lightning_saver.graph.tf_import.table import bind_attrs, load_converters
from lightning_saver.graph.tf_import.variables import (
    ASSIGN_OPS,
    VARIABLE_OPS,
    VariableStore,
    resolve_variable,
)

_INITIALIZED_OPS = frozenset({"VarIsInitializedOp", "IsVariableInitialized"})
# pure pass-throughs: no step, their output is another name for their input
_ALIASES = frozenset({"Identity", "Snapshot", "ReadVariableOp", "PreventGradient", "PlaceholderWithDefault"})
# ops whose OpDef is unknown (a GraphDef without stripped_op_list) are folded unless they look stateful
_STATEFUL_WORDS = ("Random", "Variable", "Assign", "Stateful", "Multinomial", "Shuffle", "Save", "Restore")


@dataclass(slots=True)
class Step:
    """One node to run: ``func(*env[inputs], **kwargs)`` stored under ``(name, i)``."""

    name: str
    op: str
    kind: str  # "call", "read" (a variable's value), "assign", "initialized"
    func: Callable[..., Any]
    inputs: tuple[Ref, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    variable: str | None = None
    controls: tuple[Ref, ...] = ()  # only filled in plans with tf.cond (dead inputs propagate)
    pure: bool = False  # a call that may be folded once its inputs are constants


@dataclass
class Plan:
    """Steps in execution order, folded constants, and where the fetches are read from."""

    steps: list[Step]
    consts: dict[Ref, Any]
    fetches: list[Ref]
    feeds: frozenset[Ref]
    store: VariableStore
    conditional: bool = False  # holds Switch/Merge: run with dead-tensor rules (cond.py)

    def __post_init__(self) -> None:
        keep_freed_memory()
        steps = self.steps
        if not self.conditional:
            steps = fuse_convolutions(self.steps, self.fetches, self.consts, Step)
        self.fused_steps = steps  # what run executes and to_module builds from
        # after step i, drop the intermediates nobody reads later, so big batches reuse memory
        last_use: dict[Ref, int] = {}
        for i, step in enumerate(steps):
            for ref in step.inputs:
                if ref not in self.consts and ref not in self.feeds:
                    last_use[ref] = i
        for ref in self.fetches:
            last_use.pop(ref, None)
        drops: list[list[Ref]] = [[] for _ in steps]
        for ref, i in last_use.items():
            drops[i].append(ref)
        produced = {s.name for s in steps if s.kind == "call"}
        # without assignments, a variable reads the same all along: read each once, up front
        pure = not any(s.kind == "assign" for s in walk_steps(steps))  # in if/else branches too
        self._reads = list({(s.name, 0): s.variable for s in steps if pure and s.kind == "read"}.items())
        self._fast_steps: list[Step] = []  # the steps run per call; the runner's line i runs step i
        in_place = set()
        fast = []
        for i, (s, drop) in enumerate(zip(steps, drops, strict=True)):
            if pure and s.kind == "read":
                continue
            if s.op in IN_PLACE and len(s.inputs) == 1 and s.inputs[0][0] in produced \
                    and last_use.get(s.inputs[0]) == i:
                in_place.add(len(fast))
            func = _overwriting(s, i, last_use, produced)
            fast.append((s.name, s.op, func, s.inputs, s.kwargs, tuple(drop)))
            self._fast_steps.append(s)
        self._runner: Runner | None = None
        if not self.conditional:  # run-time tf.cond runs the steps with dead-tensor rules instead
            self._runner = Runner(fast, self._reads, self.consts, self.feeds, self.fetches,
                                  self.store.read, frozenset(in_place), PRIVATE_REFS)

    def execute(self, feeds: dict[Ref, Any]) -> list[Any]:
        """Run the steps on ``feeds`` and return the fetched values in order."""
        runner = self._runner
        if runner is None:  # run-time tf.cond: dead-tensor rules
            env = dict(self.consts)
            env.update(feeds)
            for ref, variable in self._reads:
                env[ref] = self.store.read(variable)
            return execute_with_deadness(self._fast_steps, env, self.fetches)
        try:
            return runner.run(feeds, self.store.values)
        except Exception as err:
            i = runner.failed_step(err.__traceback__)
            if i is not None and hasattr(err, "add_note"):
                step = self._fast_steps[i]
                err.add_note(f"while running TensorFlow node {step.name!r} ({step.op})")
            raise


def _overwriting(step: Step, i: int, last_use: dict[Ref, int], produced: set[str]) -> Callable[..., Any]:
    """The step's function, or the one that may sum into its residual when that dies at step ``i``."""
    if step.kind != "call":
        return step.func
    return sum_into_dying(step.func, step.inputs, lambda ref: ref[0] in produced,
                          lambda ref: last_use.get(ref) == i)


def sum_into_dying(func: Callable[..., Any], args: Sequence[Any], produced: Callable[[Any], bool],
                   dies_here: Callable[[Any], bool]) -> Callable[..., Any]:
    """A fused convolution's ``overwriting`` function when its residual ``args[func.residual_at]`` is
    a step's result (``produced``), passed once, with no reader after this one (``dies_here``); else
    ``func``. The step function still checks at run time that nothing else holds the residual. Shared
    by ``graph.run``'s plan and ``to_module``'s graph, each with its own notion of a reader."""
    at = getattr(func, "residual_at", None)
    if at is None:
        return func
    residual = args[at]
    if produced(residual) and args.count(residual) == 1 and dies_here(residual):
        return func.overwriting  # type: ignore[attr-defined, no-any-return]
    return func


def _no_converter(*args: Any) -> Any:
    raise GraphImportError("Switch/Merge run only inside a conditional plan")


def _foldable(index: GraphIndex, op: str) -> bool:
    if op in ("NoOp", "Placeholder", "Assert") or op in LIST_OPS:
        return False
    op_def = index.op_defs.get(op)
    if op_def is not None:
        return not op_def.is_stateful
    return not any(word in op for word in _STATEFUL_WORDS)


class _Compiler:
    def __init__(self, index: GraphIndex, store: VariableStore, fetches: list[Ref], feeds: frozenset[Ref],
                 context: str = ""):
        self.index, self.store, self.fetches, self.feeds = index, store, fetches, feeds
        self.context = context
        self.steps: list[Step] = []
        self.consts: dict[Ref, Any] = {}
        self.alias: dict[Ref, Ref] = {}
        # a fetched tensor that is also fed comes back as fed, as in session.run
        targets = dict.fromkeys(r[0] for r in fetches if r not in feeds)
        self.order = execution_order(index, targets, set(feeds))
        self.in_plan = set(self.order)
        # tf.cond bookkeeping: a Switch on a constant predicate (a flag left at its default) is
        # decided now; nodes of the untaken branch are dead and never become steps. Nodes after a
        # Switch decided at run time may be dead then, and carry control inputs to check.
        self.dead_refs: set[Ref] = set()
        self.dead_nodes: set[str] = set()
        self.maybe_dead: set[str] = set()
        self.fetched = set(fetches)

    def where(self, name: str) -> str:
        consumers = self.index.describe_consumers(name, self.in_plan)
        if consumers == "nothing else in the graph":
            return f"at node {name!r}{self.context}, which is fetched"
        return f"at node {name!r}{self.context}, which feeds {consumers}"

    def variable_of(self, ref: Ref, name: str) -> str:
        variable = resolve_variable(self.index, ref)
        if variable is None and self.context:  # a variable passed into a function or a loop
            raise GraphImportError(f"node {name!r}{self.context} assigns a variable, which is not supported "
                                   "inside functions and loops")
        if variable is None:
            raise GraphImportError(f"node {name!r} writes to {ref_name(ref)}, which is not a variable")
        return variable

    def read_variables(self, refs: Iterable[Ref]) -> None:
        for ref in refs:
            node = self.index.nodes.get(ref[0])
            if node is not None and node.op in VARIABLE_OPS and ref not in self.feeds:
                read = partial(self.store.read, ref[0])
                self.steps.append(Step(ref[0], node.op, "read", read, (), {}, ref[0]))

    def is_dead(self, ref: Ref) -> bool:
        return ref in self.dead_refs or ref[0] in self.dead_nodes

    def decide_cond(self, name: str, op: str, raw: list[Ref], refs: list[Ref]) -> bool:
        """Fold a Switch on a constant predicate, a Merge with one live input, or a dead node."""
        if op in MERGE_OPS:
            live = [(k, ref) for k, ref in enumerate(refs) if not self.is_dead(raw[k])]
            if not live:  # a Merge's dead control inputs do not kill it
                self.dead_nodes.add(name)
                return True
            if len(live) == 1 and not self.maybe_dead & {r[0] for r in raw}:
                self.alias[(name, 0)] = live[0][1]
                self.consts[(name, 1)] = torch.tensor(live[0][0], dtype=torch.int32)
                return True
            return False
        if any(self.is_dead(r) for r in raw) or any(c in self.dead_nodes for c in self.index.controls[name]):
            self.dead_nodes.add(name)
            return True
        if op in SWITCH_OPS and refs[1] in self.consts and raw[0][0] not in self.maybe_dead:
            count = switch_outputs(op, self.switch_kwargs(name, op))
            taken = switch_output(op, self.consts[refs[1]], count)
            self.alias[(name, taken)] = refs[0]
            self.dead_refs.update((name, k) for k in range(count) if k != taken)
            return True
        return False

    def switch_kwargs(self, name: str, op: str) -> dict[str, Any]:
        return {"num_outs": self.index.nodes[name].attr["num_outs"].i} if op == "_SwitchN" else {}

    def add(self, name: str) -> None:
        node = self.index.nodes[name]
        op = node.op
        raw = self.index.inputs[name]
        refs = [self.alias.get(r, r) for r in raw]
        if self.dead_refs or self.dead_nodes or op in SWITCH_OPS:
            if self.decide_cond(name, op, raw, refs):
                return
        if op in SWITCH_OPS or any(r[0] in self.maybe_dead for r in raw) or \
                any(c in self.maybe_dead for c in self.index.controls[name]):
            self.maybe_dead.add(name)
        controls = tuple(self.alias.get((c, 0), (c, 0)) for c in self.index.controls[name]
                         if c in self.maybe_dead)
        if op in VARIABLE_OPS:
            return
        if op == "NoOp" and name not in self.maybe_dead and (name, 0) not in self.fetched:
            return  # orders nothing here: the plan already runs in dependency order
        if op == INTERIOR_OP:
            frame = node.attr["frame_name"].s.decode()
            raise GraphImportError(
                f"node {name!r}{self.context} is inside the TF1 while_loop frame {frame!r}; only the loop's "
                "Exit tensors can be fetched or fed from outside it"
            )
        if op in FUNCTION_OPS or name in self.index.loops:
            if (op in IF_OPS or op in CASE_OPS) and refs and refs[0] in self.consts:
                # a constant condition (a training flag left at its default) picks the branch now
                func, refs = function_op(self.index, node, self.consts[refs[0]]), refs[1:]
            else:
                func = function_op(self.index, node)
            self.read_variables(refs)
            self.steps.append(Step(name, op, "function", func, tuple(refs), {}, None, controls))
            return
        if op in SWITCH_OPS or op in MERGE_OPS:
            kwargs = self.switch_kwargs(name, op)
            if op in MERGE_OPS:  # inputs from branches decided now never run; value_index counts them
                kept = [k for k, r in enumerate(raw) if not self.is_dead(r)]
                refs, kwargs = [refs[k] for k in kept], {"value_index": tuple(kept)}
            self.read_variables(refs)
            self.steps.append(Step(name, op, "cond", _no_converter, tuple(refs), kwargs, None, controls))
            return
        if op in _ALIASES and len(refs) == 1 and not controls:
            load_converters().lookup(op, self.where(name))
            self.alias[(name, 0)] = refs[0]
            return
        if op == "Placeholder" and (name, 0) in self.feeds:
            return  # reached through a control input (loop constants hang off the loop variables)
        if op == "Placeholder":
            consumers = self.index.describe_consumers(name, self.in_plan)
            raise GraphImportError(
                f"placeholder {name}:0 must be fed: it feeds {consumers}; "
                f"pass feed_dict={{'{name}:0': value}}"
            )
        if op in ASSIGN_OPS:
            variable = self.variable_of(refs[0], name)
            self.read_variables(refs[1:])
            func = partial(self.store.assign, variable, mode=ASSIGN_OPS[op])
            self.steps.append(Step(name, op, "assign", func, tuple(refs[1:]), {}, variable, controls))
            return
        if op in _INITIALIZED_OPS:
            variable = self.variable_of(refs[0], name)
            self.steps.append(Step(name, op, "initialized", partial(self.store.is_initialized, variable), ()))
            return
        func = load_converters().lookup(op, self.where(name))
        kwargs = bind_attrs(func, decode_attrs(node))
        if _foldable(self.index, op) and all(r in self.consts for r in refs) and not controls:
            self.fold(name, func, refs, kwargs)
            return
        self.read_variables(refs)
        self.steps.append(Step(name, op, "call", func, tuple(refs), kwargs, None, controls,
                               _foldable(self.index, op)))

    def fold(self, name: str, func: Callable[..., Any], refs: list[Ref], kwargs: dict[str, Any]) -> None:
        try:
            out = func(*[self.consts[r] for r in refs], **kwargs)
        except GraphImportError as err:  # e.g. a size over the cap: say which node asked for it
            op = self.index.nodes[name].op
            raise GraphImportError(f"while folding node {name!r} ({op}): {err}") from None
        except Exception as err:
            if hasattr(err, "add_note"):
                err.add_note(f"while folding TensorFlow node {name!r} ({self.index.nodes[name].op})")
            raise
        store_outputs(self.consts, name, out)

    def compile(self) -> Plan:
        for name in self.order:
            self.add(name)
        dead = [r for r in self.fetches if r not in self.feeds and self.is_dead(r)]
        if dead:
            raise GraphImportError(f"fetched tensor {ref_name(dead[0])} has no value: it is in a tf.cond "
                                   "branch that was not taken")
        fetches = [r if r in self.feeds else self.alias.get(r, r) for r in self.fetches]
        self.read_variables(fetches)
        steps = self.steps
        conditional = any(step.op in SWITCH_OPS for step in steps)
        if conditional:  # each tf.cond decided at run time becomes an if/else step, where it can
            structured = structure_conditionals(steps, fetches, self.consts)
            if structured is not None:
                (steps, fetches), conditional = structured, False
        return Plan(steps, self.consts, fetches, self.feeds, self.store, conditional)


def compile_plan(index: GraphIndex, store: VariableStore, fetches: list[Ref], feeds: Iterable[Ref],
                 context: str = "") -> Plan:
    """The plan computing ``fetches`` from ``feeds``; see the module docstring.

    ``context`` is added after node names in errors, e.g. `` in function 'cond_true_8'``.

    Raises:
        UnsupportedOpError: an op on the path has no converter (names the node and its consumers).
        GraphImportError: an unfed placeholder, a cycle, a missing node.
    """
    return _Compiler(index, store, list(fetches), frozenset(feeds), context).compile()
