"""Branch distribution (``distribute-branches``): a fork/join region's branches in parallel on a tier's nodes.

On every tier that can run in parallel (``nodes`` > 1 and a link from the tier to itself,
as ``tile-conv-stages`` needs), each fork/join region (``partc.tiling.branches``: an
inception block's towers, a multi-branch cell's paths) whose nodes all run on the tier is
spread over the tier's nodes by ``assign_branches``: the assignment of least predicted
makespan, priced as the tile step it becomes (``partc.partition.price.tiled_step_seconds``).
A region is distributed only when that beats running it on one node. Its nodes are tagged
like a tiled run's (``META_TILE`` = (run, node)), so ``partc.tiling.schedule`` runs them as
one step: node t runs its branches, the coordinator sends each node the fork's output and
gathers the branches' results; the join is local work of the next step. Nothing is copied
or rewritten: the result is the model's, exactly.

Run before ``tile-conv-stages``, which leaves tagged nodes alone: a region goes to branches
when they are predicted faster than one node, and the spatial runs elsewhere are tiled.
"""

from __future__ import annotations

from torch import fx

from partc.context import CompileContext
from partc.ir import META_PARALLEL, META_TIER, META_TILE, clone, compute_nodes
from partc.partition.model import link_price
from partc.pipeline import PassResult
from partc.tiling.branches import assign_branches, branch_bytes, find_regions
from partc.tiling.split import node_seconds


def distribute_branches(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Spread each fork/join region's branches over its tier's nodes where that is faster (module docstring).

    Reads meta[META_TIER], meta[META_PROFILE] (or the cost model's prediction), meta[META_BYTES].
    Writes meta[META_TILE] = (run, node) on every node of a distributed region, and appends
    one entry per region to gm.meta[META_PARALLEL] (kind "branches", tier, join, nodes used,
    node of each branch, sequential and parallel seconds). Returns its input when no tier has
    several nodes and a link to itself.
    """
    tiers = [t for t in ctx.tiers if t.nodes > 1 and ctx.link(t.name, t.name) is not None]
    if not tiers:
        return PassResult(gm, "no tier has several nodes and a link to itself; no branch distributed")
    gm = clone(gm)
    run = 1 + max((n.meta[META_TILE][0] for n in gm.graph.nodes if META_TILE in n.meta), default=-1)
    records, notes = list(gm.meta.get(META_PARALLEL, ())), []
    for tier in tiers:
        link = link_price(ctx.link(tier.name, tier.name))
        on_tier = {n for n in compute_nodes(gm) if n.meta.get(META_TIER) == tier.name and META_TILE not in n.meta}
        regions = find_regions(gm, on_tier.__contains__)
        if not regions:
            continue
        seconds = node_seconds(gm, tier)
        for region in regions:
            compute = [sum(seconds[n] for n in branch) for branch in region.branches]
            moved = [branch_bytes(branch, region.join) for branch in region.branches]
            best = assign_branches(compute, [i for i, _ in moved], [o for _, o in moved], tier.nodes, link)
            used = 1 + max(best.node)
            if used == 1:
                continue
            for branch, node in zip(region.branches, best.node, strict=True):
                for n in branch:
                    n.meta[META_TILE] = (run, node)
            records.append({
                "kind": "branches", "run": run, "tier": tier.name, "join": region.join.name, "nodes": used,
                "branches": {branch[0].name: node for branch, node in zip(region.branches, best.node, strict=True)},
                "sequential_s": sum(compute), "parallel_s": best.seconds,
            })
            notes.append(f"{region.join.name} ({tier.name}): {len(region.branches)} branches on {used} nodes, "
                         f"{sum(compute) * 1e3:.2f} -> {best.seconds * 1e3:.2f} ms")
            run += 1
    gm.meta[META_PARALLEL] = records
    if not notes:
        return PassResult(gm, "no region worth distributing")
    return PassResult(gm, f"{len(notes)} region(s) distributed: " + "; ".join(notes))
