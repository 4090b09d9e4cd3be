"""Costs of a model on a cluster, read from the profiled IR.

``cost_graph`` builds the ``partc.partition.cost.CostGraph`` the solver works on from each
node's profile, bytes and parameter bytes, the cluster's links and constraints (checking the
constraints and naming any that is malformed); ``priced`` puts each link at its codec's
effective bandwidth. ``program_seconds`` prices a stage program by its nodes, and
``link_price`` a cluster link, for ``partc.partition.price``; ``fleet_load`` is the cluster's
load, for ``partc.partition.load``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping

import numpy as np
from torch import fx

from partc.codec import NO_CODEC, LinkCodec
from partc.context import CompileContext, Link
from partc.costmodel import dispatch_scale, load_calibration
from partc.errors import ClusterError, PartcError
from partc.ir import META_BYTES, META_PARAM_BYTES, META_PROFILE, META_TIER, compute_nodes, link_name
from partc.partition.cost import Cost, CostGraph, evaluate
from partc.partition.load import SERVE_CALLS, WORKER_CALLS, Load, TierLoad, slots
from partc.partition.price import CALL_SECONDS, LinkPrice
from partc.targets import TargetDesc, target


def assigned_cost(gm: fx.GraphModule, ctx: CompileContext) -> tuple[CostGraph, np.ndarray, Cost]:
    """Return the cost graph of ``gm``, the tier index of each of its nodes, and their cost.

    Reads meta[META_TIER] (run select-cuts first) and what ``cost_graph`` reads.
    """
    graph = cost_graph(gm, ctx)
    tiers = np.array([graph.tiers.index(n.meta[META_TIER]) for n in gm.graph.nodes if n.op != "output"])
    return graph, tiers, evaluate(graph, tiers)


def priced(graph: CostGraph, codecs: Mapping[str, LinkCodec]) -> CostGraph:
    """``graph`` with each link at the effective bandwidth of its codec in ``codecs`` (link name ->
    codec; absent: ``none``): a plan's raw link bytes then cost what they cost compressed,
    encoding and decoding included."""
    return graph.with_bandwidth([codecs.get(link, NO_CODEC).effective_bandwidth(bw)
                                 for link, bw in zip(graph.links, graph.bandwidth, strict=True)])


def link_price(ctx: CompileContext, link: Link, codec: LinkCodec = NO_CODEC) -> LinkPrice:
    """``ctx``'s ``link`` as plans are priced on it, its tensors crossing with ``codec``; a call over
    it costs what one costs on the target of the tier it leaves (``call_seconds``)."""
    return LinkPrice(link_name(link.src, link.dst), link.bandwidth, link.latency, codec,
                     call_seconds(target(ctx.tier(link.src).target)))


def call_seconds(desc: TargetDesc) -> float:
    """Fixed seconds of one call from a node of ``desc`` to another node (``LinkPrice.call``): the
    calibration host's ``CALL_SECONDS``, scaled like the per-node dispatch (framing, gRPC and the
    program's invocation are single-threaded CPU work)."""
    return CALL_SECONDS * dispatch_scale(load_calibration().reference, desc)


def fleet_load(graph: CostGraph, ctx: CompileContext) -> Load | None:
    """The load of ``ctx``'s fleet on ``graph``'s tiers; None when the cluster file gives no rate.

    Each node pays at most ``call_overhead_seconds`` of its tier's target once per batch. A tier
    after the first pays ``call_seconds`` of its target per request for each call into it:
    ``WORKER_CALLS`` when it serves one request at a time (its gRPC worker), ``SERVE_CALLS`` when
    it has replicas or batches (Ray Serve). A replica takes a whole machine (the profile prices a
    stage on all the target's cores): an instance runs ``nodes`` batches at once.
    """
    if not ctx.loaded:
        return None
    first = ctx.tiers[0].scaling
    total = first.instances * first.rate
    tiers = []
    for k, t in enumerate(ctx.tiers):
        s, desc = t.scaling, target(t.target)
        calls = 0 if k == 0 else WORKER_CALLS if s.max_replicas == s.max_batch == 1 else SERVE_CALLS
        tiers.append(TierLoad(t.name, s.instances, total / s.instances, s.min_replicas, s.max_replicas, s.max_batch,
                              calls * call_seconds(desc), desc.cores, slots(t.nodes, desc.cores, desc.cores)))
    overhead = np.array([call_overhead_seconds(target(t.target)) for t in ctx.tiers])
    fixed = np.where(graph.inputs[:, None], 0.0, np.minimum(graph.compute, overhead[None, :]))
    return Load(tuple(tiers), fixed)


