"""TF1 conditionals (``tf.cond`` as ``Switch``/``Merge``) run with TensorFlow's dead-tensor rules:
the fallback for Switch/Merge graphs that ``conditionals.py`` cannot turn into if/else steps.

``Switch(data, pred)`` forwards ``data`` to output 1 when ``pred`` is true, else to output 0; the
other output is *dead*. A node with a dead data or control input is dead itself (so the untaken
branch, whose constants hang off the branch pivot by control edges, never runs), except ``Merge``,
which forwards its first live input and that input's index, and is dead only when all its data
inputs are (its control inputs order it, dead or not). Plans without ``Switch`` never pay
for this: they use the plain loop in ``plan.py``. Loops (``Enter``/``NextIteration``) were cut out
of the graph by ``frames.py`` before."""

from __future__ import annotations

from typing import Any

import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.importer import Ref, ref_name

# _SwitchN(data, index) is what freezing a TF2 Case with lower_control_flow=True writes
SWITCH_OPS = frozenset({"Switch", "RefSwitch", "_SwitchN"})
MERGE_OPS = frozenset({"Merge", "RefMerge"})


def switch_outputs(op: str, kwargs: dict[str, Any]) -> int:
    """How many outputs a Switch has (one per branch)."""
    return int(kwargs.get("num_outs", 2)) if op == "_SwitchN" else 2


def switch_output(op: str, selector: Any, count: int) -> int:
    """The output a Switch forwards its data to: 1 when the predicate is true (0 when false); for
    ``_SwitchN`` the index, out-of-range indices going to the last output (a Case's default)."""
    if op == "_SwitchN":
        index = int(torch.as_tensor(selector))
        return index if 0 <= index < count else count - 1
    tensor = torch.as_tensor(selector)
    return int(bool(tensor) if tensor.numel() == 1 else tensor.numel() > 0)


def merge_index(step: Any, k: int) -> int:
    """The ``value_index`` a Merge step reports for its input ``k`` (inputs dead at compile time are gone)."""
    return step.kwargs.get("value_index", range(k + 1))[k]


def run_step(step: Any, env: dict[Ref, Any]) -> None:
    """Run one plan step on ``env`` and store its outputs there, naming the node in any error."""
    try:
        out = step.func(*[env[r] for r in step.inputs], **step.kwargs)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note(f"while running TensorFlow node {step.name!r} ({step.op})")
        raise
    store_outputs(env, step.name, out)


def store_outputs(env: dict[Ref, Any], name: str, out: Any) -> None:
    """Store a converter's result under ``(name, k)``: each item of a tuple/list, else output 0."""
    if type(out) is tuple or type(out) is list:
        for k, value in enumerate(out):
            env[(name, k)] = value
    else:
        env[(name, 0)] = out


def execute_with_deadness(steps: list[Any], env: dict[Ref, Any], fetches: list[Ref]) -> list[Any]:
    """Run ``steps`` (plan.Step) on ``env`` with dead-tensor propagation; return the fetched values.

    Raises:
        GraphImportError: a fetched tensor is dead (its branch was not taken).
    """
    dead_refs: set[Ref] = set()
    dead_nodes: set[str] = set()

    def is_dead(ref: Ref) -> bool:
        return ref in dead_refs or ref[0] in dead_nodes

    for step in steps:
        name = step.name
        if step.op in MERGE_OPS:
            live = [(k, ref) for k, ref in enumerate(step.inputs) if not is_dead(ref)]
            if not live:  # dead control inputs do not kill a Merge (TF's executor only waits for them)
                dead_nodes.add(name)
            else:
                env[(name, 0)] = env[live[0][1]]
                env[(name, 1)] = torch.tensor(merge_index(step, live[0][0]), dtype=torch.int32)
            continue
        if any(is_dead(r) for r in step.inputs) or any(is_dead(c) for c in step.controls):
            dead_nodes.add(name)
            continue
        if step.op in SWITCH_OPS:
            data, pred = (env[r] for r in step.inputs)
            count = switch_outputs(step.op, step.kwargs)
            taken = switch_output(step.op, pred, count)
            env[(name, taken)] = data
            dead_refs.update((name, k) for k in range(count) if k != taken)
            continue
        run_step(step, env)
    dead = [ref for ref in fetches if is_dead(ref)]
    if dead:
        raise GraphImportError(
            f"fetched tensor {ref_name(dead[0])} has no value: it is in a tf.cond branch that was not taken"
        )
    return [env[ref] for ref in fetches]


def _guards(steps: list[Any]) -> tuple[dict[str, frozenset[tuple[Ref, int]]], dict[str, frozenset[Ref]]]:
    """Per step, the (predicate, branch) pairs it is live under; per Merge, the predicates it ends."""
    guard: dict[str, frozenset[tuple[Ref, int]]] = {}
    pred: dict[str, Ref] = {}
    ends: dict[str, frozenset[Ref]] = {}

    def of(ref: Ref) -> frozenset[tuple[Ref, int]]:
        found = guard.get(ref[0], frozenset())
        return found | {(pred[ref[0]], ref[1])} if ref[0] in pred else found

    for step in steps:
        seen = [of(r) for r in step.inputs + step.controls]
        union = frozenset().union(*seen)
        if step.op in MERGE_OPS:
            resolved = frozenset(p for p, k in union if k == 1 and (p, 0) in union)
            ends[step.name] = resolved
            union = frozenset(g for g in union if g[0] not in resolved)
        guard[step.name] = union
        if step.op in SWITCH_OPS:
            pred[step.name] = step.inputs[1]
    return guard, ends


def conditional_regions(steps: list[Any]) -> list[list[Any]] | None:
    """The steps of each top-level ``tf.cond`` decided at run time, one list per conditional.

    A step is in the conditional on predicate ``p`` when it is live only under a branch of ``p``
    (downstream of a ``Switch`` on ``p``, before the ``Merge`` that ends it), or is that Switch or
    Merge; a conditional nested in a branch belongs to the outer one. Two conditionals a step
    depends on both are joined. Returns None when a step is live under a branch of no top-level
    conditional (a graph ``tf.cond`` does not write).
    """
    guard, ends = _guards(steps)
    top = {step.inputs[1] for step in steps if step.op in SWITCH_OPS and not guard[step.name]}
    root: dict[Ref, Ref] = {p: p for p in top}

    def find(p: Ref) -> Ref:
        while root[p] != p:
            p = root[p]
        return p

    owner: dict[str, Ref] = {}
    for step in steps:
        preds = {p for p, _ in guard[step.name]} | set(ends.get(step.name, ()))
        if step.op in SWITCH_OPS:
            preds.add(step.inputs[1])
        if not preds:
            continue
        outer = [p for p in preds if p in top]
        if not outer:
            return None
        for p in outer[1:]:
            root[find(p)] = find(outer[0])
        owner[step.name] = outer[0]
    regions: dict[Ref, list[Any]] = {}
    for step in steps:
        if step.name in owner:
            regions.setdefault(find(owner[step.name]), []).append(step)
    return list(regions.values())
