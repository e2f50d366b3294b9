"""Find the equal-width blocks of a traced model, structurally, from the graph alone.

A *block* is a single-entry single-exit (SESE) region of the dataflow graph: one
tensor ``entry`` flows in, one tensor ``exit`` flows out, and nothing else
crosses the border (parameters and constants excepted). Two kinds are found:

* **fork .. join units** (``"residual"``): ``entry`` has several users and its
  immediate post-dominator ``exit`` merges full-resolution tensors (``add``,
  ``cat``, ``mul`` of equal spatial shape, as in residual, ShuffleNet or
  dual-path units). SESE-ness is the dominator condition
  ``entry dom exit and exit pdom entry``, tested in O(1) per pair with
  dominator-tree intervals, so the search is linear in the graph size.
  Units nest (a squeeze-excite gate inside an inverted residual, residual units
  inside a global skip); the outermost unit that encloses at most one other
  unit is chosen, so a network-wide skip never swallows a stage.
* **layers** (``"layer"``): outside the chosen units, one channel-mixing layer
  together with the single-user chain of shape-preserving ops behind it (its
  norm and activation).

A region whose entry and exit shapes are equal is an equal-width block.
Width-changing units are always returned (as ``"transition"``, so the report
can say why they were left alone); width-changing single layers only with
``transitions=True``. Units and layers both take the single-user chain of
shape-preserving ops behind them (the post-activation ``relu(x + f(x))``).
Only regions that contain a channel-mixing layer qualify. Class names are
never consulted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import networkx as nx
import torch.fx
from torch import nn

from ..layers import may_follow_as_tail
from ..ops import is_concat
from .channels import is_channel_mixing
from .shapes import other_shape_of, same_shape, shape_of

__all__ = ["Region", "find_blocks"]

_SOURCE = "__mgic_source__"


@dataclass
class Region:
    """A candidate block: ``entry`` (outside, feeds it) and ``nodes`` (inside, in graph order, exit last)."""

    entry: torch.fx.Node
    nodes: list[torch.fx.Node]
    kind: str
    # What to try instead if this (transition) unit cannot be rewritten: the blocks inside it
    inner: list["Region"] = field(default_factory=list)

    @property
    def exit(self) -> torch.fx.Node:
        return self.nodes[-1]


@dataclass
class _Dataflow:
    """One run of the block search: the dataflow graph and what every step reads off it.

    Attributes:
        g: the nodes that carry data from an input to the output (:func:`_dataflow_graph`).
        output: the graph's output node.
        order: every node's position in the graph (regions keep graph order).
        modules: the model's modules by path.
        transitions: whether width-changing blocks are candidates.
    """

    g: nx.DiGraph
    output: torch.fx.Node
    order: dict[torch.fx.Node, int]
    modules: dict[str, nn.Module]
    transitions: bool

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, transitions: bool) -> "_Dataflow":
        g, output = _dataflow_graph(gm.graph)
        return cls(g, output, {n: i for i, n in enumerate(gm.graph.nodes)}, dict(gm.named_modules()), transitions)


def _dataflow_graph(graph: torch.fx.Graph) -> tuple[nx.DiGraph, torch.fx.Node]:
    """Dataflow DiGraph over the nodes that carry data from an input to the output.

    Constants (``get_attr`` ...) and side-effect-only nodes that never reach the
    output (``_assert(x.ndim == 4)`` checks, as timm layers emit) are left out:
    they would break (post-)dominance. :func:`_attach_side_nodes` gives the
    latter back to the block that computes their inputs.
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
    useful, stack = {output}, [output]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in live and a not in useful:
                useful.add(a)
                stack.append(a)
    g = nx.DiGraph()
    g.add_node(_SOURCE)
    for node in graph.nodes:
        if node not in useful:
            continue
        if node.op == "placeholder":
            g.add_edge(_SOURCE, node)
        for a in node.all_input_nodes:
            if a in useful:
                g.add_edge(a, node)
    return g, output


def _attach_side_nodes(region: "Region", flow: _Dataflow) -> None:
    """Add the side-effect-only nodes (asserts on shapes) that read only from inside the region.

    A check on the exit tensor belongs to whatever consumes it, not to the block.
    """
    g, inside = flow.g, set(region.nodes)
    frontier = list(region.nodes[:-1])
    while frontier:
        for user in frontier.pop().users:
            if user in g or user in inside:
                continue
            if all(a is not region.exit and (a in inside or a is region.entry or
                                             a not in g and not _reads_outside(a, inside, region.entry, g))
                   for a in user.all_input_nodes):
                inside.add(user)
                frontier.append(user)
    extra = inside.difference(region.nodes)
    if extra:
        exit = region.exit
        region.nodes = sorted(inside.difference({exit}), key=flow.order.__getitem__) + [exit]