def call_overhead_seconds(desc: TargetDesc) -> float:
    """Seconds of one node's call on ``desc`` that a batch does not multiply: its kernel launch on a
    GPU, its framework dispatch on a CPU (``partc.costmodel``'s per-node dispatch of the reference
    host, scaled to the target)."""
    if desc.kind == "gpu":
        return desc.launch_overhead_us * 1e-6
    reference = load_calibration().reference
    return reference.dispatch_us * 1e-6 * dispatch_scale(reference, desc)


def program_seconds(gm: fx.GraphModule, tier: str) -> float:
    """Predicted seconds of a stage program on ``tier``: its compute nodes' META_PROFILE.

    Placeholders carry their producer's metadata and are not counted (the producer runs elsewhere).
    """
    return sum(n.meta.get(META_PROFILE, {}).get(tier, 0.0) for n in compute_nodes(gm))


def cost_graph(gm: fx.GraphModule, ctx: CompileContext) -> CostGraph:
    """Return the cost graph of ``gm`` on ``ctx``'s tiers, links and constraints.

    Nodes are every node but the output, in graph order. Reads meta[META_PROFILE],
    meta[META_BYTES], meta[META_PARAM_BYTES].

    Raises:
        ClusterError: for a missing link between consecutive tiers, or a constraint that
            names an unknown tier, link or node, or that contradicts another.
        PartcError: if a node has no profile for a tier.
    """
    tiers = ctx.tier_names
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    compute = np.zeros((len(nodes), len(tiers)))
    for i, node in enumerate(nodes):
        profile = node.meta.get(META_PROFILE, {})
        missing = [t for t in tiers if t not in profile]
        if missing:
            raise PartcError(f"node {node.name!r} has no profile for tier {missing[0]!r}; run annotate-profile first")
        compute[i] = [profile[t] for t in tiers]
    links = [ctx.link(a, b) for a, b in zip(tiers, tiers[1:], strict=False)]
    for (a, b), link in zip(zip(tiers, tiers[1:], strict=False), links, strict=True):
        if link is None:
            raise ClusterError(
                f"{ctx.source}: links: no link from {a} to {b}; data moves tier by tier, "
                "so every pair of consecutive tiers needs one"
            )
    nbytes = np.array([n.meta[META_BYTES] for n in nodes], dtype=np.int64)
    edges = sorted({(index[a], index[v]) for v in nodes for a in v.all_input_nodes})
    inputs = np.array([n.op == "placeholder" for n in nodes])
    return CostGraph(
        names=tuple(n.name for n in nodes),
        tiers=tiers,
        compute=compute,
        nbytes=nbytes,
        memory=nbytes + np.array([n.meta.get(META_PARAM_BYTES, 0) for n in nodes], dtype=np.int64),
        edges=np.array(edges, dtype=np.int64).reshape(-1, 2),
        inputs=inputs,
        latency=np.array([lk.latency for lk in links], dtype=float),
        bandwidth=np.array([lk.bandwidth for lk in links], dtype=float),
        allowed=_allowed(nodes, inputs, edges, ctx),
        max_link_bytes=_link_caps(ctx),
        max_memory=np.array([ctx.constraints.max_memory.get(t, np.inf) for t in tiers], dtype=float),
    )


