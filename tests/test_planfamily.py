"""The plan family: complete over its bandwidth range, switchable, plotted."""

from __future__ import annotations

import numpy as np
import pytest
from cutcases import branching_graph, dags
from hypothesis import HealthCheck, given, settings

from partc.draw import plot_bandwidth_sweep
from partc.partition.cost import CostGraph
from partc.partition.family import bandwidth_sweep, plan_family
from partc.partition.solve import solve

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOW, HIGH = 1e4, 1e9


def _check_optimal_everywhere(graph, family, points):
    for bandwidth in points:
        best = solve(graph.with_bandwidth(bandwidth))
        chosen = family.plans[family.select(bandwidth)]
        assert chosen.latency(bandwidth) <= best.cost.latency + best.gap + 1e-9 * best.cost.latency
        assert chosen.latency(bandwidth) >= best.cost.latency - 1e-9 * best.cost.latency


@_SETTINGS
@given(dags())
def test_one_link_family_is_optimal_between_breakpoints(graph):
    family = plan_family(graph, {0: (LOW, HIGH)})
    rng = np.random.default_rng(0)
    points = [[bw, graph.bandwidth[1]] for bw in np.exp(rng.uniform(np.log(LOW), np.log(HIGH), 15))]
    _check_optimal_everywhere(graph, family, points)
    breaks = family.breakpoints()
    assert len(breaks) == len(family.plans) - 1
    for lo, hi in zip((LOW, *breaks), (*breaks, HIGH), strict=True):
        inside = [[np.sqrt(lo * hi), graph.bandwidth[1]]]
        _check_optimal_everywhere(graph, family, inside)
    for b in breaks:  # the optimal plan changes at each breakpoint
        below = family.select([b * (1 - 1e-6), graph.bandwidth[1]])
        above = family.select([b * (1 + 1e-6), graph.bandwidth[1]])
        assert below != above


@_SETTINGS
@given(dags(max_nodes=10))
def test_two_link_family_is_optimal_everywhere(graph):
    family = plan_family(graph, {0: (LOW, HIGH), 1: (LOW, HIGH)})
    rng = np.random.default_rng(1)
    points = np.exp(rng.uniform(np.log(LOW), np.log(HIGH), (20, 2)))
    _check_optimal_everywhere(graph, family, points)
    assert all(len(plan.region) >= 1 for plan in family.plans)
    keys = {plan.tiers.tobytes() for plan in family.plans}
    assert len(keys) == len(family.plans)


def test_family_rejects_three_links():
    with pytest.raises(ValueError, match="one or two links"):
        plan_family(_four_tier_free_graph(), {0: (1, 2), 1: (1, 2), 2: (1, 2)})


def _four_tier_free_graph():
    return CostGraph(
        names=("x", "y"),
        tiers=("a", "b", "c", "d"),
        compute=np.ones((2, 4)),
        nbytes=np.array([1, 1]),
        memory=np.zeros(2, dtype=np.int64),
        edges=np.array([(0, 1)]),
        inputs=np.array([True, False]),
        latency=np.zeros(3),
        bandwidth=np.ones(3),
        allowed=np.ones((2, 4), dtype=bool),
        max_link_bytes=np.full(3, np.inf),
        max_memory=np.full(4, np.inf),
    )


def test_sweep_and_plot(tmp_path):
    graph = branching_graph()
    bandwidths = np.geomspace(1e5, 1e8, 6)
    series = bandwidth_sweep(graph, 0, bandwidths)
    assert set(series) >= {"partc", "device-only", "neurosurgeon", "dads", "d3-greedy"}
    for name, values in series.items():
        assert values.shape == (6,)
        if name != "partc":
            assert (series["partc"] <= values + 1e-9).all(), name
    plot_bandwidth_sweep(series, bandwidths, tmp_path / "sweep.png", title="t")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
