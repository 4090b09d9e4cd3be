"""The plan family: every plan that is latency-optimal somewhere in a range of bandwidths.

A fixed plan's latency is affine in x_b = 1 / bandwidth_b: ``base + sum_b bytes_b * x_b``.
The optimum over all plans is therefore the lower envelope of affine functions, concave
and piecewise linear, and each plan is optimal on a convex cell. ``plan_family`` finds
the cells exactly for one or two varying links: it keeps the envelope of the plans found
so far, solves at every vertex of every cell, and adds a plan wherever the solver beats
the envelope. When the solver matches the envelope at every vertex, the envelope is the
optimum everywhere in the range: on a cell, optimum minus envelope is concave, zero at
the vertices, and never positive. A runtime switches plans by evaluating each plan's
affine latency at the measured bandwidths (``PlanFamily.select``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from partc.errors import ClusterError
from partc.partition.baselines import baselines
from partc.partition.cost import CostGraph, Partition, evaluate
from partc.partition.solve import LayeredCut, solve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyPlan:
    """One plan of a family.

    Attributes:
        tiers: (n,) tier index of each node.
        base: seconds of compute plus link latencies (latency at infinite bandwidth).
        link_bytes: bytes crossing each link.
        region: vertices of the convex cell where the plan is optimal, as bandwidths of the
            varying links (bytes per second); one or two coordinates per vertex.
    """

    tiers: np.ndarray
    base: float
    link_bytes: tuple[int, ...]
    region: tuple[tuple[float, ...], ...]

    def latency(self, bandwidth: Sequence[float]) -> float:
        """Predicted latency at these bandwidths (one per link, bytes per second)."""
        return self.base + sum(b / bw for b, bw in zip(self.link_bytes, bandwidth, strict=True))


@dataclass(frozen=True)
class PlanFamily:
    """The optimal plans over a bandwidth range.

    Attributes:
        links: indices of the links whose bandwidth varies.
        ranges: (low, high) bandwidth of each varying link, bytes per second.
        bandwidth: bandwidth of every link where it does not vary.
        plans: the distinct optimal plans, each with its region.
        solves: how many times the solver ran.
    """

    links: tuple[int, ...]
    ranges: tuple[tuple[float, float], ...]
    bandwidth: tuple[float, ...]
    plans: tuple[FamilyPlan, ...]
    solves: int

    def select(self, bandwidth: Sequence[float]) -> int:
        """Index of the fastest plan at these bandwidths (one per link)."""
        return int(np.argmin([p.latency(bandwidth) for p in self.plans]))

    def breakpoints(self) -> tuple[float, ...]:
        """With one varying link: the bandwidths where the optimal plan changes, ascending."""
        if len(self.links) != 1:
            raise ValueError("breakpoints are defined for a family over one link; read each plan's region")
        lo, hi = self.ranges[0]
        ends = {v[0] for p in self.plans for v in p.region}
        return tuple(sorted(b for b in ends if lo * (1 + 1e-9) < b < hi * (1 - 1e-9)))


def plan_family(graph: CostGraph, ranges: dict[int, tuple[float, float]]) -> PlanFamily:
    """Return every latency-optimal plan of ``graph`` over bandwidth ``ranges``.

    Args:
        graph: the cost graph; links not in ``ranges`` keep ``graph.bandwidth``.
        ranges: link index -> (low, high) bandwidth in bytes per second; one or two links.

    Raises:
        ValueError: for no link, more than two links, or an empty range.
        ClusterError: if the constraints cannot be met.
    """
    links = tuple(sorted(ranges))
    if not 1 <= len(links) <= 2 or any(not 0 < ranges[b][0] < ranges[b][1] for b in links):
        raise ValueError("plan_family takes one or two links, each with 0 < low < high bandwidth")
    box = [(1 / ranges[b][1], 1 / ranges[b][0]) for b in links]
    cut = None if graph.has_caps else LayeredCut(graph)
    plans: list[FamilyPlan] = []
    keys: set[bytes] = set()
    checked: set[tuple[float, ...]] = set()
    points = {_key(c) for c in _corners(box)}
    solves = 0
    while points - checked:
        for point in sorted(points - checked):
            checked.add(point)
            bandwidth = graph.bandwidth.copy()
            bandwidth[list(links)] = 1 / np.array(point)
            found = cut.solve(bandwidth) if cut else solve(graph.with_bandwidth(bandwidth))
            solves += 1
            key = found.tiers.astype(np.int8).tobytes()
            if key not in keys and (not plans or _beats(found, plans, bandwidth)):
                keys.add(key)
                plans.append(_family_plan(graph, found.tiers))
        points = {_key(v) for cell in _cells(plans, graph, links, box) for v in cell}
    cells = _cells(plans, graph, links, box)
    plans = [
        FamilyPlan(p.tiers, p.base, p.link_bytes, tuple(tuple(1 / x for x in v) for v in cell))
        for p, cell in zip(plans, cells, strict=True)
        if cell
    ]
    log.info("plan family: %d plans from %d solves", len(plans), solves)
    return PlanFamily(links, tuple(ranges[b] for b in links), tuple(graph.bandwidth), tuple(plans), solves)


ADAPT_SPREAD = 10.0  # a build adapts to bandwidths from a tenth to ten times the cluster file's


def deployment_plans(
    graph: CostGraph, primary: np.ndarray, objective: str = "latency", spread: float = ADAPT_SPREAD
) -> list[tuple[str, np.ndarray]]:
    """The plans a build carries, as (kind, tier index per node), each assignment once.

    First ``primary`` ("primary"); then, for the latency objective with one or two links,
    every other plan of the family over ``bandwidth / spread .. bandwidth * spread`` on
    each link ("adaptive"); then, for each tier after the first, the best plan that runs
    nothing on it or later ("fallback", for when that tier's worker dies), where the
    constraints allow one and no plan before already stops there.
    """
    plans = [("primary", np.asarray(primary))]
    n_links = len(graph.tiers) - 1
    if objective == "latency" and 1 <= n_links <= 2:
        ranges = {b: (graph.bandwidth[b] / spread, graph.bandwidth[b] * spread) for b in range(n_links)}
        plans += [("adaptive", p.tiers) for p in plan_family(graph, ranges).plans]
    for k in range(1, len(graph.tiers)):
        if any(tiers.max(initial=0) < k for _, tiers in plans):
            continue
        allowed = graph.allowed.copy()
        allowed[:, k:] = False
        try:
            found = solve(replace(graph, allowed=allowed), objective)
        except ClusterError:
            continue
        plans.append(("fallback", found.tiers))
    unique: dict[bytes, tuple[str, np.ndarray]] = {}
    for kind, tiers in plans:
        unique.setdefault(np.asarray(tiers, dtype=np.int8).tobytes(), (kind, np.asarray(tiers, dtype=np.int64)))
    return list(unique.values())


def _beats(found: Partition, plans: list[FamilyPlan], bandwidth: np.ndarray) -> bool:
    """Whether ``found`` is faster than every plan at ``bandwidth``, beyond the solver's gap."""
    envelope = min(p.latency(bandwidth) for p in plans)
    return found.cost.latency < envelope - found.gap - 1e-12 * envelope


def _family_plan(graph: CostGraph, tiers: np.ndarray) -> FamilyPlan:
    cost = evaluate(graph, tiers)
    stream = [b / bw for b, bw in zip(cost.link_bytes, graph.bandwidth, strict=True)]
    return FamilyPlan(tiers, cost.latency - sum(stream), cost.link_bytes, ())


def _key(point) -> tuple[float, ...]:
    return tuple(float(f"{x:.12g}") for x in point)


def _corners(box) -> list[tuple[float, ...]]:
    if len(box) == 1:
        return [(box[0][0],), (box[0][1],)]
    (x0, x1), (y0, y1) = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _cells(plans: list[FamilyPlan], graph: CostGraph, links: tuple[int, ...], box) -> list[list[tuple[float, ...]]]:
    """Each plan's cell of the lower envelope over ``box`` (x = 1 / bandwidth), as vertices."""
    fixed = [
        p.base + sum(p.link_bytes[b] / graph.bandwidth[b] for b in range(len(p.link_bytes)) if b not in links)
        for p in plans
    ]
    slopes = [np.array([p.link_bytes[b] for b in links], dtype=float) for p in plans]
    cells = []
    for i in range(len(plans)):
        polygon = [np.array(c) for c in _corners(box)]
        for j in range(len(plans)):
            if j != i and polygon:
                # keep f_i(x) <= f_j(x): (s_i - s_j) . x <= c_j - c_i
                polygon = _clip(polygon, slopes[i] - slopes[j], fixed[j] - fixed[i])
        cells.append([tuple(float(c) for c in v) for v in polygon])
    return cells


def _clip(polygon: list[np.ndarray], normal: np.ndarray, offset: float) -> list[np.ndarray]:
    """Clip a convex polygon (or a segment, in one dimension) to normal . x <= offset."""
    if len(normal) == 1:
        lo, hi = polygon[0][0], polygon[-1][0]
        if normal[0] > 0:
            hi = min(hi, offset / normal[0])
        elif normal[0] < 0:
            lo = max(lo, offset / normal[0])
        elif offset < 0:
            return []
        return [np.array([lo]), np.array([hi])] if lo <= hi else []
    out = []
    slack = 1e-12 * (abs(offset) + float(np.abs(normal).sum() * max(np.abs(v).max() for v in polygon)))
    for k, p in enumerate(polygon):
        q = polygon[(k + 1) % len(polygon)]
        dp, dq = normal @ p - offset, normal @ q - offset
        if dp <= slack:
            out.append(p)
        if (dp > slack and dq < -slack) or (dp < -slack and dq > slack):
            out.append(p + (q - p) * (dp / (dp - dq)))
    return out


def bandwidth_sweep(
    graph: CostGraph, link: int, bandwidths: Sequence[float], objective: str = "latency"
) -> dict[str, np.ndarray]:
    """partc's and every baseline's predicted figure (latency or bottleneck) as link
    ``link``'s bandwidth varies; NaN where a baseline has no feasible plan."""
    series: dict[str, list[float]] = {}
    for bw in bandwidths:
        bandwidth = graph.bandwidth.copy()
        bandwidth[link] = bw
        at = graph.with_bandwidth(bandwidth)
        series.setdefault("partc", []).append(solve(at, objective).cost.value(objective))
        for name, plan in baselines(at, objective).items():
            series.setdefault(name, []).append(np.nan if plan is None else plan.cost.value(objective))
    return {name: np.array(values) for name, values in series.items()}