def _reads_outside(node: torch.fx.Node, inside: set, entry: torch.fx.Node, g: nx.DiGraph) -> bool:
    """Does a node outside the dataflow graph depend on a data node outside the region?"""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in g and a not in inside and a is not entry:
                return True
            if a not in g:
                stack.append(a)
    return False


def _tree_intervals(idom: dict, root) -> tuple[dict, dict]:
    """Pre/post DFS numbers of the dominator tree, so ``a dom b`` is two comparisons."""
    children: dict = {}
    for node, parent in idom.items():
        if node is not parent:
            children.setdefault(parent, []).append(node)
    pre, post, clock = {}, {}, 0
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            post[node] = clock
            clock += 1
            continue
        pre[node] = clock
        clock += 1
        stack.append((node, True))
        stack.extend((c, False) for c in children.get(node, ()))
    return pre, post


def _is_full_merge(exit: torch.fx.Node, inside: set, entry: torch.fx.Node) -> bool:
    """Does ``exit`` merge full-resolution tensors (not a broadcast gate such as squeeze-excite's)?"""
    out = shape_of(exit)
    operands = [a for a in exit.all_input_nodes if a in inside or a is entry]
    if out is None or len(operands) < 2:
        return False
    for a in operands:
        s = shape_of(a)
        if s is None or len(s) != len(out) or sum(x != y for x, y in zip(s, out)) > 1:
            return False
        if len(out) > 2 and any(x != y for x, y in zip(s[2:], out[2:])) and not is_concat(exit):
            return False
    return True


