"""tile-conv-stages: tiled equals untiled, on real DAG models and random stacks; tiers, cost model, errors."""

from __future__ import annotations

import models
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
)
from partc.passes import DEFAULT_PIPELINE, PASSES
from partc.passes.tile import candidate_grids, tile_conv_stages, tile_graph, tile_nodes
from partc.pipeline import run_passes
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
            node.meta[META_PROFILE] = {"device": 1e-3, "edge": 1e-3, "cloud": 1e-4}
    return gm


def test_registered_but_not_default_until_tiles_are_stages():
    assert PASSES["tile-conv-stages"] is tile_conv_stages
    assert "tile-conv-stages" not in DEFAULT_PIPELINE


def test_tiles_only_the_tier_with_several_nodes_and_reports_the_halo():
    gm = _on_three_tiers()
    before = [(n.name, dict(n.meta)) for n in gm.graph.nodes]
    result = tile_conv_stages(gm, _ctx(4))
    tiled = result.gm
    assert [(n.name, dict(n.meta)) for n in gm.graph.nodes] == before  # the input is not changed
    tiles = _tile_nodes(tiled)
    assert tiles and {n.meta[META_TIER] for n in tiles} == {"edge"}
    names = {n.name for n in tiled.graph.nodes}
    assert {"_0", "_6", "_7", "_8"} <= names  # device conv and cloud head untouched
    assert not {"_1", "_2", "_3", "_4", "_5"} & names  # the edge run, replaced by its tiles
    assert "1 run(s) tiled" in result.summary and "halo +" in result.summary and "edge" in result.summary
    assert _relative_error(gm, tiled, InputSpec((1, 3, 32, 32))) <= 1e-5
    run_passes(gm, ["tile-conv-stages"], _ctx(4))  # lints, tiers included


def test_tiers_with_one_node_are_left_alone():
    gm = _on_three_tiers()
    result = tile_conv_stages(gm, _ctx(1))
    assert "nothing tiled" in result.summary
    assert [n.name for n in result.gm.graph.nodes] == [n.name for n in gm.graph.nodes]


def test_a_graph_without_tiers_on_a_one_tier_cluster_is_all_on_that_tier():
    gm = trace(models.residual(), [InputSpec((1, 8, 16, 16))])
    result = tile_conv_stages(gm, CompileContext((Tier("edge", "jetson-nano", "onnx", 2),)))
    assert {n.meta[META_TILE][0] for n in _tile_nodes(result.gm)} == {0}
    assert _relative_error(gm, result.gm, InputSpec((1, 8, 16, 16))) <= 1e-5


def test_cost_model_uses_every_node_unless_the_halo_exchange_link_is_too_slow():
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    gm = _on_three_tiers(profile=True)
    fast = tile_conv_stages(gm, _ctx(4))
    grids = {n.meta[META_TILE][1] for n in _tile_nodes(fast.gm)} - {None}
    assert len(grids) == 4
    slow = tile_conv_stages(gm, _ctx(4, Link("edge", "edge", bandwidth=1e3, latency=0.01)))
    assert not _tile_nodes(slow.gm) and "left untiled" in slow.summary


def test_tile_copies_carry_their_share_of_the_profile():
    gm = _on_three_tiers(profile=True)
    tiled = tile_conv_stages(gm, _ctx(2)).gm
    convs = [n for n in _tile_nodes(tiled) if n.meta[META_OP] == "conv2d"]
    assert convs
    for conv in convs:
        original = next(n for n in gm.graph.nodes if conv.name.startswith(n.name + "_tile"))
        share = conv.meta[META_FLOPS] / original.meta[META_FLOPS]
        assert conv.meta[META_PROFILE]["edge"] == pytest.approx(1e-3 * share)


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
