"""Fork/join regions of a DAG and the assignment of their branches to a tier's nodes.

A *region* is what lies strictly between a fork node ``F`` and a join node ``J`` that ``F``
dominates (every path from the model's inputs to ``J`` passes through ``F``): the nodes
that ``F`` reaches and that reach ``J``. It is single-entry, single-exit when every region
node reads only region nodes, ``F`` or constants (``get_attr``), and only region nodes and
``J`` read it. Its *branches* are the region's weakly connected components: an inception
block's four towers, a multi-branch cell's paths. A residual block is a region of one
branch (its skip is an edge ``F -> J``) and is left alone.

``assign_branches`` spreads a region's branches over ``nodes`` nodes of a tier exactly: it
minimises the region's makespan as ``partc.tiling.schedule`` runs it, one tile step
priced by ``partc.partition.price.tiled_step_seconds`` (node 0, the coordinator, computes
its branches while it sends the others their inputs one node after the other; it gathers
their outputs, the first done first). Node 0 always keeps at least one branch and the
remote nodes used are 1..m, so the step's programs are exactly its nodes. The search is a
depth-first branch and bound over the branches, largest first, pruned by the slowest
node's compute so far (compute only grows, and a node's finish time is at least its
compute); at each leaf every order of the remote nodes is priced (the coordinator sends
to them in order).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from partc.ir import META_BYTES
from partc.partition.price import LinkPrice, tiled_step_seconds


@dataclass(frozen=True)
class Region:
    """A fork/join region (module docstring).

    Attributes:
        fork: ``F``; join: ``J``.
        branches: the region's weakly connected components, each in graph order.
    """

    fork: fx.Node
    join: fx.Node
    branches: tuple[tuple[fx.Node, ...], ...]

    @property
    def nodes(self) -> set[fx.Node]:
        """Every node of every branch."""
        return {n for branch in self.branches for n in branch}


@dataclass(frozen=True)
class Assignment:
    """Branches spread over nodes: ``node[b]`` runs branch b; ``seconds`` is the predicted makespan."""

    node: tuple[int, ...]
    seconds: float


def find_regions(gm: fx.GraphModule, select: Callable[[fx.Node], bool]) -> list[Region]:
    """Return the disjoint fork/join regions of ``gm`` with at least two branches whose
    nodes, fork and join ``select`` all accepts; the largest first where regions nest or
    overlap (an inception_v3 block, not the towers inside it). In graph order."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    idom = _dominators(nodes, position)
    candidates = []
    for join in nodes:
        fork = idom.get(join)
        if fork is None or len(set(join.all_input_nodes)) < 2 or not select(join) or not select(fork):
            continue
        region = _between(fork, join, position)
        if not region or not all(select(n) for n in region) or not _closed(region, fork, join):
            continue
        branches = _components(region, position)
        if len(branches) >= 2:
            candidates.append(Region(fork, join, branches))
    inside: set[fx.Node] = set()  # the chosen regions' nodes
    ends: set[fx.Node] = set()  # their forks and joins (a join may fork the next region)
    chosen = []
    for region in sorted(candidates, key=lambda r: (-len(r.nodes), position[r.join])):
        nodes = region.nodes
        if not (nodes | {region.fork, region.join}) & inside and not nodes & ends:
            chosen.append(region)
            inside |= nodes
            ends |= {region.fork, region.join}
    return sorted(chosen, key=lambda r: position[r.join])


def assign_branches(
    compute: Sequence[float], inputs: Sequence[float], outputs: Sequence[float], nodes: int, link: LinkPrice
) -> Assignment:
    """The assignment of branches to at most ``nodes`` nodes of least makespan (module docstring).

    Args:
        compute: seconds of each branch on one node.
        inputs: bytes each branch reads from outside itself (the fork's output; a node
            running several branches receives it once: the largest counts).
        outputs: bytes of each branch's results (what the join reads).
        nodes: the tier's nodes.
        link: the tier's link to itself.
    """
    order = sorted(range(len(compute)), key=lambda b: (-compute[b], b))
    best = Assignment(tuple([0] * len(compute)), sum(compute))  # everything on the coordinator
    node = [0] * len(compute)

    def price(groups: int) -> tuple[float, tuple[int, ...]]:
        found = (float("inf"), ())
        for perm in itertools.permutations(range(1, groups)):
            relabel = (0, *perm)
            labels = [relabel[t] for t in node]
            cost = tiled_step_seconds(*_loads(labels, groups, compute, inputs, outputs), link)
            found = min(found, (cost, tuple(labels)))
        return found

    def visit(k: int, groups: int, load: list[float]) -> None:
        nonlocal best
        if max(load) >= best.seconds:
            return  # no completion can beat the best: a node finishes no earlier than its compute
        if k == len(order):
            if 0 in node:
                cost, labels = price(groups)
                if cost < best.seconds:
                    best = Assignment(labels, cost)
            return
        b = order[k]
        for t in range(min(groups + 1, nodes)):
            node[b] = t
            if t < groups:
                load[t] += compute[b]
                visit(k + 1, groups, load)
                load[t] -= compute[b]
            else:
                visit(k + 1, groups + 1, [*load, compute[b]])
        node[b] = 0

    visit(0, 1, [0.0])
    return best


