"""The partition problems min-cut cannot express, as exact mixed-integer programs (HiGHS).

Used for the throughput objective (minimise the slowest stage) and for byte or memory
caps. Variables: binary y[v, b] = [tier(v) > b] for every node v and link b; continuous
z[u, b] in [0, 1], at least y[w, b] - y[u, b] for every consumer w of u (tensor u crosses
link b); continuous used[b] >= y[v, b] (the pipeline reaches past link b); and, for
throughput, the bottleneck t. The cost model is ``partc.partition.cost``'s.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from partc.errors import ClusterError
from partc.partition.cost import CostGraph, Partition, check_labels, evaluate, format_size


class _Program:
    """Index bookkeeping and shared constraints of one partition MILP."""

    def __init__(self, graph: CostGraph):
        self.graph = graph
        n, n_tiers = graph.compute.shape
        self.n_links = n_links = n_tiers - 1
        self.y = np.arange(n * n_links).reshape(n, n_links)
        moving = [a for a in range(n) if graph.nbytes[a] > 0]
        self.producers = np.array(sorted(set(graph.edges[:, 0].tolist()) & set(moving)), dtype=np.int64)
        base = n * n_links
        self.z = base + np.arange(self.producers.size * n_links).reshape(self.producers.size, n_links)
        base += self.z.size
        self.used = base + np.arange(n_links)
        self.t = base + n_links
        self.size = self.t + 1
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = []
        self.lower = np.zeros(self.size)
        self.upper = np.ones(self.size)
        self.upper[self.t] = np.inf
        self._structure()

    def add(self, cols, coefs, lo: float, hi: float) -> None:
        """Add the row lo <= sum coefs * x[cols] <= hi."""
        self.rows.append((np.asarray(cols), np.asarray(coefs, dtype=float), lo, hi))

    def _pairs(self, left: np.ndarray, right: np.ndarray) -> None:
        """Add rows x[left] - x[right] <= 0, element by element."""
        for a, b in zip(left.ravel().tolist(), right.ravel().tolist(), strict=True):
            self.add([a, b], [1.0, -1.0], -np.inf, 0.0)

    def _structure(self) -> None:
        graph, y = self.graph, self.y
        self._pairs(y[:, 1:], y[:, :-1])
        u, w = graph.edges[:, 0], graph.edges[:, 1]
        self._pairs(y[u], y[w])
        z_row = {a: i for i, a in enumerate(self.producers.tolist())}
        for a, b in graph.edges.tolist():
            if a in z_row:
                for link in range(self.n_links):
                    self.add([y[b, link], y[a, link], self.z[z_row[a], link]], [1, -1, -1], -np.inf, 0)
        for link in range(self.n_links):
            self._pairs(y[:, link], np.full(len(y), self.used[link]))
        for v, k in zip(*np.nonzero(~graph.allowed), strict=True):
            if k == 0:
                self.lower[y[v, 0]] = 1
            elif k == self.n_links:
                self.upper[y[v, k - 1]] = 0
            else:
                self.add([y[v, k - 1], y[v, k]], [1, -1], 0, 0)

    def tier_load(self, k: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(cols, coefs, constant) of sum_v weights[v] * [tier(v) == k]."""
        y, cols, coefs, const = self.y, [], [], 0.0
        if k == 0:
            const = float(weights.sum())
        else:
            cols.append(y[:, k - 1])
            coefs.append(weights)
        if k < self.n_links:
            cols.append(y[:, k])
            coefs.append(-weights)
        return np.concatenate(cols), np.concatenate(coefs), const

    def link_bytes(self, link: int) -> tuple[np.ndarray, np.ndarray]:
        """(cols, coefs) of the bytes crossing ``link``."""
        return self.z[:, link], self.graph.nbytes[self.producers].astype(float)

    def add_caps(self) -> None:
        """Add the byte and memory caps of the graph."""
        graph = self.graph
        for link, cap in enumerate(graph.max_link_bytes):
            if np.isfinite(cap):
                self.add(*self.link_bytes(link), -np.inf, float(cap))
        for k, cap in enumerate(graph.max_memory):
            if np.isfinite(cap):
                cols, coefs, const = self.tier_load(k, graph.memory.astype(float))
                self.add(cols, coefs, -np.inf, float(cap) - const)

    def run(self, objective: np.ndarray, time_limit: float):
        """Solve min objective @ x; returns scipy's OptimizeResult."""
        integrality = np.zeros(self.size)
        integrality[self.y.ravel()] = 1
        row_ids = np.concatenate([np.full(len(c), i) for i, (c, *_rest) in enumerate(self.rows)])
        matrix = sparse.csr_array(
            (np.concatenate([r[1] for r in self.rows]), (row_ids, np.concatenate([r[0] for r in self.rows]))),
            shape=(len(self.rows), self.size),
        )
        constraint = LinearConstraint(matrix, [r[2] for r in self.rows], [r[3] for r in self.rows])
        return milp(
            objective,
            constraints=constraint,
            integrality=integrality,
            bounds=Bounds(self.lower, self.upper),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
        )

    def tiers(self, x: np.ndarray) -> np.ndarray:
        """The assignment encoded by a solution vector."""
        return np.rint(x[self.y]).astype(np.int64).sum(axis=1)


