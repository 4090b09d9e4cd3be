"""tile-conv-stages: tiled equals untiled, on real DAG models and random stacks; tiers, cost model, errors."""

from __future__ import annotations

import concurrent.futures
import itertools

import models
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from partc.context import CompileContext, Link, Tier
from partc.errors import PartcError, UnsupportedLayerError
from partc.ir import (
    META_FLOPS,
    META_KIND,
    META_OP,
    META_PROFILE,
    META_SHAPE,
    META_TIER,
    META_TILE,
    compute_nodes,
    lint,
)
from partc.partition.model import link_price
from partc.partition.price import LinkPrice, tiled_step_seconds
from partc.passes import DEFAULT_PIPELINE, PASSES, passes_named
from partc.passes.tile import tile_conv_stages, tile_graph, tile_nodes
from partc.pipeline import run_passes
from partc.plan import build_plan, eager_stage_fn, run_plan
from partc.tiling.regions import find_runs, plan_regions, tile_flops
from partc.tiling.schedule import local_schedule_fn, schedule_stage, step_id
from partc.tiling.split import candidate_grids, node_seconds, predict_latency, split_run
from partc.trace import InputSpec, load_model, parse_input_spec, trace


def _outputs(gm, spec: InputSpec) -> torch.Tensor:
    with torch.no_grad():
        return gm(spec.example())


def _relative_error(gm, tiled, spec: InputSpec) -> float:
    expected, actual = _outputs(gm, spec), _outputs(tiled, spec)
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def _tile_nodes(gm):
    return [n for n in gm.graph.nodes if META_TILE in n.meta]


# One grid per model keeps the suite fast on two cores while covering 2, 4 and 9 tiles;
# the whole network's maximal runs are tiled, so each tile goes through every conv stage.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("vgg16", (1, 2)),
        ("resnet50", (1, 2)),
        ("googlenet", (2, 2)),
        ("mobilenet_v2", (2, 2)),
        ("resnet18", (3, 3)),
    ],
)
def test_tiled_torchvision_models_equal_the_untiled_ones(name, grid):
    spec = parse_input_spec("1,3,224,224")
    gm = trace(load_model(f"torchvision:{name}"), [spec])
    tiled, runs = tile_graph(gm, grid)
    assert all(run.grid == grid and run.overhead >= 0 for run in runs) and max(run.overhead for run in runs) > 0
    assert _relative_error(gm, tiled, spec) <= 1e-5
    for node in _tile_nodes(tiled):
        assert {META_OP, META_KIND, META_SHAPE, META_FLOPS} <= node.meta.keys()
    tiles = {node.meta[META_TILE] for node in _tile_nodes(tiled)}
    assert tiles == {(run.index, t) for run in runs for t in [None, *range(grid[0] * grid[1])]}


def test_halo_flops_predicted_per_tile_match_the_reannotated_graph():
    gm = trace(models.residual(), [InputSpec((1, 8, 15, 17))])
    tiled, (run,) = tile_graph(gm, (2, 2))
    measured = [0] * 4
    for node in _tile_nodes(tiled):
        if node.meta[META_TILE][1] is not None:
            measured[node.meta[META_TILE][1]] += node.meta[META_FLOPS]
    assert run.flops == sum(n.meta[META_FLOPS] for n in compute_nodes(gm) if n.name in run.nodes)
    assert measured == list(run.tile_flops)
    assert sum(measured) > run.flops  # the halos


def test_squeeze_excitation_blocks_break_runs_and_still_tile_exactly():
    spec = InputSpec((1, 4, 16, 16))
    torch.manual_seed(0)
    gm = trace(models.squeeze_excite(), [spec])
    tiled, runs = tile_graph(gm, (2, 2))
    assert [run.nodes for run in runs] == [("conv1", "relu"), ("conv2", "add")]
    assert _relative_error(gm, tiled, spec) <= 1e-5


@st.composite
def stacks(draw):
    torch.manual_seed(draw(st.integers(0, 100)))
    channels = draw(st.integers(1, 3))
    size = (draw(st.integers(5, 24)), draw(st.integers(5, 24)))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg", "bn", "act"]))
        kernel, stride = draw(st.integers(1, 7)), draw(st.integers(1, 2))
        padding = draw(st.integers(0, kernel // 2))
        if kind == "conv":
            out = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([1, channels])) if out % channels == 0 else 1
            dilation = draw(st.integers(1, 2))
            if stride == 1 and draw(st.booleans()):
                padding = "same"
            layers.append(nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias=draw(st.booleans())))
            channels = out
        elif kind == "max":
            ceil = draw(st.booleans())
            layers.append(nn.MaxPool2d(kernel, stride, padding, draw(st.integers(1, 2)), ceil_mode=ceil))
        elif kind == "avg":
            include, override = draw(st.booleans()), draw(st.sampled_from([None, None, 3]))
            layers.append(nn.AvgPool2d(kernel, stride, padding, draw(st.booleans()), include, override))
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(channels))
        else:
            layers.append(draw(st.sampled_from([nn.ReLU(), nn.Hardswish(), nn.LeakyReLU(0.1, inplace=True)])))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return layers, size, grid


