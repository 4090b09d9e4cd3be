"""The IR: a plain torch.fx ``GraphModule`` whose nodes carry partc metadata.

Every metadata key partc writes is defined here, once. Tracing (``partc.trace``) fills the
``META_OP`` .. ``META_PARAM_BYTES`` keys for every node; passes add the others.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import fx

# Written by tracing, for every node.
META_OP = "partc.op"  # operator name: "conv2d", "batchnorm2d", "add", "flatten", "placeholder", ...
META_KIND = "partc.kind"  # cost class of META_OP: one of KINDS
META_SHAPE = "partc.shape"  # tuple[int, ...] of the output tensor; None when the output is not one tensor
META_DTYPE = "partc.dtype"  # "float32", ...; None when the output is not one tensor
META_BYTES = "partc.bytes"  # bytes of every tensor in the output (0 for ints, shapes, ...)
META_FLOPS = "partc.flops"  # floating-point operations (a multiply-accumulate counts 2)
META_MACS = "partc.macs"  # multiply-accumulates of conv / linear / matmul / attention
META_PARAM_BYTES = "partc.param_bytes"  # bytes of the parameters and buffers the node reads

# Written by passes.
META_PROFILE = "partc.profile"  # dict[tier name, predicted seconds] (annotate-profile)
META_TIER = "partc.tier"  # tier name (select-cuts)
META_TILE = "partc.tile"  # (run index, node index) of a tiled or distributed node; node None: a stitch

# Written by passes on the graph (gm.meta), not on nodes.
# compress-cut-tensors: {link_name(src, dst): partc.codec.LinkCodec}, for every link between consecutive tiers.
META_LINK_CODECS = "partc.link_codecs"
# compress-cut-tensors, when it measured codecs: partc.compression.Measurements (every allowed codec on every node)
META_CODEC_MEASUREMENTS = "partc.codec_measurements"
# distribute-branches and tile-conv-stages: one dict per group of nodes run in parallel on a tier's nodes:
#   {"kind": "branches" | "tiles", "run": META_TILE run index, "tier", "nodes": nodes used, "sequential_s",
#    "parallel_s", and per kind "join", "branches" {first node of a branch: node} | "grid", "layers", "halo"}.
META_PARALLEL = "partc.parallel"
# The planner (partc.compilation), for the plan passes it runs: one dict shared by every variant of one
# compile's graph (``clone`` copies gm.meta shallowly), in which partc.tiling.split keeps each run's split.
META_SPLITS = "partc.splits"

KINDS = ("input", "output", "conv", "matmul", "pool", "norm", "elementwise", "data", "other")


def link_name(src: str, dst: str) -> str:
    """Return the name of the link from tier ``src`` to tier ``dst``: ``"src->dst"``, everywhere partc keys a link."""
    return f"{src}->{dst}"


def kind_of(node: fx.Node) -> str:
    """Return the cost class of ``node`` (one of ``KINDS``)."""
    return node.meta[META_KIND]


def tier_of(node: fx.Node) -> str:
    """Return the tier ``node`` is assigned to.

    Raises:
        KeyError: if no cut pass has assigned tiers yet.
    """
    return node.meta[META_TIER]


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Return the nodes that compute something, in topological order (no placeholders/outputs)."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a new GraphModule with a copy of ``gm``'s graph, sharing its weights.

    Node metadata dicts are copied, so a pass may add keys without touching ``gm``.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out)
    for old, new in zip(gm.graph.nodes, graph.nodes, strict=True):
        new.meta = copy.copy(old.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta = copy.copy(getattr(gm, "meta", {}))
    return new_gm


def lint(gm: fx.GraphModule, tiers: Sequence[str] = ()) -> None:
    """Check ``gm``: torch.fx's own lint, plus partc's invariants.

    When nodes carry ``META_TIER``, data must never flow back a tier: for every edge
    u -> v, ``tiers.index(tier(u)) <= tiers.index(tier(v))``.

    Raises:
        RuntimeError: if the graph is malformed (a bug in a pass, not bad input).
    """
    gm.graph.lint()
    if not tiers:
        return
    order = {t: i for i, t in enumerate(tiers)}
    for node in compute_nodes(gm):
        if META_TIER not in node.meta:
            continue
        for user in node.users:
            if META_TIER in user.meta and order[user.meta[META_TIER]] < order[node.meta[META_TIER]]:
                raise RuntimeError(
                    f"{node.name} ({node.meta[META_TIER]}) feeds {user.name} ({user.meta[META_TIER]}): "
                    "data flows back a tier"
                )