def _region_between(flow: _Dataflow, entry: torch.fx.Node, exit: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes reachable from ``entry`` without passing ``exit``, plus ``exit``, in graph order."""
    g, seen = flow.g, {exit}
    stack = [s for s in g.successors(entry) if s is not exit]
    seen.update(stack)
    while stack:
        n = stack.pop()
        for s in g.successors(n):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return sorted(seen, key=flow.order.__getitem__)


def _has_mixing_layer(nodes: Iterable[torch.fx.Node], modules: dict[str, nn.Module]) -> bool:
    return any(n.op == "call_module" and is_channel_mixing(modules[n.target]) for n in nodes)


def _classify(entry: torch.fx.Node, exit: torch.fx.Node) -> Optional[str]:
    """``"equal"``, ``"transition"`` or ``None``; the same at the doubled spatial size, where that is known.

    The spatial ratio of a transition must hold at both sizes too: a global pool
    is not a stride-1 layer because the example's map happened to be 1x1.
    """
    kind = _kind(shape_of(entry), shape_of(exit))
    a, b = other_shape_of(entry), other_shape_of(exit)
    if kind is None or a is None or b is None:
        return kind
    if _kind(a, b) != kind:
        return None
    if kind == "transition" and _strides(shape_of(entry), shape_of(exit)) != _strides(a, b):
        return None
    return kind


def _strides(a, b) -> list[int]:
    return [max(1, round(x / max(y, 1))) for x, y in zip(a[2:], b[2:])]


def _kind(a, b) -> Optional[str]:
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    if a == b:
        return "equal"
    return "transition" if a[0] == b[0] else None


def _extend_tail(nodes: list[torch.fx.Node], flow: _Dataflow, taken: frozenset = frozenset()) -> None:
    """Append the single-user chain of shape-preserving, non-mixing ops after ``nodes[-1]`` (norm, activation)."""
    while True:
        cur = nodes[-1]
        users = list(flow.g.successors(cur))
        if len(users) != 1:
            return
        nxt = users[0]
        if nxt is flow.output or nxt in taken or [a for a in nxt.all_input_nodes if a in flow.g] != [cur]:
            return
        if not same_shape(nxt, cur):  # at the doubled size too: not a pool that met a 1x1 map
            return
        if nxt.op == "call_module" and not may_follow_as_tail(flow.modules[nxt.target]):
            return
        nodes.append(nxt)


def _fork_join_units(flow: _Dataflow) -> list[Region]:
    g, output = flow.g, flow.output
    idom = nx.immediate_dominators(g, _SOURCE)
    ipdom = nx.immediate_dominators(g.reverse(copy=False), output)
    pre, post = _tree_intervals(idom, _SOURCE)

    def dominates(a, b) -> bool:
        return pre[a] <= pre[b] and post[b] <= post[a]

    units = []
    for fork in g.nodes:
        if fork is _SOURCE or fork is output or g.out_degree(fork) < 2:
            continue
        join = ipdom.get(fork)
        if join is None or join is output or not dominates(fork, join):
            continue
        nodes = _region_between(flow, fork, join)
        entry = fork
        if shape_of(fork) is None:  # a tuple-valued fork (chunk/split): the block starts at its input
            inputs = [a for a in fork.all_input_nodes if a in g]
            if len(inputs) != 1 or len(inputs[0].users) != 1:
                continue
            entry = inputs[0]
            nodes = [fork] + nodes
        kind = _classify(entry, join)
        if kind is None or not _is_full_merge(join, set(nodes), entry) or not _has_mixing_layer(nodes, flow.modules):
            continue
        _extend_tail(nodes, flow)
        if _classify(entry, nodes[-1]) != kind:
            continue
        units.append(Region(entry, nodes, "residual" if kind == "equal" else "transition"))
    return _outermost_units(units, flow.transitions)


def _outermost_units(units: list[Region], transitions: bool) -> list[Region]:
    """Choose units top-down: a unit enclosing two or more units is a stage; descend into it.

    Without ``transitions`` a width-changing unit is reported but cannot be
    rewritten, so the search also descends into it (a U-Net's skip connection
    must not hide the levels inside it). With ``transitions`` a width-changing
    unit is a candidate, and the units the search would choose inside it are
    kept on ``Region.inner`` in case it is declined.
    """
    units.sort(key=lambda r: len(r.nodes))
    members = [set(r.nodes) for r in units]
    parent: list[Optional[int]] = [None] * len(units)
    for i, r in enumerate(units):
        for j in range(i + 1, len(units)):
            if r.exit in members[j]:
                parent[i] = j
                break
    children: dict[Optional[int], list[int]] = {}
    for i, p in enumerate(parent):
        children.setdefault(p, []).append(i)

    def choose(roots: list[int]) -> list[Region]:
        chosen, stack = [], list(roots)
        while stack:
            i = stack.pop()
            kids = children.get(i, [])
            if units[i].kind == "transition" and not transitions:
                chosen.append(units[i])
                stack.extend(kids)
            elif len(kids) >= 2:
                stack.extend(kids)
            else:
                if units[i].kind == "transition" and kids:
                    units[i].inner = choose(kids)
                chosen.append(units[i])
        return chosen

    return choose(children.get(None, []))


def _layer_blocks(flow: _Dataflow, taken: set) -> list[Region]:
    """One channel-mixing layer plus its single-user tail of shape-preserving, non-mixing ops."""
    blocks, g = [], flow.g
    for node in sorted((n for n in g.nodes if n is not _SOURCE), key=flow.order.__getitem__):
        if node in taken or node.op != "call_module" or not is_channel_mixing(flow.modules[node.target]):
            continue
        entry = node.args[0] if node.args else None
        if not isinstance(entry, torch.fx.Node) or entry not in g or len([a for a in node.all_input_nodes if a in g]) != 1:
            continue
        nodes = [node]
        _extend_tail(nodes, flow, taken)
        kind = _classify(entry, nodes[-1])
        if kind is None or (kind == "transition" and not flow.transitions):
            continue
        blocks.append(Region(entry, nodes, "layer" if kind == "equal" else "transition"))
        taken.update(nodes)
    return blocks


def find_blocks(gm: torch.fx.GraphModule, *, transitions: bool = False) -> list[Region]:
    """All candidate blocks of ``gm`` (shapes must be propagated), in graph order, non-overlapping."""
    flow = _Dataflow.of(gm, transitions)
    units = _fork_join_units(flow)
    taken = {n for r in units if r.kind != "transition" or transitions for n in r.nodes}
    layers = _layer_blocks(flow, taken)
    regions = sorted(units + layers, key=lambda r: flow.order[r.exit])
    if transitions:  # the layers inside a transition unit, for when it is declined
        for unit in (r for r in units if r.kind == "transition"):
            _add_inner_layers(unit, flow)
    stack = list(regions)
    while stack:
        region = stack.pop()
        _attach_side_nodes(region, flow)
        stack.extend(region.inner)
    return regions


def _add_inner_layers(unit: Region, flow: _Dataflow) -> None:
    """Complete ``unit.inner`` (its inner units) with the layer blocks between them, in graph order."""
    for inner in unit.inner:
        if inner.kind == "transition":
            _add_inner_layers(inner, flow)
    inside = set(unit.nodes)
    taken = {n for n in flow.g.nodes if n not in inside} | {n for r in unit.inner for n in r.nodes} | {unit.exit}
    layers = _layer_blocks(flow, taken)
    unit.inner = sorted(unit.inner + layers, key=lambda r: flow.order[r.exit])
