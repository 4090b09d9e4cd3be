"""Exact device → edge → cloud partitioning of a DAG, on a plain cost graph.

The solver works on ``CostGraph`` (arrays, no torch), built from the IR by
``partc.passes.cut.cost_graph``. Tiers are numbered 0..K-1 in data-flow order; link ``b``
joins tier ``b`` to tier ``b + 1``.

Cost model (the same for the solver, the baselines and the brute-force tests):

- A node on tier ``k`` costs ``compute[v, k]`` seconds.
- A tensor produced on tier ``i`` whose last consumer runs on tier ``j > i`` crosses every
  link ``i .. j-1`` once (hop by hop, through the intermediate tiers), however many
  consumers it has; on link ``b`` it costs ``nbytes / bandwidth[b]``. Links that skip a
  tier are not used.
- Link ``b``'s one-way ``latency[b]`` is paid once per inference when the pipeline reaches
  past it, i.e. when some node runs on a tier beyond ``b``.
- The model input originates on tier 0 (placeholders may only be on tier 0). Results are
  delivered where they are computed: there is no return trip.
- Latency = compute on every tier + transfer on every link (a request runs the tiers one
  after the other). Throughput bottleneck = the slowest stage in steady state:
  ``max(compute on each tier, bytes on each link / bandwidth)``; link latency is
  propagation delay and does not limit a pipelined stream.
- Memory of a tier = parameter bytes + output bytes of the nodes it runs (every
  activation counted as held: an upper bound on the peak).

``solve`` is exact. Latency with only pin/forbid constraints is a minimum s-t cut of an
Ishikawa-style layered graph (``LayeredCut``) solved by scipy's C max-flow; any other case
is a mixed-integer program (``partc.partition.milp``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from partc.errors import ClusterError
from partc.ir import link_name
from partc.partition.load import LoadCost
from partc.partition.price import LinkPrice, Prediction


@dataclass(frozen=True)
class CostGraph:
    """A DAG with per-tier costs: what the partitioner optimises.

    Attributes:
        names: node names, in a topological order.
        tiers: tier names in data-flow order.
        compute: (n, K) seconds of each node on each tier.
        nbytes: (n,) bytes of each node's output (0: free to move).
        memory: (n,) parameter + output bytes of each node.
        edges: (E, 2) int array of (producer, consumer) node indices, without duplicates.
        inputs: (n,) bool, the model inputs (they originate on tier 0 and stay there).
        latency: (K-1,) one-way latency of link b (tier b -> b+1), seconds.
        bandwidth: (K-1,) bandwidth of link b, bytes per second.
        allowed: (n, K) bool, the tiers each node may run on (pins, forbids, input origin).
        max_link_bytes: (K-1,) most bytes per inference on each link (inf: no cap).
        max_memory: (K,) most memory on each tier (inf: no cap).
    """

    names: tuple[str, ...]
    tiers: tuple[str, ...]
    compute: np.ndarray
    nbytes: np.ndarray
    memory: np.ndarray
    edges: np.ndarray
    inputs: np.ndarray
    latency: np.ndarray
    bandwidth: np.ndarray
    allowed: np.ndarray
    max_link_bytes: np.ndarray
    max_memory: np.ndarray

    @property
    def links(self) -> tuple[str, ...]:
        """Link names (``partc.ir.link_name``), in order."""
        return tuple(link_name(a, b) for a, b in zip(self.tiers, self.tiers[1:], strict=False))

    @property
    def prices(self) -> tuple[LinkPrice, ...]:
        """The links as ``partc.partition.price`` prices them (bandwidths as the graph holds them)."""
        return tuple(LinkPrice(name, float(bw), float(lat))
                     for name, bw, lat in zip(self.links, self.bandwidth, self.latency, strict=True))

    @property
    def has_caps(self) -> bool:
        """Whether a byte or memory cap constrains the plan."""
        return bool(np.isfinite(self.max_link_bytes).any() or np.isfinite(self.max_memory).any())

    def with_bandwidth(self, bandwidth) -> CostGraph:
        """Return a copy with other link bandwidths (bytes per second)."""
        return replace(self, bandwidth=np.asarray(bandwidth, dtype=float))

    def last_consumer(self, tiers: np.ndarray) -> np.ndarray:
        """Return, per node, the highest tier among itself and its consumers."""
        reach = np.array(tiers, dtype=np.int64)
        np.maximum.at(reach, self.edges[:, 0], reach[self.edges[:, 1]])
        return reach


@dataclass(frozen=True)
class Cost:
    """The predicted cost of one assignment.

    Attributes:
        compute: seconds of compute on each tier.
        transfer: seconds on each link (its latency when used + bytes / bandwidth).
        link_bytes: bytes crossing each link per inference.
        memory: bytes of parameters + activations on each tier.
        latency: end-to-end seconds: all compute plus all transfer.
        bottleneck: seconds of the slowest pipeline stage (tier compute or link bytes).
        load: the plan under the fleet's load (``partc.partition.load``), when the cluster
            file gives a rate; then ``value`` is its figure.
    """

    compute: tuple[float, ...]
    transfer: tuple[float, ...]
    link_bytes: tuple[int, ...]
    memory: tuple[int, ...]
    latency: float
    bottleneck: float
    load: LoadCost | None = None

    def value(self, objective: str) -> float:
        """The figure ``objective`` minimises: latency or bottleneck, under load when priced so."""
        if self.load is not None:
            return self.load.value(objective)
        return self.latency if objective == "latency" else self.bottleneck

    def rank(self, objective: str) -> tuple[float, float]:
        """How plans are ordered: by ``value``, then (plans overloaded alike) by their worst peak
        utilisation, so that the least overloaded plan comes first."""
        worst = max((u.peak_utilisation for u in self.load.overloaded), default=0.0) if self.load else 0.0
        return self.value(objective), worst

    @classmethod
    def of(cls, prediction: Prediction, links: Sequence[LinkPrice], memory: Sequence[int],
           load: LoadCost | None = None) -> Cost:
        """The figures of ``prediction`` on ``links``, per tier and link, with each tier's ``memory``
        (and ``load``, its price under the fleet's load)."""
        return cls(
            compute=tuple(float(c) for c in prediction.compute.values()),
            transfer=tuple(prediction.transfer(links).values()),
            link_bytes=tuple(prediction.link_bytes.values()),
            memory=tuple(memory),
            latency=prediction.latency(links),
            bottleneck=prediction.bottleneck(links),
            load=load,
        )


@dataclass(frozen=True)
class Partition:
    """An assignment of every node to a tier, with its cost.

    Attributes:
        tiers: (n,) tier index of each node.
        cost: its predicted cost.
        method: how it was found ("min-cut", "milp", or a baseline's name).
        gap: proven bound on how far ``cost`` may be above the optimum, in seconds of the
            objective (0 for a proven optimum; rounding of min-cut capacities otherwise).
    """

    tiers: np.ndarray
    cost: Cost
    method: str
    gap: float = 0.0


def predict(graph: CostGraph, tiers: np.ndarray, compute: Mapping[str, float] | None = None) -> Prediction:
    """Return the ``Prediction`` of ``tiers`` (a tier index per node) under the cost model above.

    ``compute`` (tier -> seconds) replaces the per-tier sums of the nodes' seconds where a
    plan's stages are priced otherwise (tiled stages, ``partc.compilation``).
    """
    tiers = np.asarray(tiers, dtype=np.int64)
    n_tiers = len(graph.tiers)
    if compute is None:
        sums = np.bincount(tiers, weights=graph.compute[np.arange(len(tiers)), tiers], minlength=n_tiers)
        compute = dict(zip(graph.tiers, sums.tolist(), strict=True))
    reach = graph.last_consumer(tiers)
    link_bytes = [int(graph.nbytes[(tiers <= b) & (reach > b)].sum()) for b in range(n_tiers - 1)]
    return Prediction(dict.fromkeys(graph.tiers, 0.0) | dict(compute), dict(zip(graph.links, link_bytes, strict=True)),
                      graph.links[: int(tiers.max(initial=0))])


def evaluate(graph: CostGraph, tiers: np.ndarray) -> Cost:
    """Return the cost of ``tiers`` (a tier index per node) under the cost model above."""
    tiers = np.asarray(tiers, dtype=np.int64)
    memory = np.bincount(tiers, weights=graph.memory, minlength=len(graph.tiers))
    return Cost.of(predict(graph, tiers), graph.prices, tuple(int(m) for m in memory))


def format_size(nbytes: float) -> str:
    """Bytes for people: ``16 B``, ``4.1 kB``, ``3.1 MB``, ``1.2 GB`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def violations(graph: CostGraph, tiers: np.ndarray) -> list[str]:
    """Return the constraints ``tiers`` breaks (empty when it is a valid plan)."""
    tiers = np.asarray(tiers, dtype=np.int64)
    found = []
    u, w = graph.edges[:, 0], graph.edges[:, 1]
    back = np.flatnonzero(tiers[u] > tiers[w])
    if back.size:
        i = back[0]
        found.append(f"{graph.names[u[i]]} feeds {graph.names[w[i]]} on an earlier tier")
    bad = np.flatnonzero(~graph.allowed[np.arange(len(tiers)), tiers])
    if bad.size:
        found.append(f"{graph.names[bad[0]]} may not run on {graph.tiers[tiers[bad[0]]]}")
    cost = evaluate(graph, tiers)
    found += [
        f"max_link_bytes[{link}]"
        for link, nb, cap in zip(graph.links, cost.link_bytes, graph.max_link_bytes, strict=True)
        if nb > cap
    ]
    found += [
        f"max_memory[{tier}]"
        for tier, m, cap in zip(graph.tiers, cost.memory, graph.max_memory, strict=True)
        if m > cap
    ]
    return found


def check_labels(graph: CostGraph) -> tuple[np.ndarray, np.ndarray]:
    """Check that pins and forbids leave every node a tier consistent with data flow.

    Returns:
        (lo, hi): per node, the lowest and highest tier it can take; both are valid
        assignments as far as pins, forbids and data flow go.

    Raises:
        ClusterError: naming a node left without a tier.
        ValueError: if the graph's nodes are not in topological order.
    """
    n, n_tiers = graph.allowed.shape
    if graph.edges.size and not (graph.edges[:, 0] < graph.edges[:, 1]).all():
        raise ValueError("cost graph nodes must be in topological order (every edge from a lower index)")
    allowed = [[k for k, ok in enumerate(row) if ok] for row in graph.allowed.tolist()]
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for a, b in graph.edges.tolist():
        preds[b].append(a)
        succs[a].append(b)
    lo = [0] * n
    hi = [n_tiers - 1] * n
    for v in range(n):
        start = max((lo[p] for p in preds[v]), default=0)
        ok = [k for k in allowed[v] if k >= start]
        if not ok:
            raise _no_tier(graph, v, f"its inputs run on {graph.tiers[start]} or later")
        lo[v] = ok[0]
    for v in reversed(range(n)):
        stop = min((hi[s] for s in succs[v]), default=n_tiers - 1)
        ok = [k for k in allowed[v] if lo[v] <= k <= stop]
        if not ok:
            raise _no_tier(graph, v, f"its consumers must run on {graph.tiers[stop]} or earlier")
        hi[v] = ok[-1]
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def _no_tier(graph: CostGraph, v: int, why: str) -> ClusterError:
    allowed = ", ".join(t for t, ok in zip(graph.tiers, graph.allowed[v], strict=True) if ok) or "none"
    return ClusterError(
        f"constraints.pin/forbid: node {graph.names[v]!r} has no tier left: it may run on {allowed}, "
        f"but {why}; relax constraints.pin or constraints.forbid"
    )