def branch_step(
    node: Sequence[int], compute: Sequence[float], inputs: Sequence[float], outputs: Sequence[float], link: LinkPrice
) -> float:
    """Predicted seconds of the branches run as ``node`` assigns them: one tile step."""
    groups = max(node, default=0) + 1
    return tiled_step_seconds(*_loads(node, groups, compute, inputs, outputs), link)


def branch_bytes(branch: Sequence[fx.Node], join: fx.Node) -> tuple[float, float]:
    """Bytes ``branch`` reads from outside itself, and bytes of its results read by ``join``."""
    members = set(branch)
    read = {a for n in branch for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    results = [n for n in branch if join in n.users]
    return float(sum(a.meta[META_BYTES] for a in read)), float(sum(n.meta[META_BYTES] for n in results))


def _loads(labels: Sequence[int], groups: int, compute, inputs, outputs) -> tuple[list, list, list]:
    load, scatter, gather = [0.0] * groups, [0.0] * groups, [0.0] * groups
    for b, t in enumerate(labels):
        load[t] += compute[b]
        scatter[t] = max(scatter[t], inputs[b])
        gather[t] += outputs[b]
    return load, scatter, gather


def _dominators(nodes: list[fx.Node], position: dict[fx.Node, int]) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominator of every node (None: dominated only by the virtual root before the inputs)."""
    idom: dict[fx.Node, fx.Node | None] = {}

    def intersect(a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            if a is None or b is None:
                return None
            while a is not None and b is not None and position[a] > position[b]:
                a = idom[a]
            while a is not None and b is not None and position[b] > position[a]:
                b = idom[b]
        return a

    for n in nodes:
        preds = n.all_input_nodes
        if not preds:
            idom[n] = None
            continue
        dom = preds[0]
        for p in preds[1:]:
            dom = intersect(dom, p)
        idom[n] = dom
    return idom


def _between(fork: fx.Node, join: fx.Node, position: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes ``fork`` reaches that reach ``join``, both excluded."""
    reached, stack = set(), [fork]
    while stack:
        for user in stack.pop().users:
            if user not in reached and position[user] < position[join]:
                reached.add(user)
                stack.append(user)
    reaching, stack = set(), [join]
    while stack:
        for source in stack.pop().all_input_nodes:
            if source not in reaching and position[source] > position[fork]:
                reaching.add(source)
                stack.append(source)
    return reached & reaching


def _closed(region: set[fx.Node], fork: fx.Node, join: fx.Node) -> bool:
    """Whether only ``fork`` and constants enter ``region`` and only ``join`` reads it from outside."""
    for n in region:
        if any(a not in region and a is not fork and a.op != "get_attr" for a in n.all_input_nodes):
            return False
        if any(u not in region and u is not join for u in n.users):
            return False
    return True


def _components(region: set[fx.Node], position: dict[fx.Node, int]) -> tuple[tuple[fx.Node, ...], ...]:
    """The weakly connected components of ``region``, each in graph order, ordered by their first node."""
    seen: set[fx.Node] = set()
    out = []
    for start in sorted(region, key=position.__getitem__):
        if start in seen:
            continue
        component, stack = {start}, [start]
        while stack:
            n = stack.pop()
            for other in [*n.all_input_nodes, *n.users]:
                if other in region and other not in component:
                    component.add(other)
                    stack.append(other)
        seen |= component
        out.append(tuple(sorted(component, key=position.__getitem__)))
    return tuple(out)
