"""Shared cases for the cut tests: random cost DAGs with a brute-force optimum, three-tier
clusters, and FLOP-proportional profiles for traced models."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st
from torch import fx

from partc.context import CompileContext, Constraints, Link, Tier
from partc.ir import META_FLOPS, META_PROFILE
from partc.partition.cost import CostGraph

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


TIERS = ("device", "edge", "cloud")


def brute_force(graph: CostGraph, objective: str) -> float | None:
    """The optimal cost over every valid assignment, independently of the solver (None: infeasible)."""
    n, n_tiers = graph.compute.shape
    every = np.array(list(itertools.product(range(n_tiers), repeat=n)), dtype=np.int64).reshape(-1, n)
    ok = np.ones(len(every), dtype=bool)
    for u, w in graph.edges:
        ok &= every[:, u] <= every[:, w]
    for v in range(n):
        ok &= graph.allowed[v, every[:, v]]
    every = every[ok]
    compute = np.zeros((len(every), n_tiers))
    memory = np.zeros((len(every), n_tiers))
    for v in range(n):
        for k in range(n_tiers):
            on = every[:, v] == k
            compute[:, k] += np.where(on, graph.compute[v, k], 0.0)
            memory[:, k] += np.where(on, graph.memory[v], 0)
    reach = every.copy()
    for u, w in graph.edges:
        reach[:, u] = np.maximum(reach[:, u], every[:, w])
    link_bytes = np.zeros((len(every), n_tiers - 1))
    for b in range(n_tiers - 1):
        for v in range(n):
            link_bytes[:, b] += np.where((every[:, v] <= b) & (reach[:, v] > b), graph.nbytes[v], 0)
    ok = (link_bytes <= graph.max_link_bytes).all(axis=1) & (memory <= graph.max_memory).all(axis=1)
    if not ok.any():
        return None
    stream = link_bytes / graph.bandwidth
    if objective == "latency":
        used = every.max(axis=1)[:, None] > np.arange(n_tiers - 1)
        cost = compute.sum(axis=1) + stream.sum(axis=1) + (used * graph.latency).sum(axis=1)
    else:
        cost = np.maximum(compute.max(axis=1), stream.max(axis=1))
    return float(cost[ok].min())


@st.composite
def dags(draw, constrained: bool = False, max_nodes: int = 12) -> CostGraph:
    """Random DAGs of 2..max_nodes nodes (node 0 the input), 3 tiers, random costs and bytes;
    ``constrained`` adds random pins, a forbidden tier, a byte cap and a memory cap."""
    n = draw(st.integers(2, max_nodes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    edges = {(int(rng.integers(0, v)), v) for v in range(1, n)}
    edges |= {(a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.15}
    speed = np.array([1.0, 4.0, 16.0])
    work = rng.exponential(1.0, n) * (rng.random(n) < 0.9)
    work[0] = 0.0
    compute = np.outer(work, 1 / speed) * rng.uniform(0.5, 2.0, (n, 3))
    nbytes = rng.integers(0, 4_000_000, n) * (rng.random(n) < 0.85)
    memory = nbytes + rng.integers(0, 10_000_000, n)
    allowed = np.ones((n, 3), dtype=bool)
    allowed[0, 1:] = False
    max_link_bytes = np.full(2, np.inf)
    max_memory = np.full(3, np.inf)
    if constrained:
        for v in rng.choice(np.arange(1, n), size=min(int(rng.integers(0, 3)), n - 1), replace=False):
            allowed[v] = np.arange(3) == rng.integers(0, 3)
        if rng.random() < 0.3:
            allowed[1:, rng.integers(0, 3)] = False
        if rng.random() < 0.5:
            max_link_bytes[rng.integers(0, 2)] = float(rng.integers(0, 8_000_000))
        if rng.random() < 0.5:
            max_memory[rng.integers(0, 3)] = float(rng.integers(0, 40_000_000))
    return CostGraph(
        names=tuple(f"n{v}" for v in range(n)),
        tiers=TIERS,
        compute=compute,
        nbytes=nbytes,
        memory=memory,
        edges=np.array(sorted(edges), dtype=np.int64).reshape(-1, 2),
        inputs=np.arange(n) == 0,
        latency=rng.uniform(0.0, 0.05, 2),
        bandwidth=rng.uniform(1e6, 2e7, 2),
        allowed=allowed,
        max_link_bytes=max_link_bytes,
        max_memory=max_memory,
    )


def branching_graph() -> CostGraph:
    """A DAG where partc must beat every chain and single-tier plan.

    x -> s (cheap, tiny) -> p (heavy) -> join;  x -> q (cheap, big) -> r (cheap, tiny) -> join.
    Optimum: x, s, q, r on the device, p and join in the cloud: only s and r cross. Every
    prefix of the topological order x, s, p, q, r, join either runs p on the device or ships x.
    """
    names = ("x", "s", "p", "q", "r", "join")
    compute = np.array([[0, 0, 0], [1e-3, 1e-3, 1e-3], [1.0, 0.5, 0.01], [1e-3] * 3, [1e-3] * 3, [1e-3] * 3])
    return CostGraph(
        names=names,
        tiers=("device", "edge", "cloud"),
        compute=compute,
        nbytes=np.array([10_000_000, 1_000, 1_000, 10_000_000, 1_000, 1_000]),
        memory=np.zeros(6, dtype=np.int64),
        edges=np.array([(0, 1), (1, 2), (2, 5), (0, 3), (3, 4), (4, 5)]),
        inputs=np.arange(6) == 0,
        latency=np.array([0.001, 0.001]),
        bandwidth=np.array([1e6, 1e6]),
        allowed=np.vstack([[True, False, False], np.ones((5, 3), dtype=bool)]),
        max_link_bytes=np.full(2, np.inf),
        max_memory=np.full(3, np.inf),
    )
