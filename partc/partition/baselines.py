"""The classic partitioning strategies, priced by the same cost model as partc's solver.

- ``<tier>-only``: every node on one tier (the input still starts on the first tier).
- ``neurosurgeon``: the best single cut of the nodes in topological order, between any
  two tiers (Neurosurgeon, ASPLOS'17, treats the DAG as a chain).
- ``scission``: the best pair of cuts in topological order over three tiers (Scission's
  exhaustive search over ordered device/edge/cloud splits of a chain).
- ``d3-greedy``: a greedy horizontal partition in the spirit of D3's HPA: start from the
  best device|cloud chain cut, then move one cut at a time to its best position while
  that improves the objective.
- ``dads``: the best two-tier minimum cut over any pair of tiers (DADS/DNN Surgery's DSL,
  with the reverse infinite edges DADS lacks).

Chain strategies use the node order of the graph (a topological order). Each baseline
minimises the context's objective (``dads`` always minimises latency, as DSL does) and
respects pins, forbids and caps; one that cannot is reported as None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from partc.errors import ClusterError
from partc.partition.cost import CostGraph, Partition, evaluate, violations
from partc.partition.load import Load, load_values
from partc.partition.solve import LayeredCut


class ChainCosts:
    """Closed-form costs of chain plans: tier(v) = number of cuts <= v (inputs stay on tier 0).

    A plan is a nondecreasing vector of K-1 cut positions in [0, n]; ``costs`` prices many at
    once with prefix sums, in O(1) each.
    """

    def __init__(self, graph: CostGraph):
        self.graph = graph
        n, n_tiers = graph.compute.shape
        self.n = n
        inner = ~graph.inputs
        zero = np.zeros((1, n_tiers))
        self._compute = np.vstack([zero, np.cumsum(graph.compute * inner[:, None], axis=0)])
        self._memory = np.concatenate([[0.0], np.cumsum(graph.memory * inner)])
        self._banned = np.vstack([zero, np.cumsum(~graph.allowed & inner[:, None], axis=0)])
        self._base_compute = float(graph.compute[graph.inputs, 0].sum())
        self._base_memory = float(graph.memory[graph.inputs].sum())
        last = np.arange(n)
        np.maximum.at(last, graph.edges[:, 0], graph.edges[:, 1])
        first = np.where(graph.inputs, 0, np.arange(n) + 1)
        moves = last >= first
        delta = np.zeros(n + 2)
        np.add.at(delta, first[moves], graph.nbytes[moves])
        np.add.at(delta, last[moves] + 1, -graph.nbytes[moves])
        self._bytes = np.cumsum(delta)[: n + 1]
        inner_at = np.flatnonzero(inner)
        self._last_inner = int(inner_at[-1]) if inner_at.size else -1

    def split(self, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return, for each row of ``cuts`` (M, K-1): seconds per tier (M, K), seconds streaming on
        each link (M, K-1), and whether the plan is feasible (M,)."""
        graph = self.graph
        cuts = np.asarray(cuts, dtype=np.int64)
        bounds = np.column_stack([np.zeros(len(cuts), dtype=np.int64), cuts, np.full(len(cuts), self.n)])
        n_tiers = bounds.shape[1] - 1
        compute = np.stack(
            [self._compute[bounds[:, k + 1], k] - self._compute[bounds[:, k], k] for k in range(n_tiers)], axis=1
        )
        compute[:, 0] += self._base_compute
        memory = np.stack([self._memory[bounds[:, k + 1]] - self._memory[bounds[:, k]] for k in range(n_tiers)], 1)
        memory[:, 0] += self._base_memory
        banned = sum(self._banned[bounds[:, k + 1], k] - self._banned[bounds[:, k], k] for k in range(n_tiers))
        nbytes = self._bytes[cuts]
        feasible = (
            (banned == 0)
            & (np.diff(bounds, axis=1) >= 0).all(axis=1)
            & (nbytes <= graph.max_link_bytes).all(axis=1)
            & (memory <= graph.max_memory).all(axis=1)
        )
        return compute, nbytes / graph.bandwidth, feasible

    def costs(self, cuts: np.ndarray, objective: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (objective value, feasible) for each row of ``cuts`` (M, K-1)."""
        compute, stream, feasible = self.split(cuts)
        if objective == "latency":
            used = np.asarray(cuts) <= self._last_inner
            value = compute.sum(axis=1) + stream.sum(axis=1) + (used * self.graph.latency).sum(axis=1)
        else:
            value = np.maximum(compute.max(axis=1), stream.max(axis=1))
        return value, feasible

    def tiers(self, cuts) -> np.ndarray:
        """The assignment of one cut vector."""
        tiers = (np.arange(self.n)[:, None] >= np.asarray(cuts)[None, :]).sum(axis=1)
        return np.where(self.graph.inputs, 0, tiers)

    def best(self, cuts: np.ndarray, objective: str) -> np.ndarray | None:
        """The cheapest feasible row of ``cuts``, or None."""
        return _best(cuts, *self.costs(cuts, objective))


Price = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # rows of cuts -> (value, feasible)


def _best(cuts: np.ndarray, value: np.ndarray, feasible: np.ndarray) -> np.ndarray | None:
    value = np.where(feasible, value, np.inf)
    return cuts[int(np.argmin(value))] if np.isfinite(value).any() else None


def baselines(graph: CostGraph, objective: str = "latency") -> dict[str, Partition | None]:
    """Return every baseline's partition (None where the strategy has no feasible plan).

    Keys: ``<tier>-only`` for every tier, ``neurosurgeon``, ``scission`` (three tiers
    only), ``d3-greedy``, ``dads``.
    """
    chain = ChainCosts(graph)
    n, n_links = chain.n, len(graph.tiers) - 1
    found: dict[str, np.ndarray | None] = {}
    for k, tier in enumerate(graph.tiers):
        single = np.array([[0] * k + [n] * (n_links - k)])
        found[f"{tier}-only"] = chain.best(single, objective)
    found["neurosurgeon"] = chain.best(_single_cuts(n, n_links), objective)
    if n_links == 2:
        found["scission"] = _scission(chain.n, lambda rows: chain.costs(rows, objective))
    found["d3-greedy"] = _d3_greedy(chain.n, n_links, lambda rows: chain.costs(rows, objective))
    result = {
        name: None if cuts is None else Partition(chain.tiers(cuts), evaluate(graph, chain.tiers(cuts)), name)
        for name, cuts in found.items()
    }
    result["dads"] = _dads(graph, objective)
    return result


def _single_cuts(n: int, n_links: int) -> np.ndarray:
    """Every plan with one cut between tiers i < j: all nodes on i before the cut, j after."""
    rows = []
    positions = np.arange(n + 1)
    for i in range(n_links + 1):
        for j in range(i + 1, n_links + 1):
            block = np.empty((n + 1, n_links), dtype=np.int64)
            block[:, :i] = 0
            block[:, i:j] = positions[:, None]
            block[:, j:] = n
            rows.append(block)
    return np.vstack(rows) if rows else np.zeros((0, n_links), dtype=np.int64)


def _scission(n: int, price: Price) -> np.ndarray | None:
    """The best pair of chain cuts (first <= second) of ``n`` nodes, searched in blocks of about a million."""
    best, best_value = None, np.inf
    start = 0
    while start <= n:
        stop = start + 1
        while stop <= n and (stop - start) * (n + 1 - start) < 1_000_000:
            stop += 1
        first, second = np.meshgrid(np.arange(start, stop), np.arange(start, n + 1), indexing="ij")
        rows = np.column_stack([first.ravel(), second.ravel()])
        rows = rows[rows[:, 0] <= rows[:, 1]]
        value, feasible = price(rows)
        value = np.where(feasible, value, np.inf)
        i = int(np.argmin(value))
        if value[i] < best_value:
            best, best_value = rows[i], value[i]
        start = stop
    return best


def _d3_greedy(n: int, n_links: int, price: Price) -> np.ndarray | None:
    """From the best first|last tier cut, move one cut at a time to its best position while that helps."""
    rows = np.repeat(np.arange(n + 1)[:, None], n_links, axis=1)
    start = _best(rows, *price(rows))
    if start is None:
        return None
    cuts = start.copy()
    value = price(cuts[None, :])[0][0]
    improved = True
    while improved:
        improved = False
        for b in range(n_links):
            lo = cuts[b - 1] if b else 0
            hi = cuts[b + 1] if b + 1 < n_links else n
            rows = np.repeat(cuts[None, :], hi - lo + 1, axis=0)
            rows[:, b] = np.arange(lo, hi + 1)
            values, feasible = price(rows)
            values = np.where(feasible, values, np.inf)
            i = int(np.argmin(values))
            if values[i] < value * (1 - 1e-12):
                cuts, value, improved = rows[i], values[i], True
    return cuts


def _dads(graph: CostGraph, objective: str) -> Partition | None:
    """Best two-tier min-cut (latency, like DSL) over tier pairs, priced for ``objective``."""
    best = None
    n_tiers = len(graph.tiers)
    for i in range(n_tiers):
        for j in range(i + 1, n_tiers):
            pair = np.zeros(n_tiers, dtype=bool)
            pair[[i, j]] = True
            allowed = graph.allowed & (pair[None, :] | graph.inputs[:, None])
            restricted = replace(graph, allowed=allowed)
            try:
                tiers = LayeredCut(restricted).solve(graph.bandwidth).tiers
            except ClusterError:
                continue
            if violations(graph, tiers):
                continue
            plan = Partition(tiers, evaluate(graph, tiers), "dads")
            if best is None or plan.cost.value(objective) < best.cost.value(objective):
                best = plan
    return best


def fleet_cut(graph: CostGraph, load: Load, objective: str) -> np.ndarray | None:
    """The best chain plan under ``load`` (``partc.partition.load``), or None if none is feasible.

    Queueing makes the objective nonlinear in the cut, so the min-cut cannot price it; chain
    plans can be enumerated instead: every cut over two tiers, every pair of cuts over three
    (exact among chain plans), and the greedy search (``d3-greedy``) over more.
    """
    chain = ChainCosts(graph)
    fixed = ChainCosts(replace(graph, compute=load.fixed))
    n, n_links = chain.n, len(graph.tiers) - 1

    def price(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        compute, stream, feasible = chain.split(rows)
        value = load_values(load, compute, fixed.split(rows)[0], stream, chain.costs(rows, "latency")[0], objective)
        return value, feasible

    if n_links == 0:
        return None
    if n_links == 1:
        cuts = np.arange(n + 1)[:, None]
        found = _best(cuts, *price(cuts))
    else:
        found = _scission(n, price) if n_links == 2 else _d3_greedy(n, n_links, price)
    return None if found is None else chain.tiers(found)
