"""Baselines: priced by the same cost model, checked against brute force; partc beats them all."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from cutcases import branching_graph, brute_force, cluster, dags, profile
from hypothesis import HealthCheck, given, settings

from partc.partition.baselines import ChainCosts, baselines
from partc.partition.cost import evaluate, violations
from partc.partition.model import cost_graph
from partc.partition.solve import solve
from partc.trace import load_model, parse_input_spec, trace

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=20, deadline=None)
@given(dags(constrained=True, max_nodes=8))
def test_chain_costs_match_evaluate(graph):
    chain = ChainCosts(graph)
    n = len(graph.names)
    rows = np.array([(a, b) for a in range(n + 1) for b in range(a, n + 1)])
    for objective in ("latency", "throughput"):
        values, feasible = chain.costs(rows, objective)
        for row, value, ok in zip(rows, values, feasible, strict=True):
            tiers = chain.tiers(row)
            assert value == pytest.approx(evaluate(graph, tiers).value(objective), rel=1e-12, abs=1e-15)
            assert ok == (not violations(graph, tiers))


@_SETTINGS
@given(dags(constrained=True, max_nodes=10))
def test_baselines_are_valid_and_never_beat_partc(graph):
    for objective in ("latency", "throughput"):
        best = brute_force(graph, objective)
        found = baselines(graph, objective)
        assert {"device-only", "edge-only", "cloud-only", "neurosurgeon", "scission", "d3-greedy", "dads"} == set(found)
        if best is None:
            assert all(plan is None for plan in found.values())
            continue
        partc = solve(graph, objective)
        for plan in found.values():
            if plan is not None:
                assert not violations(graph, plan.tiers)
                assert plan.cost == evaluate(graph, plan.tiers)
                assert plan.cost.value(objective) >= best - 1e-9 * max(best, 1.0)
                assert partc.cost.value(objective) <= plan.cost.value(objective) + partc.gap + 1e-12


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags(max_nodes=9))
def test_each_baseline_is_the_optimum_of_its_strategy(graph):
    found = baselines(graph)
    n = len(graph.names)
    chain = ChainCosts(graph)
    for name, cuts in [
        ("scission", [(a, b) for a in range(n + 1) for b in range(a, n + 1)]),
        ("neurosurgeon", [c for p in range(n + 1) for c in ((p, p), (0, p), (p, n))]),
        ("device-only", [(n, n)]),
        ("cloud-only", [(0, 0)]),
    ]:
        expected = min(evaluate(graph, chain.tiers(c)).latency for c in cuts)
        assert found[name].cost.latency == pytest.approx(expected, rel=1e-12)
    two_tier = min(
        brute_force(
            replace(graph, allowed=graph.allowed & (np.isin(np.arange(3), pair) | graph.inputs[:, None])), "latency"
        )
        for pair in itertools.combinations(range(3), 2)
    )
    assert found["dads"].cost.latency <= two_tier + solve(graph).gap + 1e-9
    assert found["dads"].cost.latency >= two_tier - 1e-9
    first_to_last = min(evaluate(graph, chain.tiers((p, p))).latency for p in range(n + 1))
    assert found["d3-greedy"].cost.latency <= first_to_last + 1e-12


MODELS = {
    "resnet50": "1,3,224,224",
    "googlenet": "1,3,224,224",
    "inception_v3": "1,3,299,299",
    "densenet121": "1,3,224,224",
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_graph(request):
    gm = trace(load_model(f"torchvision:{request.param}"), [parse_input_spec(MODELS[request.param])])
    return request.param, cost_graph(profile(gm), cluster())


@pytest.mark.slow
def test_partc_is_never_beaten_on_a_bandwidth_grid(model_graph):
    name, graph = model_graph
    grid = np.geomspace(1e5, 1e8, 5)  # 0.8 Mbit/s .. 800 Mbit/s on each link
    for up, back in itertools.product(grid, grid):
        at = graph.with_bandwidth([up, back])
        partc = solve(at)
        assert not violations(at, partc.tiers)
        for base, plan in baselines(at).items():
            assert partc.cost.latency <= plan.cost.latency, (name, up, back, base)


def test_partc_beats_chain_and_two_tier_cuts_on_a_branching_dag():
    graph = branching_graph()
    partc = solve(graph)
    assert [graph.tiers[t] for t in partc.tiers] == ["device", "device", "cloud", "device", "device", "cloud"]
    assert partc.cost.link_bytes == (2_000, 2_000)
    for name, plan in baselines(graph).items():
        if name != "dads":
            assert partc.cost.latency < plan.cost.latency * 0.5, name
    assert partc.cost.latency == pytest.approx(baselines(graph)["dads"].cost.latency)
