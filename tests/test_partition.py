"""The partition solver against brute force over every monotone assignment of small DAGs."""

from __future__ import annotations

import pytest
from cutcases import brute_force, dags
from hypothesis import HealthCheck, given, settings

from partc.errors import ClusterError
from partc.partition.cost import CostGraph, evaluate, violations
from partc.partition.solve import solve


def _check(graph: CostGraph, objective: str) -> None:
    best = brute_force(graph, objective)
    if best is None:
        with pytest.raises(ClusterError, match="constraints"):
            solve(graph, objective)
        return
    found = solve(graph, objective)
    assert not violations(graph, found.tiers)
    value = evaluate(graph, found.tiers).value(objective)
    assert found.cost.value(objective) == value
    assert value >= best - 1e-9 * max(best, 1.0)
    assert value <= best + found.gap + 1e-9 * max(best, 1.0)


_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(dags())
def test_latency_matches_brute_force(graph):
    _check(graph, "latency")


@_SETTINGS
@given(dags())
def test_throughput_matches_brute_force(graph):
    _check(graph, "throughput")


@_SETTINGS
@given(dags(constrained=True))
def test_constrained_latency_matches_brute_force(graph):
    _check(graph, "latency")


@_SETTINGS
@given(dags(constrained=True))
def test_constrained_throughput_matches_brute_force(graph):
    _check(graph, "throughput")
