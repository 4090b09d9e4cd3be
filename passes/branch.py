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

Run before ``tile-conv-stages``, which leaves tagged nodes alone. Regions are taken greedily,
the largest predicted gain first, each only if it lowers the tier's predicted seconds with
the spatial runs among the remaining nodes tiled as ``tile-conv-stages`` would split them
(``partc.tiling.split``): per region, branches or tiles (or neither), whichever the tier is
predicted faster with.
"""

from __future__ import annotations

from torch import fx

from partc.context import CompileContext
from partc.ir import META_PARALLEL, META_TIER, META_TILE, clone, compute_nodes
from partc.partition.model import link_price
from partc.partition.price import LinkPrice
from partc.pipeline import PassResult
from partc.tiling.branches import assign_branches, branch_bytes, find_regions
from partc.tiling.regions import find_runs
from partc.tiling.split import node_seconds, split_run


def _tier_seconds(gm: fx.GraphModule, nodes: set[fx.Node], taken: dict, seconds: dict, count: int,
                  link: LinkPrice, runs_seen: dict) -> float:
    """Predicted seconds of a tier's ``nodes``: the regions in ``taken`` (region -> assignment) on
    their nodes, the spatial runs among the rest tiled as ``tile-conv-stages`` would split them
    (``partc.tiling.split``; ``runs_seen`` keeps each run's price), every other node on the coordinator."""
    inside = {n for region in taken for n in region.nodes}
    free = nodes - inside
    runs = [tuple(run) for run in find_runs(gm, free.__contains__)]
    for run in runs:
        if run not in runs_seen:
            runs_seen[run] = sum(part.latency for part in split_run(run, gm, count, seconds, link))
    tiled = {n for run in runs for n in run}
    return sum(a.seconds for a in taken.values()) + sum(runs_seen[r] for r in runs) + sum(
        seconds[n] for n in free - tiled)


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
        link = link_price(ctx, ctx.link(tier.name, tier.name))
        on_tier = {n for n in compute_nodes(gm) if n.meta.get(META_TIER) == tier.name and META_TILE not in n.meta}
        regions = find_regions(gm, on_tier.__contains__)
        if not regions:
            continue
        seconds = node_seconds(gm, tier)
        options = {}
        for region in regions:
            moved = [branch_bytes(branch, region.join) for branch in region.branches]
            compute = [sum(seconds[n] for n in branch) for branch in region.branches]
            best = assign_branches(compute, [i for i, _ in moved], [o for _, o in moved], tier.nodes, link)
            if max(best.node) > 0:
                options[region] = best
        taken: dict = {}
        runs_seen: dict = {}
        current = _tier_seconds(gm, on_tier, taken, seconds, tier.nodes, link, runs_seen)
        for region in sorted(options, key=lambda r: options[r].seconds - sum(seconds[n] for n in r.nodes)):
            trial = _tier_seconds(gm, on_tier, {**taken, region: options[region]}, seconds, tier.nodes, link,
                                  runs_seen)
            if trial < current:
                taken[region], current = options[region], trial
        for region in sorted(taken, key=lambda r: r.join.name):
            best = taken[region]
            for branch, node in zip(region.branches, best.node, strict=True):
                for n in branch:
                    n.meta[META_TILE] = (run, node)
            sequential = sum(seconds[n] for n in region.nodes)
            records.append({
                "kind": "branches", "run": run, "tier": tier.name, "join": region.join.name,
                "nodes": 1 + max(best.node),
                "branches": {branch[0].name: node for branch, node in zip(region.branches, best.node, strict=True)},
                "sequential_s": sequential, "parallel_s": best.seconds,
            })
            notes.append(f"{region.join.name} ({tier.name}): {len(region.branches)} branches on "
                         f"{1 + max(best.node)} nodes, {sequential * 1e3:.2f} -> {best.seconds * 1e3:.2f} ms")
            run += 1
    gm.meta[META_PARALLEL] = records
    if not notes:
        return PassResult(gm, "no region worth distributing")
    return PassResult(gm, f"{len(notes)} region(s) distributed: " + "; ".join(notes))
