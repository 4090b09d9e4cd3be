"""select-cuts: tiers written on the IR, constraints honoured, clear errors."""

from __future__ import annotations

import pytest
import torch
from cutcases import cluster, profile
from torch import nn

from partc.context import CompileContext, Constraints, Link, Tier
from partc.errors import ClusterError, PartcError
from partc.ir import META_PROFILE, META_TIER, compute_nodes
from partc.partition.baselines import baselines
from partc.partition.cost import evaluate
from partc.partition.model import cost_graph
from partc.passes import DEFAULT_PIPELINE, PASSES, passes_named
from partc.passes.cut import select_cuts
from partc.pipeline import run_passes
from partc.trace import InputSpec, load_model, parse_input_spec, trace


class Branchy(nn.Module):
    """x -> reduce (tiny) -> head (heavy on device) -> add;  x -> relu -> squeeze (tiny) -> add."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Linear(1024, 4)
        self.head = nn.Linear(4, 4)
        self.squeeze = nn.Linear(1024, 4)

    def forward(self, x):
        return self.head(self.reduce(x)) + self.squeeze(torch.relu(x))


def _branchy():
    torch.manual_seed(0)
    gm = trace(Branchy().eval(), [InputSpec((1, 1024))])
    for node in gm.graph.nodes:
        costs = (1.0, 0.5, 0.01) if node.name == "head" else (1e-3, 1e-3, 1e-3)
        if node.op in ("placeholder", "output"):
            costs = (0.0, 0.0, 0.0)
        node.meta[META_PROFILE] = dict(zip(("device", "edge", "cloud"), costs, strict=True))
    return gm


def _ctx(**constraints) -> CompileContext:
    ctx = cluster(1e3, 1e3, constraints=Constraints(**constraints))
    return CompileContext(ctx.tiers, ctx.links, constraints=ctx.constraints, source="cluster.yaml")


def _tiers(gm):
    return {n.name: n.meta[META_TIER] for n in gm.graph.nodes}


def _cost(gm, ctx):
    """The cost of the tiers the pass wrote, priced independently of the pass."""
    graph = cost_graph(gm, ctx)
    return evaluate(graph, [graph.tiers.index(_tiers(gm)[name]) for name in graph.names])


def test_registered_after_annotate_profile():
    assert PASSES["select-cuts"].run is select_cuts
    assert DEFAULT_PIPELINE.names.index("select-cuts") == DEFAULT_PIPELINE.names.index("annotate-profile") + 1


def test_branches_split_across_tiers_and_the_input_is_untouched():
    gm = _branchy()
    out = select_cuts(gm, _ctx()).gm
    assert _tiers(out) == {
        "x": "device",
        "reduce": "device",
        "head": "cloud",
        "relu": "device",
        "squeeze": "device",
        "add": "cloud",
        "output": "cloud",
    }
    assert all(META_TIER not in n.meta for n in gm.graph.nodes)
    assert _cost(out, _ctx()).link_bytes == (32, 32)  # reduce and squeeze: 4 float32 each, both hops


def test_summary_names_the_breakdown():
    summary = select_cuts(_branchy(), _ctx()).summary
    assert summary == (
        "latency: latency 113.00 ms, bottleneck 32.00 ms (min-cut); device: 4 nodes 3.00 ms, "
        "edge: 0 nodes 0.00 ms, cloud: 2 nodes 11.00 ms; device->edge 32 B, edge->cloud 32 B"
    )


def test_pin_moves_a_node_and_output_follows_its_input():
    out = select_cuts(_branchy(), _ctx(pin={"device": ("head",)})).gm
    assert _tiers(out)["head"] == "device"
    assert _tiers(out)["output"] == _tiers(out)["add"]


def test_pin_by_module_path_glob():
    out = select_cuts(_branchy(), _ctx(pin={"edge": ("hea*",)})).gm
    assert _tiers(out)["head"] == "edge"


def test_forbidden_tier_runs_nothing():
    out = select_cuts(_branchy(), _ctx(forbid=("cloud",))).gm
    assert "cloud" not in set(_tiers(out).values())


def test_caps_are_met():
    ctx = _ctx(max_link_bytes={("device", "edge"): 20}, max_memory={"cloud": 100})
    cost = _cost(select_cuts(_branchy(), ctx).gm, ctx)
    assert cost.link_bytes[0] <= 20 and cost.memory[2] <= 100


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        (
            {"pin": {"device": ("nope*",)}},
            "cluster.yaml: constraints.pin[device]: 'nope*' matches no node; node names look like "
            "reduce, head, relu (node names and module paths such as 'layer1.*' work)",
        ),
        (
            {"pin": {"cloud": ("reduce",), "device": ("head",)}},
            "cluster.yaml: constraints.pin: reduce is pinned to cloud but head, which consumes its output, "
            "is pinned to device; data cannot flow back a tier",
        ),
        (
            {"pin": {"edge": ("head",)}, "forbid": ("edge",)},
            "cluster.yaml: constraints.pin: head is pinned to edge, which constraints.forbid excludes",
        ),
        (
            {"pin": {"device": ("head",), "edge": ("head",)}},
            "cluster.yaml: constraints.pin: head is pinned to both device and edge",
        ),
        (
            {"pin": {"cloud": ("x",)}},
            "cluster.yaml: constraints.pin: x is a model input; it originates on device",
        ),
        (
            {"forbid": ("fog",)},
            "cluster.yaml: constraints: unknown tier 'fog'; tiers are device, edge, cloud",
        ),
        (
            {"max_link_bytes": {("device", "cloud"): 10}},
            "cluster.yaml: constraints.max_link_bytes: no link device->cloud; links are device->edge, edge->cloud",
        ),
        (
            {"pin": {"cloud": ("head",)}, "max_link_bytes": {("device", "edge"): 10}},
            "cluster.yaml: constraints.max_link_bytes[device->edge]: 10 B cannot be met: "
            "the smallest feasible cut sends 32 B; raise the cap or relax constraints.pin",
        ),
        (
            {"max_memory": {"device": 1000}},
            "cluster.yaml: constraints.max_memory[device]: 1 kB cannot be met: "
            "every feasible plan needs at least 4.1 kB on device; raise the cap or relax constraints.pin",
        ),
        (
            {"forbid": ("device", "edge", "cloud")},
            "cluster.yaml: constraints.pin/forbid: node 'reduce' has no tier left: it may run on none, "
            "but its inputs run on device or later; relax constraints.pin or constraints.forbid",
        ),
    ],
)
def test_impossible_constraints_name_the_constraint(constraints, message):
    with pytest.raises(ClusterError) as err:
        select_cuts(_branchy(), _ctx(**constraints))
    assert str(err.value) == message


def test_missing_profile_and_missing_link_are_errors():
    gm = _branchy()
    del next(iter(compute_nodes(gm))).meta[META_PROFILE]
    with pytest.raises(PartcError, match="node 'reduce' has no profile for tier 'device'; run annotate-profile"):
        select_cuts(gm, _ctx())
    ctx = _ctx()
    no_link = CompileContext(ctx.tiers, (Link("device", "edge", 1e6, 0.0),), source="cluster.yaml")
    with pytest.raises(ClusterError, match="cluster.yaml: links: no link from edge to cloud"):
        select_cuts(_branchy(), no_link)


@pytest.fixture(scope="module")
def resnet18():
    return profile(trace(load_model("torchvision:resnet18"), [parse_input_spec("1,3,224,224")]))


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_resnet18_through_the_pass_manager(resnet18, objective):
    pins = Constraints(pin={"device": ("conv1", "bn1"), "edge": ("layer1.1.*",)})
    ctx = cluster(2e6, 5e5, objective=objective, constraints=pins)
    out = run_passes(resnet18, passes_named(["select-cuts"]), ctx)  # lints: data never flows back a tier
    tiers = _tiers(out)
    assert tiers["x"] == "device" and tiers["conv1"] == "device" and tiers["bn1"] == "device"
    assert {tiers[n] for n in ("layer1_1_conv1", "layer1_1_bn1", "layer1_1_conv2", "layer1_1_bn2")} == {"edge"}
    graph = cost_graph(out, ctx)
    plan = _cost(out, ctx)
    for name, base in baselines(graph, objective).items():
        if base is not None:
            assert plan.value(objective) <= base.cost.value(objective) + 1e-9, name


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_two_tier_and_single_tier_clusters(objective):
    for names, links, expected in [
        (("device", "cloud"), (Link("device", "cloud", 1e3, 0.001),), ["device"] * 4 + ["cloud"] * 2),
        (("device",), (), ["device"] * 6),
    ]:
        gm = _branchy()
        for node in gm.graph.nodes:
            node.meta[META_PROFILE] = {t: node.meta[META_PROFILE][t] for t in names}
        ctx = CompileContext(tuple(Tier(t, "cpu", "torchscript") for t in names), links, objective=objective)
        tiers = _tiers(select_cuts(gm, ctx).gm)
        assert [tiers[n] for n in ("x", "reduce", "relu", "squeeze", "head", "add")] == expected


def test_a_link_within_a_tier_is_no_hop_between_tiers():
    gm = _branchy()
    plain = _ctx()
    tiers = tuple(Tier(t.name, t.target, t.backend, 2 if t.name == "edge" else 1) for t in plain.tiers)
    within = CompileContext(tiers, (Link("edge", "edge", 1e2, 1.0), *plain.links), source="cluster.yaml")
    graph = cost_graph(gm, within)  # the edge -> edge link comes first, with a latency no hop has
    assert graph.latency.tolist() == [0.005, 0.03] and graph.bandwidth.tolist() == [1e3, 1e3]
    assert _tiers(select_cuts(gm, within).gm) == _tiers(select_cuts(gm, plain).gm)
