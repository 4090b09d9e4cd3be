"""partc plan: the chosen plan, its predicted cost, the baselines and the plan family."""

import json

import pytest
from clusters import three_tier

from partc.cli import main
from partc.errors import ClusterError
from partc.planning import plan_model

CLUSTER = three_tier(edge="edge-x86")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


@pytest.fixture(scope="module")
def report(cluster, tmp_path_factory):
    plot = tmp_path_factory.mktemp("plot") / "sweep.png"
    return plan_model("torchvision:googlenet", ["1,3,224,224"], cluster, sweep="device->edge",
                      sweep_range=("1Mbit/s", "1Gbit/s"), plot=plot)


def test_plan_is_no_worse_than_any_baseline(report):
    assert set(report.baselines) == {"device-only", "edge-only", "cloud-only", "neurosurgeon", "scission",
                                     "d3-greedy", "dads"}
    for name, cost in report.baselines.items():
        assert cost is not None, name
        assert report.cost.latency <= cost.latency * (1 + 1e-9), name
    assert report.cost.latency == pytest.approx(sum(report.cost.compute) + sum(report.cost.transfer))


def test_layers_cover_every_node_once(report):
    assert sum(t.nodes for t in report.layers) == len(report.assignment)
    for runs in report.layers:
        assert sum(count for _, _, count in runs.runs) == runs.nodes
        for first, last, _ in runs.runs:
            assert report.assignment[first] == report.assignment[last] == runs.tier


def test_plan_family_covers_the_range_with_breakpoints(report):
    sweep = report.sweep
    assert sweep.plans[0].low == pytest.approx(1e6 / 8) and sweep.plans[-1].high == pytest.approx(1e9 / 8)
    for left, right in zip(sweep.plans, sweep.plans[1:], strict=False):
        assert left.high == pytest.approx(right.low)
    assert len(sweep.breakpoints) == len(sweep.plans) - 1
    assert sweep.plot and open(sweep.plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_json_and_compare_table(cluster, capsys):
    assert main(["plan", "tests/models.py:residual", "--input-shape", "1,8,16,16", "--cluster", str(cluster),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tiers"] == ["device", "edge", "cloud"] and set(data["assignment"]) >= {"x", "conv1", "add"}
    assert data["schema_version"] == 1 and data["command"] == "plan"
    assert set(data["cost"]) >= {"compute_ms", "transfer_ms", "link_bytes", "memory_bytes", "latency_ms",
                                 "bottleneck_ms"}
    assert main(["plan", "tests/models.py:residual", "--input-shape", "1,8,16,16", "--cluster", str(cluster),
                 "--compare"]) == 0
    out = capsys.readouterr().out
    assert "strategy" in out and "neurosurgeon" in out and out.startswith("plan for tests/models.py:residual")


def test_unknown_sweep_link_is_a_clear_error(cluster):
    with pytest.raises(ClusterError, match=r"--sweep 'device->cloud': no such link; links are device->edge, "
                                           r"edge->cloud"):
        plan_model("tests/models.py:residual", ["1,8,16,16"], cluster, sweep="device->cloud")
