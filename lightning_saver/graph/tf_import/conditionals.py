"""TF1 ``tf.cond`` (``Switch``/``Merge`` decided at run time) turned into structured if/else steps.

TF1 writes ``tf.cond(p, then, else)`` as dataflow: each tensor a branch reads passes a
``Switch(x, p)`` (output 1 is live when ``p`` is true, output 0 when it is false, the other one is
*dead*), the branch's ops run on the live side, and each result is a ``Merge(else_value,
then_value)`` that forwards the live one. Here the plan's steps are analysed once, after
compiling: each step gets its *guard*, the (predicate, branch) pairs it is live under, and each
``Merge`` that joins the two branches of one predicate *ends* it. The steps under a predicate
decided at this level become one step calling a ``Conditional``: two lists of steps (the then
and else branches, with the Switches replaced by their data and the Merges by the branch's input),
of which only the taken one runs. Conditionals inside a branch (nested ``tf.cond``, or a cond in a
``while_loop`` body, which is compiled as a plan of its own) are handled the same way, one level
down. ``to_module`` builds each branch as a GraphModule under a ``BranchModule``, so its forward is
a Python ``if`` on the predicate, and autograd follows the branch taken.

Graphs that ``tf.cond`` does not write (a tensor of a branch read after the cond, a Merge of two
unrelated predicates) raise ``NotStructured`` and keep the dead-tensor executor of ``cond.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_saver.graph.tf_import.cond import MERGE_OPS, SWITCH_OPS, merge_index, run_step, switch_outputs
from lightning_saver.graph.tf_import.functions import pick_branch
from lightning_saver.graph.tf_import.importer import Ref, ref_name

Guard = frozenset[tuple[Ref, int]]
_EMPTY: Guard = frozenset()


class NotStructured(Exception):
    """The Switch/Merge steps are not a set of nested ``tf.cond``s (the reason is the message)."""


@dataclass
class Branch:
    """Steps run in order on the conditional's inputs; ``outputs`` are read from them after."""

    steps: list[Any]
    outputs: list[Ref]


@dataclass
class Conditional:
    """``then if pred else otherwise``, or the branch an index picks (``_SwitchN``, kind "case"):
    ``__call__(selector, *inputs)`` runs one branch and returns its outputs."""

    name: str
    inputs: list[Ref]
    branches: list[Branch]  # as ``If`` ([then, else]: a true predicate picks 0) or ``Case``
    kind: str = field(default="if")

    def __call__(self, selector: Any, *values: Any) -> tuple[Any, ...]:
        branch = self.branches[pick_branch(self.kind, selector, len(self.branches))]
        env = dict(zip(self.inputs, values, strict=True))
        return tuple(run_steps(branch.steps, env, branch.outputs))


def run_steps(steps: list[Any], env: dict[Ref, Any], outputs: list[Ref]) -> list[Any]:
    """Run plan steps in order on ``env``; the values of ``outputs``."""
    for step in steps:
        run_step(step, env)
    return [env[r] for r in outputs]


def walk_steps(steps: list[Any]) -> list[Any]:
    """``steps`` and, recursively, the steps of the conditionals among them."""
    found = []
    for step in steps:
        found.append(step)
        if isinstance(step.func, Conditional):
            for branch in step.func.branches:
                found.extend(walk_steps(branch.steps))
    return found


