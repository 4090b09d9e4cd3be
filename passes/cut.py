"""The horizontal cut: assign every node a tier, device → edge → cloud, optimally.

``cost_graph`` turns the profiled IR and the cluster into a ``partc.partition.cost.CostGraph``
(checking the constraints and naming any that is malformed); ``select_cuts`` solves it
exactly (``partc.partition.solve``) and writes each node's tier. Cost semantics are
those of ``partc.partition.cost``.
"""

from __future__ import annotations

import numpy as np
from torch import fx

from partc.context import CompileContext
from partc.errors import ClusterError
from partc.ir import META_TIER, clone
from partc.partition.cost import format_size
from partc.partition.model import cost_graph
from partc.partition.solve import solve
from partc.pipeline import PassResult


def select_cuts(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Assign each node a tier, minimising ``ctx.objective`` (latency or throughput bottleneck).

    Reads meta[META_PROFILE], meta[META_BYTES], meta[META_PARAM_BYTES]; writes
    meta[META_TIER] on every node: inputs on the first tier, the output node on the last
    tier that computes a result (results are delivered where they are computed). Needs
    annotate-profile.

    Raises:
        ClusterError: if the constraints are malformed or cannot be met.
        PartcError: if a node has no profile.
    """
    gm = clone(gm)
    graph = cost_graph(gm, ctx)
    try:
        plan = solve(graph, ctx.objective)
    except ClusterError as err:
        raise ClusterError(f"{ctx.source}: {err}") from err
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    for node, tier in zip(nodes, plan.tiers.tolist(), strict=True):
        node.meta[META_TIER] = graph.tiers[tier]
    for node in gm.graph.nodes:
        if node.op == "output":
            index = max((graph.tiers.index(a.meta[META_TIER]) for a in node.all_input_nodes), default=0)
            node.meta[META_TIER] = graph.tiers[index]
    cost = plan.cost
    counts = np.bincount(plan.tiers, minlength=len(graph.tiers))
    per_tier = ", ".join(
        f"{t}: {c} nodes {s * 1e3:.2f} ms" for t, c, s in zip(graph.tiers, counts, cost.compute, strict=True)
    )
    per_link = ", ".join(f"{lk} {format_size(b)}" for lk, b in zip(graph.links, cost.link_bytes, strict=True))
    summary = (
        f"{ctx.objective}: latency {cost.latency * 1e3:.2f} ms, bottleneck {cost.bottleneck * 1e3:.2f} ms "
        f"({plan.method}); {per_tier}" + (f"; {per_link}" if per_link else "")
    )
    return PassResult(gm, summary)
