"""Shared cases for the cut tests: three-tier clusters and FLOP-proportional profiles."""

from __future__ import annotations

from torch import fx

from partc.context import CompileContext, Constraints, Link, Tier
from partc.ir import META_FLOPS, META_PROFILE

# FLOP/s of each tier, and a fixed overhead per op (seconds).
SPEEDS = {"device": 2e9, "edge": 2e10, "cloud": 2e11}
OVERHEAD = {"device": 2e-5, "edge": 1e-5, "cloud": 5e-6}


def cluster(
    up: float = 20e6 / 8, back: float = 50e6 / 8, *, constraints: Constraints | None = None, objective="latency"
) -> CompileContext:
    """device -> edge -> cloud, with ``up`` and ``back`` bytes/s on the two links."""
    return CompileContext(
        tiers=tuple(Tier(t, "cpu", "torchscript") for t in SPEEDS),
        links=(Link("device", "edge", up, 0.005), Link("edge", "cloud", back, 0.03)),
        objective=objective,
        constraints=constraints or Constraints(),
    )


def profile(gm: fx.GraphModule) -> fx.GraphModule:
    """Write a FLOP-proportional META_PROFILE on every node (0 for inputs and outputs), in place."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            node.meta[META_PROFILE] = dict.fromkeys(SPEEDS, 0.0)
        else:
            node.meta[META_PROFILE] = {t: node.meta[META_FLOPS] / SPEEDS[t] + OVERHEAD[t] for t in SPEEDS}
    return gm