class _Guards:
    """Each step's guard, each Switch's predicate, and what each Merge does (see the module docstring)."""

    def __init__(self, steps: list[Any]) -> None:
        self.guard: dict[str, Guard] = {}
        self.pred: dict[str, Ref] = {}
        self.ends: dict[str, Ref] = {}  # Merge -> the predicate whose branches it joins
        self.arity: dict[Ref, int] = {}  # predicate -> its Switches' outputs (branches)
        self.indexed: set[Ref] = set()  # predicates of _SwitchN: an index, not a boolean
        self.first: dict[str, int] = {}  # Merge -> the input it always forwards
        for step in steps:
            controls = _EMPTY.union(*[self.of(c) for c in step.controls])
            if step.op in MERGE_OPS:  # TF's executor: a Merge's control inputs order it, dead or not
                self.guard[step.name] = self._merge(step)
            else:
                self.guard[step.name] = _EMPTY.union(*[self.of(r) for r in step.inputs]) | controls
            if step.op in SWITCH_OPS:
                self.pred[step.name] = step.inputs[1]
                count = switch_outputs(step.op, step.kwargs)
                if step.op == "_SwitchN":
                    self.indexed.add(step.inputs[1])
                if self.arity.setdefault(step.inputs[1], count) != count:
                    raise NotStructured(f"Switch {step.name!r} has {count} outputs, another on its predicate "
                                        f"{self.arity[step.inputs[1]]}")

    def of(self, ref: Ref) -> Guard:
        found = self.guard.get(ref[0], _EMPTY)
        pred = self.pred.get(ref[0])
        return found if pred is None else found | {(pred, ref[1])}

    def _merge(self, step: Any) -> Guard:
        seen = [(k, self.of(r)) for k, r in enumerate(step.inputs)]
        live = [(k, g) for k, g in seen if not dead(g)]
        if not live:
            return frozenset(g for _, guard in seen for g in guard)  # dead under every branch
        common = frozenset.intersection(*[g for _, g in live])
        rest = [(k, g - common) for k, g in live]
        if not rest[0][1]:  # live whenever the Merge is: it is always the one forwarded
            self.first[step.name] = rest[0][0]
            return common
        preds = {p for _, g in rest for p, _ in g}
        sides = {b for _, g in rest for _, b in g}
        if len(preds) != 1 or any(len(g) != 1 for _, g in rest) or \
                sides != set(range(self.arity.get(next(iter(preds)), 2))):
            raise NotStructured(f"Merge {step.name!r} does not join the branches of one tf.cond")
        self.ends[step.name] = preds.pop()
        return common


def dead(guard: Guard) -> bool:
    """Live under two branches of one predicate: never runs."""
    seen: dict[Ref, int] = {}
    return any(seen.setdefault(p, b) != b for p, b in guard)


