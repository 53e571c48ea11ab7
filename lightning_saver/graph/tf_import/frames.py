"""TF1 ``while_loop`` frames, cut out of the graph and turned into a condition and a body.

TF1 writes a loop as a cycle of plumbing ops in a *frame* named by its ``Enter`` nodes::

    Enter(x, frame_name=F) -> Merge(Enter, NextIteration) -> Switch(Merge, LoopCond(pred))
        Switch:1 -> body ... -> NextIteration        Switch:0 -> Exit (the value after the loop)

Tensors the loop only reads come in through ``Enter(is_constant=True)``. Each frame is found by
propagating frames forward through the graph (the ``NextIteration -> Merge`` back edges left
out): an ``Enter`` opens its frame, an ``Exit`` returns to the parent frame, any other node lives
in the innermost frame of its inputs. A top-level frame becomes:

* in the outer graph, one node (op ``TF1WhileLoop``) whose inputs are the loop variables'
  initial values then the invariants, and whose output ``k`` is loop variable ``k`` at the end;
  each ``Exit`` becomes an ``Identity`` of it, the frame's other nodes become stubs that say they
  live inside the loop;
* a ``FrameLoop``: the frame's nodes as a graph of their own, where each loop variable is a
  placeholder named after its ``Merge`` (``Switch:1`` reads it too) and each invariant a
  placeholder named after its ``Enter``; the condition is ``LoopCond``'s input, the body the
  ``NextIteration`` inputs. Nested frames stay in that graph and are cut out when it is indexed.

No TensorFlow semantics are lost for loops written by ``tf.while_loop`` (and by freezing a TF2
``While`` with ``lower_control_flow=True``): iterations run one after the other either way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tensorboard.compat.proto import graph_pb2, node_def_pb2

ENTER_OPS = frozenset({"Enter", "RefEnter"})
EXIT_OPS = frozenset({"Exit", "RefExit"})
NEXT_OPS = frozenset({"NextIteration", "RefNextIteration"})
_MERGE_OPS = frozenset({"Merge", "RefMerge"})
_SWITCH_OPS = frozenset({"Switch", "RefSwitch"})
LOOP_OP = "TF1WhileLoop"
INTERIOR_OP = "TF1WhileLoopInterior"

Ref = tuple[str, int]


@dataclass
class FrameLoop:
    """One TF1 loop: ``args`` (loop variables, then invariants) are placeholders of ``graph``."""

    name: str  # the outer graph's node standing for the loop
    frame: str
    graph: Any = None  # GraphDef
    args: list[str] = field(default_factory=list)
    cond: Ref = ("", 0)
    body: list[Ref] = field(default_factory=list)
    n_vars: int = 0
    error: str | None = None  # the frame is not a loop we understand: raised when it is needed


class _Malformed(Exception):
    pass


def _parse(text: str) -> Ref:
    if text.startswith("^"):
        return text[1:], -1
    node, sep, index = text.rpartition(":")
    return (node, int(index)) if sep and index.isdigit() else (text, 0)


def _deps(nodes: dict[str, Any], node: Any) -> list[str]:
    names = [_parse(i)[0] for i in node.input]
    if node.op in _MERGE_OPS:  # the back edge of a loop
        names = [n for n in names if n not in nodes or nodes[n].op not in NEXT_OPS]
    return [n for n in names if n in nodes]


def assign_frames(nodes: dict[str, Any]) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """Each node's frame (None: the root) and each frame's parent, propagated forward."""
    deps = {name: _deps(nodes, node) for name, node in nodes.items()}
    consumers: dict[str, list[str]] = defaultdict(list)
    waiting = {}
    for name, names in deps.items():
        waiting[name] = len(names)
        for dep in names:
            consumers[dep].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    frame: dict[str, str | None] = {}
    parent: dict[str, str | None] = {}
    depth: dict[str | None, int] = {None: 0}

    def deepest(names: list[str]) -> str | None:
        return max((frame.get(n) for n in names), key=lambda f: depth.get(f, 0), default=None)

    while ready:
        name = ready.pop()
        node = nodes[name]
        if node.op in ENTER_OPS:
            own = node.attr["frame_name"].s.decode("utf-8", "replace")
            outer = deepest(deps[name])
            if own not in parent or depth.get(outer, 0) > depth.get(parent[own], 0):
                parent[own] = outer
                depth[own] = depth.get(outer, 0) + 1
            frame[name] = own
        elif node.op in EXIT_OPS and deps[name]:
            frame[name] = parent.get(frame.get(deps[name][0]))
        else:
            frame[name] = deepest(deps[name])
        for consumer in consumers[name]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    return frame, parent


def _top(frame: str, parent: dict[str, str | None]) -> str:
    outer = parent.get(frame)
    while outer is not None:
        frame, outer = outer, parent.get(outer)
    return frame


def collapse_frames(nodes: list[Any]) -> tuple[list[Any], dict[str, FrameLoop]]:
    """The graph's nodes with each top-level frame cut out (see the module docstring), and the loops."""
    by_name = {n.name: n for n in nodes}
    frame, parent = assign_frames(by_name)
    tops = [f for f, p in parent.items() if p is None]  # frames nested in none
    loops: dict[str, FrameLoop] = {}
    replaced: dict[str, Any] = {}
    exit_of: dict[str, list[str]] = defaultdict(list)  # switch -> the Exits of its output 0
    for n in nodes:
        if n.op in EXIT_OPS and n.input and _parse(n.input[0])[1] == 0:
            exit_of[_parse(n.input[0])[0]].append(n.name)
    members_of: dict[str, set[str]] = {top: set() for top in tops}
    for n, f in frame.items():
        if f is not None:
            members_of[_top(f, parent)].add(n)
    for top in tops:
        members = members_of[top]
        name = f"{top}/while_loop"
        while name in by_name:
            name += "_"
        loop = FrameLoop(name, top)
        try:
            outer, exits = _cut(by_name, frame, members, top, loop, exit_of)
        except _Malformed as err:
            loop.error = f"TF1 while_loop frame {top!r} cannot be imported: {err}"
            outer = node_def_pb2.NodeDef(name=name, op=LOOP_OP)
            exits = {n: k for k, n in enumerate(sorted(
                m for m in by_name if by_name[m].op in EXIT_OPS and frame.get(m) is None and
                _deps(by_name, by_name[m]) and _deps(by_name, by_name[m])[0] in members))}
        loops[name] = loop
        replaced[name] = outer
        for member in members:
            stub = node_def_pb2.NodeDef(name=member, op=INTERIOR_OP)
            stub.attr["frame_name"].s = top.encode()
            replaced[member] = stub
        for exit_name, k in exits.items():
            replaced[exit_name] = node_def_pb2.NodeDef(name=exit_name, op="Identity", input=[f"{name}:{k}"])
    out = [replaced.pop(n.name, n) for n in nodes]
    out.extend(replaced.values())  # the loop nodes
    return out, loops