def _allowed(nodes: list[fx.Node], inputs: np.ndarray, edges: list[tuple[int, int]], ctx: CompileContext):
    """The (n, K) mask of tiers each node may take, from inputs, pins and forbids."""
    tiers = ctx.tier_names
    constraints = ctx.constraints
    for tier in [*constraints.pin, *constraints.forbid, *constraints.max_memory]:
        if tier not in tiers:
            raise ClusterError(f"{ctx.source}: constraints: unknown tier {tier!r}; tiers are {', '.join(tiers)}")
    allowed = np.ones((len(nodes), len(tiers)), dtype=bool)
    allowed[inputs, 1:] = False
    allowed[~inputs] &= ~np.isin(np.array(tiers), constraints.forbid)
    pinned: dict[int, str] = {}
    for tier, patterns in constraints.pin.items():
        for pattern in patterns:
            hits = [i for i, n in enumerate(nodes) if _matches(n, pattern)]
            if not hits:
                raise ClusterError(
                    f"{ctx.source}: constraints.pin[{tier}]: {pattern!r} matches no node; "
                    + _near_matches(nodes, pattern) + " (node names and module paths such as 'layer1.*' work)"
                )
            for i in hits:
                name = nodes[i].name
                if pinned.get(i, tier) != tier:
                    raise ClusterError(
                        f"{ctx.source}: constraints.pin: {name} is pinned to both {pinned[i]} and {tier}"
                    )
                if tier in constraints.forbid:
                    raise ClusterError(
                        f"{ctx.source}: constraints.pin: {name} is pinned to {tier}, which constraints.forbid excludes"
                    )
                if inputs[i] and tier != tiers[0]:
                    raise ClusterError(
                        f"{ctx.source}: constraints.pin: {name} is a model input; it originates on {tiers[0]}"
                    )
                pinned[i] = tier
                allowed[i] = np.array(tiers) == tier
    _check_pin_order(nodes, edges, pinned, tiers, ctx.source)
    return allowed


def _near_matches(nodes: list[fx.Node], pattern: str) -> str:
    """Names ``pattern`` comes close to: nodes' names and their modules' paths (and those paths' prefixes)."""
    names = {n.name for n in nodes}
    for n in nodes:
        if n.op == "call_module":
            parts = str(n.target).split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    close = difflib.get_close_matches(pattern.rstrip(".*"), sorted(names), n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"node names look like {', '.join(n.name for n in nodes[1:4])}"


def _matches(node: fx.Node, pattern: str) -> bool:
    """Whether ``pattern`` names ``node``: its name, its module's path, or a module that holds it
    (``conv1`` matches ``conv1.conv`` and ``conv1.bn`` of a block called ``conv1``)."""
    if fnmatch.fnmatchcase(node.name, pattern):
        return True
    target = str(node.target)
    return node.op == "call_module" and (fnmatch.fnmatchcase(target, pattern)
                                         or fnmatch.fnmatchcase(target, f"{pattern}.*"))


def _check_pin_order(nodes, edges, pinned: dict[int, str], tiers: tuple[str, ...], source: str) -> None:
    """Raise if a node is pinned to an earlier tier than one of its ancestors."""
    rank = {t: k for k, t in enumerate(tiers)}
    latest: list[tuple[int, int] | None] = [None] * len(nodes)  # (tier, pinned ancestor) per node
    preds: list[list[int]] = [[] for _ in nodes]
    for a, b in edges:
        preds[b].append(a)
    for v in range(len(nodes)):  # graph order is topological
        best = max((latest[p] for p in preds[v] if latest[p] is not None), default=None)
        if v in pinned:
            if best is not None and best[0] > rank[pinned[v]]:
                raise ClusterError(
                    f"{source}: constraints.pin: {nodes[best[1]].name} is pinned to {tiers[best[0]]} but "
                    f"{nodes[v].name}, which consumes its output, is pinned to {pinned[v]}; "
                    "data cannot flow back a tier"
                )
            best = max(best or (-1, -1), (rank[pinned[v]], v))
        latest[v] = best


def _link_caps(ctx: CompileContext) -> np.ndarray:
    tiers = ctx.tier_names
    pairs = list(zip(tiers, tiers[1:], strict=False))
    for pair in ctx.constraints.max_link_bytes:
        if tuple(pair) not in pairs:
            raise ClusterError(
                f"{ctx.source}: constraints.max_link_bytes: no link {link_name(*pair)}; "
                f"links are {', '.join(link_name(a, b) for a, b in pairs)}"
            )
    return np.array([ctx.constraints.max_link_bytes.get(p, np.inf) for p in pairs], dtype=float)