class _Level:
    """Structures one list of steps (a plan's, or a branch's); the branches recurse."""

    def __init__(self, steps: list[Any], outputs: list[Ref], consts: dict[Ref, Any], names: set[str]) -> None:
        self.steps, self.outputs, self.consts, self.names = steps, outputs, consts, names
        self.g = _Guards(steps)

    def structure(self) -> tuple[list[Any], list[Ref]]:
        g = self.g
        tops = {g.pred[s.name] for s in self.steps if s.op in SWITCH_OPS and not g.guard[s.name]}
        remap: dict[Ref, Ref] = {}
        rest: list[Any] = []
        members: dict[Ref, list[Any]] = {}
        skipped: set[str] = set()
        for step in self.steps:
            guard = g.guard[step.name]
            if dead(guard):
                skipped.add(step.name)
                continue
            step = replace(step, inputs=tuple(remap.get(r, r) for r in step.inputs),
                           controls=tuple(remap.get(c, c) for c in step.controls))
            if step.name in g.first and not guard:  # forwards one input: another name for it
                remap[(step.name, 0)] = step.inputs[g.first[step.name]]
                remap[(step.name, 1)] = self.index_const(merge_index(step, g.first[step.name]))
                continue
            preds = {p for p, _ in guard}
            if step.op in SWITCH_OPS and not guard:
                preds.add(g.pred[step.name])
            if step.name in g.ends and not guard:
                preds.add(g.ends[step.name])
            if not preds:
                rest.append(step)
                continue
            if len(preds & tops) != 1:
                raise NotStructured(f"node {step.name!r} is live under {len(preds & tops)} conditionals "
                                    "decided at the same level")
            members.setdefault((preds & tops).pop(), []).append(step)
        outputs = [remap.get(r, r) for r in self.outputs]
        if any(r[0] in skipped for r in outputs):
            raise NotStructured("a fetched tensor is in a branch that never runs")
        groups = list(members.items())
        placed = self.place(rest, groups, outputs, remap)
        if placed is None:  # a step outside reads one cond and feeds another on the same predicate
            groups = [(p, part) for p, steps in groups for part in _components(steps)]
            placed = self.place(rest, groups, outputs, remap)
        if placed is None:
            raise NotStructured("a step outside a tf.cond both reads and feeds it")
        steps, remap = placed
        return self.fold(steps), [remap.get(r, r) for r in outputs]

    def index_const(self, k: int) -> Ref:
        ref = (f"#branch_index_{k}", 0)  # '#' is in no TF node name
        self.consts.setdefault(ref, torch.tensor(k, dtype=torch.int32))
        return ref

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def place(self, rest: list[Any], groups: list[tuple[Ref, list[Any]]], outputs: list[Ref],
              remap: dict[Ref, Ref]) -> tuple[list[Any], dict[Ref, Ref]] | None:
        """Each group as one conditional step among ``rest``, in an order where reads follow writes,
        and ``remap`` with where the groups' outputs are read from; None when no such order exists."""
        remap = dict(remap)
        items: list[tuple[int, Any]] = []
        position = {s.name: i for i, s in enumerate(self.steps)}
        readers: dict[Ref, set[int]] = {r: {-1} for r in outputs}  # ref -> the groups reading it (-1: rest)
        for k, steps in [(-1, rest)] + [(k, steps) for k, (_, steps) in enumerate(groups)]:
            for step in steps:
                for ref in step.inputs + step.controls:
                    readers.setdefault(ref, set()).add(k)
        for k, (pred, steps) in enumerate(groups):
            names = {s.name for s in steps}
            wanted = sorted(r for r, by in readers.items() if r[0] in names and by - {k})
            step = self.conditional(pred, steps, wanted)
            remap.update({ref: (step.name, j) for j, ref in enumerate(wanted)})
            items.append((position[steps[0].name], step))
        items.extend((position[s.name], s) for s in rest)
        items.sort(key=lambda item: item[0])
        ordered = [replace(s, inputs=tuple(remap.get(r, r) for r in s.inputs),
                           controls=tuple(remap.get(c, c) for c in s.controls)) for _, s in items]
        placed = _topological(ordered)
        return None if placed is None else (placed, remap)

    def conditional(self, pred: Ref, steps: list[Any], outputs: list[Ref]) -> Any:
        """The step running ``steps`` (all under ``pred``) as if/else, producing ``outputs`` in order."""
        g = self.g
        for ref in outputs:
            if g.ends.get(ref[0]) != pred or g.guard[ref[0]]:
                raise NotStructured(f"tensor {ref_name(ref)} of a tf.cond branch is read outside the cond")
        count = g.arity[pred]
        branches = []
        kind = "case" if pred in g.indexed else "if"
        for taken in (range(count) if kind == "case" else (1, 0)):
            branch_steps, branch_outputs = self.branch(pred, taken, steps, outputs)
            level = _Level(branch_steps, branch_outputs, self.consts, self.names)
            branches.append(Branch(*level.structure()))
        inputs: dict[Ref, None] = {}
        for branch in branches:
            made = {s.name for s in branch.steps}
            for ref in [r for s in branch.steps for r in s.inputs] + branch.outputs:
                if ref[0] not in made:
                    inputs[ref] = None
        for ref in inputs:
            if ref not in self.consts and g.of(ref):
                raise NotStructured(f"tf.cond on {ref_name(pred)} reads {ref_name(ref)}, which is itself "
                                    "inside a conditional")
        names = {s.name for s in steps}
        controls = tuple(dict.fromkeys(c for s in steps for c in s.controls if c[0] not in names))
        name = self.fresh(f"{ref_name(pred)}#if")
        func = Conditional(name, list(inputs), branches, kind)
        return replace(steps[0], name=name, op="If", kind="function", func=func, inputs=(pred, *inputs),
                       kwargs={}, variable=None, controls=controls, pure=False)

    def branch(self, pred: Ref, taken: int, steps: list[Any],
               outputs: list[Ref]) -> tuple[list[Any], list[Ref]]:
        """The steps live when ``pred`` picks output ``taken``, with its Switches and Merges resolved."""
        g = self.g
        alias: dict[Ref, Ref] = {}
        kept = []
        for step in steps:
            guard = g.guard[step.name]
            if any(p == pred and b != taken for p, b in guard) or dead(guard):
                continue
            if step.op in SWITCH_OPS and g.pred[step.name] == pred:
                alias[(step.name, taken)] = alias.get(step.inputs[0], step.inputs[0])
                continue
            if step.name in g.first or g.ends.get(step.name) == pred:
                if step.name in g.first:
                    k = g.first[step.name]
                else:
                    k = next(k for k, r in enumerate(step.inputs) if (pred, taken) in g.of(r))
                alias[(step.name, 0)] = alias.get(step.inputs[k], step.inputs[k])
                alias[(step.name, 1)] = self.index_const(merge_index(step, k))
                continue
            kept.append(step)
        dropped = {r[0] for r in alias}
        kept = [replace(s, inputs=tuple(alias.get(r, r) for r in s.inputs),
                        controls=tuple(c for c in s.controls if c[0] not in dropped)) for s in kept]
        return kept, [alias.get(r, r) for r in outputs]

    def fold(self, steps: list[Any]) -> list[Any]:
        """Pure steps on constants (a branch's constants hang off its Switch by control edges): folded."""
        kept = []
        for step in steps:
            if step.kind == "call" and step.pure and all(r in self.consts for r in step.inputs):
                try:
                    out = step.func(*[self.consts[r] for r in step.inputs], **step.kwargs)
                except Exception:  # noqa: BLE001 - raised if the branch runs, as in TensorFlow
                    kept.append(step)
                    continue
                if type(out) is tuple or type(out) is list:
                    for k, value in enumerate(out):
                        self.consts[(step.name, k)] = value
                else:
                    self.consts[(step.name, 0)] = out
                continue
            kept.append(step)
        return kept