def solve_milp(graph: CostGraph, objective: str, *, time_limit: float = 60.0) -> Partition:
    """Return an optimal partition by MILP, for latency or throughput, with all constraints.

    For throughput, a second MILP then picks, among the plans with the optimal bottleneck,
    one of least latency (kept only if its bottleneck is no worse). If HiGHS stops at
    ``time_limit`` with a plan, the plan is returned with the proven gap between its cost
    and HiGHS's dual bound.

    Raises:
        ClusterError: naming the cap that cannot be met (or the caps that cannot be met
            together), with the smallest value any plan reaches.
    """
    program = _Program(graph)
    program.add_caps()
    latency = _latency_objective(program)
    if objective == "latency":
        c = latency
    else:
        c = np.zeros(program.size)
        c[program.t] = 1.0
        for k in range(graph.compute.shape[1]):
            cols, coefs, const = program.tier_load(k, graph.compute[:, k])
            program.add([*cols, program.t], [*coefs, -1.0], -np.inf, -const)
        for link in range(program.n_links):
            cols, coefs = program.link_bytes(link)
            program.add([*cols, program.t], [*(coefs / graph.bandwidth[link]), -1.0], -np.inf, 0.0)
    started = time.perf_counter()
    result = program.run(c, time_limit)
    if result.x is None:
        if result.status == 2:
            raise _infeasible_caps(graph)
        raise ClusterError(f"the partition solver stopped without a plan: {result.message}")
    tiers = program.tiers(result.x)
    cost = evaluate(graph, tiers)
    gap = 0.0
    if result.status != 0:
        gap = max(cost.value(objective) - _constant(graph, objective) - result.mip_dual_bound, 0.0)
    elif objective == "throughput":
        program.upper[program.t] = cost.bottleneck
        second = program.run(latency, max(time_limit - (time.perf_counter() - started), 1.0))
        if second.x is not None:
            better = program.tiers(second.x)
            if evaluate(graph, better).bottleneck <= cost.bottleneck:
                tiers, cost = better, evaluate(graph, better)
    return Partition(tiers, cost, "milp", gap=gap)


def _latency_objective(program: _Program) -> np.ndarray:
    """The latency objective vector, without its constant term (``_constant``)."""
    graph = program.graph
    c = np.zeros(program.size)
    for k in range(graph.compute.shape[1]):
        cols, coefs, _ = program.tier_load(k, graph.compute[:, k])
        np.add.at(c, cols, coefs)
    c[program.used] = graph.latency
    for link in range(program.n_links):
        cols, coefs = program.link_bytes(link)
        c[cols] += coefs / graph.bandwidth[link]
    return c


def _constant(graph: CostGraph, objective: str) -> float:
    """The objective's constant term, left out of the MILP's objective vector."""
    return float(graph.compute[:, 0].sum()) if objective == "latency" else 0.0


def _smallest(graph: CostGraph, kind: str, index: int) -> float:
    """The least bytes on link ``index`` (kind "link") or memory on tier ``index`` (kind
    "memory") that any plan meeting the pins and forbids reaches."""
    program = _Program(graph)
    c = np.zeros(program.size)
    if kind == "link":
        cols, coefs = program.link_bytes(index)
        const = 0.0
    else:
        cols, coefs, const = program.tier_load(index, graph.memory.astype(float))
    np.add.at(c, cols, coefs)
    result = program.run(c, 60.0)
    return (
        float(evaluate(graph, program.tiers(result.x)).link_bytes[index])
        if kind == "link"
        else float(result.fun + const)
    )


def _infeasible_caps(graph: CostGraph) -> ClusterError:
    check_labels(graph)
    uncapped = _uncapped(graph)
    for link, cap in enumerate(graph.max_link_bytes):
        if np.isfinite(cap):
            least = _smallest(uncapped, "link", link)
            if least > cap:
                return ClusterError(
                    f"constraints.max_link_bytes[{graph.links[link]}]: {format_size(cap)} cannot be met: "
                    f"the smallest feasible cut sends {format_size(least)}; raise the cap or relax constraints.pin"
                )
    for k, cap in enumerate(graph.max_memory):
        if np.isfinite(cap):
            least = _smallest(uncapped, "memory", k)
            if least > cap:
                return ClusterError(
                    f"constraints.max_memory[{graph.tiers[k]}]: {format_size(cap)} cannot be met: every feasible plan "
                    f"needs at least {format_size(least)} on {graph.tiers[k]}; raise the cap or relax constraints.pin"
                )
    caps = [
        f"max_link_bytes[{lk}]" for lk, cap in zip(graph.links, graph.max_link_bytes, strict=True) if np.isfinite(cap)
    ]
    caps += [f"max_memory[{t}]" for t, cap in zip(graph.tiers, graph.max_memory, strict=True) if np.isfinite(cap)]
    return ClusterError(f"constraints {', '.join(caps)} cannot be met together (each can alone); raise one of them")


def _uncapped(graph: CostGraph) -> CostGraph:
    return replace(
        graph,
        max_link_bytes=np.full_like(graph.max_link_bytes, np.inf),
        max_memory=np.full_like(graph.max_memory, np.inf),
    )