def _cut(nodes: dict[str, Any], frame: dict[str, str | None], members: set[str], top: str,
         loop: FrameLoop, exit_of: dict[str, list[str]]) -> tuple[Any, dict[str, int]]:
    """Fill ``loop`` from frame ``top``; return the outer loop node and {exit name: output index}."""
    own = [n for n in members if frame.get(n) == top]
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in own:
        for dep in _deps(nodes, nodes[n]):
            consumers[dep].append(n)
    enters = sorted(n for n in own if nodes[n].op in ENTER_OPS)
    conds = [n for n in own if nodes[n].op == "LoopCond"]
    if len(conds) != 1:
        raise _Malformed(f"it has {len(conds)} LoopCond nodes, expected 1")
    loop_cond = conds[0]
    variables, invariants = [], []
    rename: dict[Ref, Ref] = {}
    controls: dict[str, str | None] = {loop_cond: None}
    nexts, exits = [], {}
    for enter in enters:
        if nodes[enter].attr["is_constant"].b:
            invariants.append(enter)
            continue
        merges = [c for c in consumers[enter] if nodes[c].op in _MERGE_OPS]
        if len(merges) != 1:
            raise _Malformed(f"loop variable {enter!r} feeds {len(merges)} Merge nodes, expected 1")
        merge = merges[0]
        back = [_parse(i)[0] for i in nodes[merge].input if _parse(i)[0] != enter]
        switch = [c for c in consumers[merge] if nodes[c].op in _SWITCH_OPS
                  and _parse(nodes[c].input[1])[0] == loop_cond]
        if len(back) != 1 or nodes[back[0]].op not in NEXT_OPS or len(switch) != 1:
            raise _Malformed(f"loop variable {enter!r} has no Merge/NextIteration/Switch cycle")
        k = len(variables)
        variables.append(merge)
        nexts.append(back[0])
        rename[(switch[0], 1)] = (merge, 0)
        controls.update({switch[0]: merge, enter: merge, back[0]: None})
        for exit_name in exit_of.get(switch[0], ()):
            exits[exit_name] = k
    removed = set(enters) | set(variables) | set(nexts) | {loop_cond} | {n for n in controls if n in members}
    inputs: dict[str, list[str]] = {}  # each body node's inputs, renamed
    outside: set[str] = set()  # constants of the outer graph read without an Enter
    for name in members - removed:
        inputs[name] = []
        for text in nodes[name].input:
            ref = _parse(text)
            if ref[1] < 0:
                target = controls.get(ref[0], ref[0])
                if target is not None and target in members:
                    inputs[name].append("^" + target)
                continue
            new = rename.get(ref, ref)
            if new[0] not in members:
                if new[0] not in nodes or nodes[new[0]].op != "Const":
                    raise _Malformed(f"node {name!r} reads {text!r} from outside the loop without an Enter")
                outside.add(new[0])
            inputs[name].append(f"{new[0]}:{new[1]}")

    def body_ref(text: str) -> Ref:
        ref = _parse(text)
        return rename.get(ref, ref)

    loop.cond = body_ref(nodes[loop_cond].input[0])
    loop.body = [body_ref(nodes[n].input[0]) for n in nexts]
    # only what the condition and the body need: tf.gradients adds stack pushes (and the stack
    # handles they Enter) to the forward loop, which running the loop forward never reads
    needed = _reachable([loop.cond[0]] + [r[0] for r in loop.body], inputs)
    invariants = [e for e in invariants if e in needed]
    graph = graph_pb2.GraphDef()
    for arg in variables + invariants:
        graph.node.append(node_def_pb2.NodeDef(name=arg, op="Placeholder"))
    for name in sorted(n for n in inputs if n in needed):
        copy = graph.node.add()
        copy.CopyFrom(nodes[name])
        del copy.input[:]
        copy.input.extend(inputs[name])
    for name in sorted(outside & needed):
        graph.node.add().CopyFrom(nodes[name])
    loop.graph, loop.args, loop.n_vars = graph, variables + invariants, len(variables)
    initial = [nodes[e].input[0] for e in [_enter_of(nodes, m, enters) for m in variables] + invariants]
    used = set(variables) | set(invariants)
    outer_controls = {i for e in enters if e in used or _merge_of(e, consumers, nodes) in used
                      for i in nodes[e].input[1:] if i.startswith("^")}
    outer = node_def_pb2.NodeDef(name=loop.name, op=LOOP_OP, input=initial + sorted(outer_controls))
    outer.attr["frame_name"].s = top.encode()
    return outer, exits


def _reachable(roots: list[str], inputs: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(_parse(i)[0] for i in inputs.get(name, ()))
    return seen


def _merge_of(enter: str, consumers: dict[str, list[str]], nodes: dict[str, Any]) -> str | None:
    return next((c for c in consumers[enter] if nodes[c].op in _MERGE_OPS), None)


def _enter_of(nodes: dict[str, Any], merge: str, enters: list[str]) -> str:
    return next(_parse(i)[0] for i in nodes[merge].input if _parse(i)[0] in enters)