def _components(steps: list[Any]) -> list[list[Any]]:
    """``steps`` split into the parts connected by their own data and control edges."""
    root = {s.name: s.name for s in steps}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    for step in steps:
        for ref in step.inputs + step.controls:
            if ref[0] in root:
                root[find(ref[0])] = find(step.name)
    parts: dict[str, list[Any]] = {}
    for step in steps:
        parts.setdefault(find(step.name), []).append(step)
    return list(parts.values())


def _topological(items: list[Any]) -> list[Any] | None:
    """``items`` (in preferred order) with every step after the steps it reads; None on a cycle."""
    index = {s.name: i for i, s in enumerate(items)}
    placed: list[Any] = []
    done: set[str] = set()
    state: dict[str, int] = {}
    for start in items:
        stack = [(start, False)]
        while stack:
            step, expanded = stack.pop()
            if expanded:
                state[step.name] = 2
                done.add(step.name)
                placed.append(step)
                continue
            if state.get(step.name) == 2:
                continue
            if state.get(step.name) == 1:
                return None
            state[step.name] = 1
            stack.append((step, True))
            deps = {r[0] for r in step.inputs + step.controls if r[0] in index and r[0] != step.name}
            for dep in sorted(deps, key=index.__getitem__, reverse=True):
                if state.get(dep) == 1:
                    return None
                if state.get(dep) != 2:
                    stack.append((items[index[dep]], False))
    return placed


def structure_conditionals(steps: list[Any], fetches: list[Ref],
                           consts: dict[Ref, Any]) -> tuple[list[Any], list[Ref]] | None:
    """``steps`` with each run-time ``tf.cond`` as one ``Conditional`` step, and the fetches' new refs;
    None when the graph's Switch/Merge steps are not nested ``tf.cond``s (see the module docstring).

    Constant steps of the branches (whose control inputs kept them out of folding) are added to
    ``consts``.
    """
    names = {s.name for s in steps}
    try:
        return _Level(steps, fetches, consts, names).structure()
    except NotStructured:
        return None
