"""The exact solver: ``solve`` picks the min-cut (``LayeredCut``) or the MILP (``partc.partition.milp``).

Cost semantics are those of ``partc.partition.cost``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from partc.context import OBJECTIVES
from partc.errors import ClusterError
from partc.partition.cost import CostGraph, Partition, check_labels, evaluate, violations
from partc.partition.milp import solve_milp

_UNITS = 2**29  # a finite cut is scaled into [0, 2**29]; scipy's max-flow works in int32
_INF = 2**30  # capacity of edges that must never be cut


def solve(graph: CostGraph, objective: str = "latency", *, time_limit: float = 60.0) -> Partition:
    """Return an optimal partition of ``graph`` for ``objective``.

    Latency with pin/forbid constraints only: a min-cut (``LayeredCut``), optimal up to
    ``Partition.gap``, the proven effect of rounding capacities to integers (about
    4e-9 * E * U: E nodes + produced tensors x links, U a feasible plan's cost above each
    node's cheapest tier; 1e-5 of U for 1,000 nodes, far less in practice).
    Throughput, or any byte or memory cap: an exact MILP (HiGHS); if it stops at
    ``time_limit`` seconds, the best plan found is returned with its proven gap.

    Raises:
        ClusterError: if the constraints cannot be met; the message names the constraint.
        ValueError: for an unknown objective.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if len(graph.tiers) == 1:
        check_labels(graph)
        tiers = np.zeros(len(graph.names), dtype=np.int64)
        if violations(graph, tiers):
            raise ClusterError(f"constraints: {violations(graph, tiers)[0]} cannot be met with a single tier")
        return Partition(tiers, evaluate(graph, tiers), "single-tier")
    if objective == "latency" and not graph.has_caps:
        return LayeredCut(graph).solve(graph.bandwidth)
    check_labels(graph)
    return solve_milp(graph, objective, time_limit=time_limit)


class LayeredCut:
    """The latency problem as a minimum s-t cut, built once and re-solved per bandwidth.

    Every node v has K-1 boundary variables y[v, b] = [tier(v) > b], vertex (v, b) on the
    source side. Edges: a chain s -> (v, 0) -> ... -> (v, K-2) -> t whose k-th edge costs
    compute[v, k] (infinite where tier k is not allowed), infinite reverse chain edges
    (labels stay ordered), infinite (u, b) -> (w, b) per data edge u -> w (no backward flow),
    per produced tensor and link an edge (w, b) -> (u, b) of nbytes / bandwidth[b], via an
    auxiliary vertex with infinite in-edges when u has several consumers (paid once), and
    per link an auxiliary vertex fed by every (v, b) with an edge of latency[b] to t.

    Each node's cheapest allowed compute is subtracted from its chain (every plan pays it;
    this halves max-flow time). Capacities are then scaled to integers (scipy's max-flow is
    int32): with U the reduced cost of a feasible reference plan (so the minimum cut is at
    most U), 2U maps to 2**29 - E units
    (E: the most finite edges any cut can hold), capacities above 2U are clamped to 2U
    (a cut through such an edge costs more than U either way, so it is never minimum),
    and infinite ones get 2**30. Each cut's value moves by at most E / 2 units under
    rounding, so the returned plan costs at most E / scale seconds more than the
    optimum: ``Partition.gap``, about 4e-9 * E * U.

    Raises:
        ClusterError: (from the constructor) if pins and forbids leave a node no tier.
    """

    def __init__(self, graph: CostGraph):
        self.graph = graph
        self._reference = check_labels(graph)
        n, n_tiers = graph.compute.shape
        n_links = n_tiers - 1
        var = 2 + np.arange(n * n_links).reshape(n, n_links)
        self._var = var
        chain = np.column_stack([np.zeros(n, dtype=np.int64), var, np.ones(n, dtype=np.int64)])
        unary = np.where(graph.allowed, graph.compute, np.inf)
        # Every plan pays each node's cheapest allowed tier: cut only what is above it.
        unary -= unary.min(axis=1, keepdims=True)
        self._reduced = replace(graph, compute=np.where(graph.allowed, unary, graph.compute))
        src = [chain[:, :-1].ravel(), var[:, 1:].ravel()]
        dst = [chain[:, 1:].ravel(), var[:, :-1].ravel()]
        cap = [unary.ravel(), np.full(n * max(n_links - 1, 0), np.inf)]
        u, w = graph.edges[:, 0], graph.edges[:, 1]
        src.append(var[u].ravel())
        dst.append(var[w].ravel())
        cap.append(np.full(u.size * n_links, np.inf))
        moving = graph.nbytes[u] > 0
        producers, first, counts = np.unique(u[moving], return_index=True, return_counts=True)
        shared = counts > 1
        next_id = 2 + n * n_links
        aux = next_id + np.arange(shared.sum() * n_links).reshape(-1, n_links)
        next_id += aux.size
        tails = np.empty((producers.size, n_links), dtype=np.int64)
        tails[~shared] = var[w[moving][first[~shared]]]
        tails[shared] = aux
        rank = np.full(n, -1)
        rank[producers[shared]] = np.arange(shared.sum())
        fan = moving & (rank[u] >= 0)
        src.append(var[w[fan]].ravel())
        dst.append(aux[rank[u[fan]]].ravel())
        cap.append(np.full(fan.sum() * n_links, np.inf))
        lat_aux = next_id + np.arange(n_links)
        next_id += n_links
        src.append(var.T.ravel())
        dst.append(np.repeat(lat_aux, n))
        cap.append(np.full(n * n_links, np.inf))
        self._fixed = (np.concatenate(src), np.concatenate(dst), np.concatenate(cap))
        self._transfer = (
            np.concatenate([tails.ravel(), lat_aux]),
            np.concatenate([var[producers].ravel(), np.ones(n_links, dtype=np.int64)]),
            np.concatenate([np.repeat(graph.nbytes[producers].astype(float), n_links), np.full(n_links, -1.0)]),
            np.concatenate([np.tile(np.arange(n_links), producers.size), np.arange(n_links)]),
        )
        self.n_vertices = next_id
        self._finite_edges = n + producers.size * n_links + n_links

    def solve(self, bandwidth) -> Partition:
        """Return the min-cut partition for these link bandwidths (bytes per second)."""
        graph = self.graph.with_bandwidth(bandwidth)
        f_src, f_dst, f_cap = self._fixed
        t_src, t_dst, t_bytes, t_link = self._transfer
        t_cap = np.where(t_bytes < 0, graph.latency[t_link], t_bytes / graph.bandwidth[t_link])
        cap = np.concatenate([f_cap, t_cap])
        reduced = self._reduced.with_bandwidth(graph.bandwidth)
        bound = min(evaluate(reduced, tiers).latency for tiers in self._reference)
        scale = (_UNITS - self._finite_edges) / (2 * bound) if bound > 0 else 1.0
        finite = np.isfinite(cap)
        units = np.full(cap.size, _INF, dtype=np.int64)
        units[finite] = np.rint(np.minimum(cap[finite], 2 * bound) * scale)
        src = np.concatenate([f_src, t_src])
        dst = np.concatenate([f_dst, t_dst])
        keep = units > 0
        size = self.n_vertices
        capacity = sparse.csr_array((units[keep].astype(np.int32), (src[keep], dst[keep])), shape=(size, size))
        capacity.sum_duplicates()
        flow = maximum_flow(capacity, 0, 1).flow
        residual = (capacity - flow).tocsr()
        residual.data = (residual.data > 0).astype(np.int8)
        residual.eliminate_zeros()
        reached = breadth_first_order(residual, 0, directed=True, return_predecessors=False)
        source_side = np.zeros(size, dtype=bool)
        source_side[reached] = True
        tiers = source_side[self._var].sum(axis=1)
        return Partition(tiers, evaluate(graph, tiers), "min-cut", gap=self._finite_edges / scale)