def _stack_model(layers: list[nn.Module], size: tuple[int, int], grid) -> tuple[nn.Module, InputSpec] | None:
    """The layers behind a 1x1 conv (a run needs a window), seeded, or None if they do not fit the size."""
    channels = next((m.in_channels for m in layers if isinstance(m, nn.Conv2d)), None)
    channels = channels or next((m.num_features for m in layers if isinstance(m, nn.BatchNorm2d)), 2)
    model = nn.Sequential(nn.Conv2d(channels, channels, 1), *layers).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    spec = InputSpec((1, channels, *size))
    try:
        with torch.no_grad():
            out = model(spec.example())
    except RuntimeError:  # a kernel larger than its (padded) input
        return None
    if out.shape[2] < grid[0] or out.shape[3] < grid[1]:
        return None
    return model, spec


@settings(max_examples=40, deadline=None)
@given(stacks())
def test_random_conv_pool_stacks_tile_exactly(case):
    layers, size, grid = case
    built = _stack_model(layers, size, grid)
    assume(built is not None)
    model, spec = built
    gm = trace(model, [spec])
    tiled, runs = tile_graph(gm, grid)
    assert [run.grid for run in runs] == [grid]
    assert _relative_error(gm, tiled, spec) <= 1e-5


class Block(nn.Module):
    """Two branches with the same stride meet in an add or a concat, then one more conv."""

    def __init__(self, k1, k2, dilation, stride, join):
        super().__init__()
        self.a = nn.Conv2d(3, 4, k1, stride, dilation * (k1 // 2), dilation)
        self.b = nn.Sequential(nn.MaxPool2d(k2, stride, k2 // 2, ceil_mode=False), nn.Conv2d(3, 4, 1), nn.ReLU())
        self.join = join
        self.c = nn.Conv2d(8 if join == "cat" else 4, 2, 3, padding=1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.c(torch.cat([a, b], dim=1) if self.join == "cat" else a + b)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([1, 3, 5, 7]),
    st.sampled_from([1, 3, 5]),
    st.integers(1, 2),
    st.integers(1, 2),
    st.sampled_from(["add", "cat"]),
    st.integers(7, 21),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_random_residual_and_concat_blocks_tile_exactly(k1, k2, dilation, stride, join, size, grid):
    torch.manual_seed(0)
    spec = InputSpec((1, 3, size, size + 2))
    gm = trace(Block(k1, k2, dilation, stride, join).eval(), [spec])
    tiled, runs = tile_graph(gm, grid)
    assert len(runs) == 1 and len(runs[0].nodes) == 6
    assert _relative_error(gm, tiled, spec) <= 1e-5


def test_an_inplace_layer_on_the_run_input_does_not_corrupt_other_tiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(3, 4, 5, padding=2)).eval()
    spec = InputSpec((1, 3, 12, 12))
    gm = trace(model, [spec])
    tiled, _ = tile_graph(gm, (3, 3))
    assert _relative_error(gm, tiled, spec) <= 1e-6  # each call gets a fresh example input


# --- the pass ---------------------------------------------------------------------------


FAST = Link("edge", "edge", bandwidth=1.25e9, latency=1e-5)  # 10 Gbit/s between the edge nodes


def _ctx(edge_nodes: int, *links: Link) -> CompileContext:
    tiers = (Tier("device", "rpi4", "torchscript"), Tier("edge", "jetson-nano", "onnx", edge_nodes),
             Tier("cloud", "cloud-cpu", "tvm"))  # fmt: skip
    return CompileContext(tiers, links)


def _on_three_tiers(profile: bool = False):
    """conv_stack with its first conv on the device, the conv stage on the edge, the head in the cloud."""
    gm = trace(models.conv_stack(), [InputSpec((1, 3, 32, 32))])
    nodes = compute_nodes(gm)
    head = next(i for i, n in enumerate(nodes) if n.meta[META_OP] == "adaptiveavgpool2d")
    for i, node in enumerate(gm.graph.nodes):
        node.meta[META_TIER] = "device" if i <= 1 else "edge" if i <= head else "cloud"
        if profile:
            node.meta[META_PROFILE] = {"device": 1e-3, "edge": 20e-3, "cloud": 1e-4}
    return gm


def test_registered_and_run_on_each_plan_of_a_build():
    assert PASSES["tile-conv-stages"].run is tile_conv_stages
    assert DEFAULT_PIPELINE.plan[-1] is PASSES["tile-conv-stages"]


def test_tiles_only_the_tier_with_several_nodes_and_reports_the_halo():
    gm = _on_three_tiers(profile=True)
    before = [(n.name, dict(n.meta)) for n in gm.graph.nodes]
    result = tile_conv_stages(gm, _ctx(4, FAST))
    tiled = result.gm
    assert [(n.name, dict(n.meta)) for n in gm.graph.nodes] == before  # the input is not changed
    tiles = _tile_nodes(tiled)
    assert tiles and {n.meta[META_TIER] for n in tiles} == {"edge"}
    names = {n.name for n in tiled.graph.nodes}
    assert {"_0", "_6", "_7", "_8"} <= names  # device conv and cloud head untouched
    assert not {"_1", "_2", "_3", "_4", "_5"} & names  # the edge run, replaced by its tiles
    assert "run(s) tiled" in result.summary and "halo +" in result.summary and "edge: predicted" in result.summary
    assert _relative_error(gm, tiled, InputSpec((1, 3, 32, 32))) <= 1e-5
    run_passes(gm, passes_named(["tile-conv-stages"]), _ctx(4, FAST))  # lints, tiers included


def test_tiers_with_one_node_are_left_alone():
    gm = _on_three_tiers()
    result = tile_conv_stages(gm, _ctx(1))
    assert "nothing tiled" in result.summary
    assert [n.name for n in result.gm.graph.nodes] == [n.name for n in gm.graph.nodes]


def test_a_graph_without_tiers_on_a_one_tier_cluster_is_all_on_that_tier():
    gm = trace(models.residual(), [InputSpec((1, 8, 256, 256))])  # large enough to be worth a call per tile
    result = tile_conv_stages(gm, CompileContext((Tier("edge", "jetson-nano", "onnx", 2),), (FAST,)))
    assert {n.meta[META_TILE][0] for n in _tile_nodes(result.gm)} == {0}
    assert _relative_error(gm, result.gm, InputSpec((1, 8, 256, 256))) <= 1e-5


def test_cost_model_uses_every_node_unless_the_halo_exchange_link_is_too_slow():
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    gm = _on_three_tiers(profile=True)
    fast = tile_conv_stages(gm, _ctx(4, FAST))
    grids = {n.meta[META_TILE][1] for n in _tile_nodes(fast.gm)} - {None}
    assert len(grids) == 4
    slow = tile_conv_stages(gm, _ctx(4, Link("edge", "edge", bandwidth=1e3, latency=0.01)))
    assert not _tile_nodes(slow.gm) and "left untiled" in slow.summary


def test_tile_copies_carry_their_share_of_the_profile():
    gm = _on_three_tiers(profile=True)
    tiled = tile_conv_stages(gm, _ctx(2, FAST)).gm
    convs = [n for n in _tile_nodes(tiled) if n.meta[META_OP] == "conv2d"]
    assert convs
    for conv in convs:
        original = next(n for n in gm.graph.nodes if conv.name.startswith(n.name + "_tile"))
        share = conv.meta[META_FLOPS] / original.meta[META_FLOPS]
        assert conv.meta[META_PROFILE]["edge"] == pytest.approx(20e-3 * share)


def test_forcing_a_layer_that_is_not_spatially_local_names_it():
    gm = trace(models.conv_stack(), [InputSpec((1, 3, 32, 32))])
    with pytest.raises(UnsupportedLayerError, match=r"_6 \(adaptiveavgpool2d\).*_8 \(linear\)"):
        tile_nodes(gm, ["_0", "_1", "_6", "_8"], (2, 2))
    with pytest.raises(UnsupportedLayerError, match="16x16 map cannot be split into 1x17 tiles"):
        tile_nodes(gm, ["_4", "_5"], (1, 17))
    with pytest.raises(PartcError, match="conv9: no such node"):
        tile_nodes(gm, ["conv9"], (2, 2))
    tiled, run = tile_nodes(gm, ["_0", "_1", "_2"], (2, 1))
    assert run.nodes == ("_0", "_1", "_2") and run.grid == (2, 1)
    assert _relative_error(gm, tiled, InputSpec((1, 3, 32, 32))) <= 1e-5


def test_forcing_a_set_that_a_path_leaves_and_reenters_is_refused():
    gm = trace(models.residual(), [InputSpec((1, 8, 16, 16))])
    with pytest.raises(UnsupportedLayerError, match="relu is outside it but on a path from it back into it"):
        tile_nodes(gm, ["conv1", "conv2", "add"], (2, 2))


# --- planning: links between a tier's nodes, and runs split into parts -----------------


def _one_tier(nodes: int, link: Link) -> CompileContext:
    return CompileContext((Tier("edge", "jetson-nano", "onnx", nodes),), (link,))


GIGABIT = Link("edge", "edge", bandwidth=1.25e8, latency=2e-4)  # 1 Gbit/s, 0.2 ms


@pytest.fixture(scope="module")
def torchvision_graph():
    """``graph(name, size)``: torchvision model ``name`` traced on 1x3x``size``x``size`` inputs, once per module."""
    traced = {}

    def graph(name: str, size: int):
        if (name, size) not in traced:
            traced[name, size] = trace(load_model(f"torchvision:{name}"), [InputSpec((1, 3, size, size))])
        return traced[name, size]

    return graph


def test_a_tier_with_several_nodes_but_no_link_to_itself_is_not_tiled():
    gm = _on_three_tiers(profile=True)
    result = tile_conv_stages(gm, _ctx(4))
    assert not _tile_nodes(result.gm)
    assert result.summary == (
        "nothing tiled; edge not tiled: its 4 nodes have no link edge -> edge to scatter tiles over; "
        "add one to the cluster file's links"
    )


def test_the_coordinators_link_moves_one_tile_at_a_time_while_it_computes_tile_0():
    # 10 bytes: 1.5 s, 20 bytes: 2.5 s, 5 bytes: 1 s
    link = LinkPrice("edge->edge", bandwidth=10.0, latency=0.5, call=0.0)
    # inputs arrive at 1.5 and 4.0; tile 1 done at 3.5, back at 4.5; tile 2 done at 7, back at 8; tile 0 done at 6
    assert tiled_step_seconds([6.0, 2.0, 3.0], [0.0, 10.0, 20.0], [0.0, 5.0, 5.0], link) == pytest.approx(8.0)
    # tile 2 (done at 5) comes back before tile 1 (done at 10.5): 5 -> 6, then 10.5 -> 11.5
    assert tiled_step_seconds([1.0, 9.0, 1.0], [0.0, 10.0, 20.0], [0.0, 5.0, 5.0], link) == pytest.approx(11.5)
    assert tiled_step_seconds([9.0, 1.0], [0.0, 10.0], [0.0, 5.0], link) == 9.0  # tile 0 is the slowest
    assert tiled_step_seconds([4.0], [0.0], [0.0], link) == 4.0


@pytest.mark.parametrize("link", [Link("edge", "edge", 1e3, 1e-2), GIGABIT, FAST], ids=["slow", "gigabit", "fast"])
@pytest.mark.parametrize("model", ["block", "residual"])
def test_split_run_is_the_best_split_under_the_cost_model(model, link):
    torch.manual_seed(0)
    module, spec = (Block(3, 3, 1, 2, "cat"), InputSpec((1, 3, 21, 23))) if model == "block" else (
        models.residual(), InputSpec((1, 8, 15, 17)))  # fmt: skip
    gm = trace(module.eval(), [spec])
    (run,) = find_runs(gm, lambda n: True)
    seconds = {n: float(s) for n, s in zip(compute_nodes(gm), torch.rand(len(compute_nodes(gm))) * 1e-3, strict=True)}

    price = link_price(_one_tier(4, link), link)

    def best_part(start: int, end: int) -> float:
        part, costs = run[start:end], [sum(seconds[n] for n in run[start:end])]
        for grid in candidate_grids(4)[1:]:
            try:
                costs.append(predict_latency(part, plan_regions(part, gm, grid), seconds, price))
            except ValueError:
                pass
        return min(costs)

    every_split = [
        sum(best_part(a, b) for a, b in itertools.pairwise([0, *cuts, len(run)]))
        for k in range(len(run))
        for cuts in itertools.combinations(range(1, len(run)), k)
    ]
    parts = split_run(run, gm, 4, seconds, price)
    assert [n for part in parts for n in part.nodes] == run
    assert sum(part.latency for part in parts) == pytest.approx(min(every_split), rel=1e-12)
    for part in parts:
        if part.grid != (1, 1):
            regions = plan_regions(part.nodes, gm, part.grid)
            predicted = predict_latency(part.nodes, regions, seconds, price)
            assert part.latency == pytest.approx(predicted, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_split_and_tiled_torchvision_models_equal_the_untiled_ones(torchvision_graph, name, nodes):
    gm = torchvision_graph(name, 128)  # 224x224 takes three times as long, to the same effect
    result = tile_conv_stages(gm, _one_tier(nodes, GIGABIT))
    lint(result.gm)
    tiles = {node.meta[META_TILE] for node in _tile_nodes(result.gm)}
    runs = {run for run, _ in tiles}
    assert len(runs) > 1, result.summary  # the network's one maximal run, split into parts
    assert {tile for _, tile in tiles} == {None, *range(nodes)}
    assert _relative_error(gm, result.gm, InputSpec((1, 3, 128, 128))) <= 1e-5


@pytest.mark.slow
def test_a_slow_link_between_the_nodes_tiles_nothing_and_a_fast_one_tiles(torchvision_graph):
    gm = torchvision_graph("resnet18", 128)
    slow = tile_conv_stages(gm, _one_tier(4, Link("edge", "edge", bandwidth=1.25e6, latency=5e-3)))  # 10 Mbit/s
    assert not _tile_nodes(slow.gm) and slow.summary.startswith("no run worth tiling"), slow.summary
    fast = tile_conv_stages(gm, _one_tier(4, GIGABIT))
    assert _tile_nodes(fast.gm) and "run(s) tiled" in fast.summary


@pytest.mark.slow
@pytest.mark.parametrize(("name", "nodes"), [("resnet18", 2), ("resnet18", 4), ("googlenet", 2)])
def test_splitting_a_long_run_cuts_its_halo_overhead(torchvision_graph, name, nodes):
    gm = torchvision_graph(name, 224)
    (run,) = find_runs(gm, lambda n: True)
    seconds = node_seconds(gm, _one_tier(nodes, GIGABIT).tiers[0])  # the cost model's, on jetson-nano
    flops = sum(n.meta[META_FLOPS] for n in run)
    gigabit = link_price(_one_tier(nodes, GIGABIT), GIGABIT)
    whole = min(
        (predict_latency(run, regions, seconds, gigabit), sum(tile_flops(run, regions)) / flops - 1)
        for grid in candidate_grids(nodes)[1:]
        for regions in [plan_regions(run, gm, grid)]
    )
    parts = split_run(run, gm, nodes, seconds, gigabit)
    executed = sum(
        sum(n.meta[META_FLOPS] for n in part.nodes)
        if part.grid == (1, 1)
        else sum(tile_flops(part.nodes, plan_regions(part.nodes, gm, part.grid)))
        for part in parts
    )
    split = (sum(part.latency for part in parts), executed / flops - 1)
    message = (
        f"{name} on {nodes} nodes: whole run {whole[0] * 1e3:.1f} ms, halo +{whole[1]:.1%}; "
        f"split into {len(parts)} parts {split[0] * 1e3:.1f} ms, halo +{split[1]:.1%}"
    )
    assert split[0] <= whole[0] and split[1] < whole[1] / 2, message


@pytest.mark.slow
def test_split_parts_run_as_alternating_steps_across_the_nodes(torchvision_graph):
    ctx = _one_tier(4, GIGABIT)
    passes = passes_named(["annotate-profile", "select-cuts", "tile-conv-stages"])
    gm = run_passes(torchvision_graph("resnet18", 128), passes, ctx)
    plan = build_plan(gm, ctx)
    (stage,) = plan.stages
    schedule = schedule_stage(stage)
    steps = [len(step.programs) for step in schedule.steps]
    tiled = [n for n in steps if n > 1]  # e.g. [1, 4, 1, 2, 1]: a deeper, smaller part pays for 2 tiles, not 4
    assert len(tiled) > 1 and max(tiled) == 4 and all(a != b for a, b in itertools.pairwise(steps)), steps
    fns = {step_id("p", i, t): eager_stage_fn(program)
           for i, step in enumerate(schedule.steps) for t, program in enumerate(step.programs)}  # fmt: skip
    spec = InputSpec((1, 3, 128, 128))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = run_plan(plan, {stage.name: local_schedule_fn(schedule, "p", fns, pool)}, {"x": spec.example().numpy()})
    want = _outputs(torchvision_graph("resnet18", 128), spec).numpy()
    assert np.abs(got[plan.model_outputs[0].name] - want).max() <= 1e-5 * np.abs(want).max()
