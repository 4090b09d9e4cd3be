"""Tests for partc.plan: splitting the IR into stages and naming what crosses the cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from partc.context import CompileContext, Tier
from partc.errors import ClusterError, PartcError, UnsupportedLayerError
from partc.ir import META_TIER, compute_nodes
from partc.plan import Plan, build_plan, eager_stage_fn, run_plan
from partc.trace import InputSpec, trace

TIERS = ("device", "edge", "cloud")
CTX = CompileContext(tiers=tuple(Tier(t, "edge-x86", "onnx") for t in TIERS), source="cluster.yaml")


def _traced(model: nn.Module, shape=(1, 3, 8, 8)):
    torch.manual_seed(0)
    model = model.eval()
    spec = InputSpec(shape)
    return model, trace(model, [spec]), spec.example()


def _assign(gm, tiers: dict[str, str], default: str = "device") -> None:
    """Give every compute node the tier of the last listed node at or before it (topological order)."""
    current = default
    for node in compute_nodes(gm):
        current = tiers.get(node.name, current)
        node.meta[META_TIER] = current


def _run(plan: Plan, x: torch.Tensor) -> dict[str, np.ndarray]:
    return run_plan(plan, {s.name: eager_stage_fn(s) for s in plan.stages}, {"x": x.numpy()})


def _names(specs) -> list[str]:
    return [t.name for t in specs]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        c = self.conv3(b) + a
        return self.head(c)


def test_several_tensors_cross_one_cut_and_a_tensor_passes_from_tier_0_to_2():
    model, gm, x = _traced(Residual())
    # device: conv1, relu, conv2 | edge: relu_1, conv3 | cloud: add, head
    _assign(gm, {"relu_1": "edge", "add": "cloud"})
    plan = build_plan(gm, CTX)

    assert [s.name for s in plan.stages] == ["device.0", "edge.0", "cloud.0"]
    device, edge, cloud = plan.stages
    assert _names(device.inputs) == ["x"]
    assert sorted(_names(device.outputs)) == ["conv2", "relu"]
    assert _names(edge.inputs) == ["conv2"]  # 'relu' (the skip) is not routed through edge
    assert _names(edge.outputs) == ["conv3"]
    assert sorted(_names(cloud.inputs)) == ["conv3", "relu"]
    assert _names(cloud.outputs) == ["output"]
    transfers = {(t.tensor.name, t.src, t.dst) for t in plan.transfers}
    assert transfers == {
        ("x", None, "device.0"),
        ("conv2", "device.0", "edge.0"),
        ("relu", "device.0", "cloud.0"),
        ("conv3", "edge.0", "cloud.0"),
    }
    relu = next(t for t in device.outputs if t.name == "relu")
    assert (relu.shape, relu.dtype) == ((1, 4, 8, 8), "float32")
    assert plan.model_outputs[0].shape == (1, 2, 8, 8)

    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_array_equal(_run(plan, x)["output"], expected)


def test_names_are_stable_and_the_input_graph_is_not_changed():
    _, gm, _ = _traced(Residual())
    _assign(gm, {"relu_1": "edge", "add": "cloud"})
    before = [(n.name, n.op, n.meta.get(META_TIER)) for n in gm.graph.nodes]
    first, second = build_plan(gm, CTX), build_plan(gm, CTX)
    for a, b in zip(first.stages, second.stages, strict=True):
        assert (a.name, a.inputs, a.outputs) == (b.name, b.inputs, b.outputs)
    assert [(n.name, n.op, n.meta.get(META_TIER)) for n in gm.graph.nodes] == before


def test_tiers_without_nodes_get_no_stage():
    model, gm, x = _traced(Residual())
    _assign(gm, {"add": "cloud"})
    plan = build_plan(gm, CTX)
    assert [s.name for s in plan.stages] == ["device.0", "cloud.0"]
    assert [s.tier for s in plan.stages] == ["device", "cloud"]
    with torch.no_grad():
        np.testing.assert_array_equal(_run(plan, x)["output"], model(x).numpy())


class SizeAcrossCut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x)
        n = y.size(0)
        return self.fc(torch.relu(y).reshape(n, -1))


def test_an_int_crossing_a_cut_is_recomputed_on_the_consumer_tier():
    model, gm, x = _traced(SizeAcrossCut())
    sizes = [n.name for n in compute_nodes(gm) if n.op == "call_method" and n.target == "size"]
    assert sizes, gm.graph
    # the size is computed on device; relu, reshape and fc run on the cloud
    _assign(gm, {"relu": "cloud"})
    plan = build_plan(gm, CTX)
    device, cloud = plan.stages
    assert _names(device.outputs) == ["conv"]  # only the tensor crosses, never the int
    assert _names(cloud.inputs) == ["conv"]
    with torch.no_grad():
        np.testing.assert_array_equal(_run(plan, x)["output"], model(x).numpy())


class ChunkAcrossCut(nn.Module):
    def forward(self, x):
        a, b = torch.chunk(x * 2, 2, dim=1)
        return a + 1, b * 3


def test_a_tuple_of_tensors_crosses_as_its_elements_and_tuple_outputs_are_numbered():
    model, gm, x = _traced(ChunkAcrossCut(), shape=(1, 4, 3, 3))
    getitems = [n.name for n in compute_nodes(gm) if n.op == "call_function" and "getitem" in n.name]
    _assign(gm, {getitems[0]: "edge"})  # chunk on device, its getitems (and all after) on edge
    plan = build_plan(gm, CTX)
    device, edge = plan.stages
    assert sorted(_names(device.outputs)) == sorted(getitems)
    assert _names(plan.model_outputs) == ["output.0", "output.1"]
    assert sorted(_names(edge.outputs)) == ["output.0", "output.1"]
    out = _run(plan, x)
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_array_equal(out["output.0"], expected[0].numpy())
    np.testing.assert_array_equal(out["output.1"], expected[1].numpy())


class OutputAlsoReadLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.sigmoid(y) + x


def test_a_model_output_read_by_a_later_stage_is_written_under_both_names():
    model, gm, x = _traced(OutputAlsoReadLater())
    _assign(gm, {"sigmoid": "cloud"})
    plan = build_plan(gm, CTX)
    device, cloud = plan.stages
    assert sorted(_names(device.outputs)) == ["conv", "output.0"]
    assert sorted(_names(cloud.inputs)) == ["conv", "x"]  # the model input is read directly
    out = _run(plan, x)
    with torch.no_grad():
        y, z = model(x)
    np.testing.assert_array_equal(out["output.0"], y.numpy())
    np.testing.assert_array_equal(out["output.1"], z.numpy())


def test_resnet18_split_in_thirds_is_exact():
    torchvision = pytest.importorskip("torchvision")
    model, gm, x = _traced(torchvision.models.resnet18(weights=None), shape=(1, 3, 64, 64))
    nodes = compute_nodes(gm)
    for i, node in enumerate(nodes):
        node.meta[META_TIER] = TIERS[3 * i // len(nodes)]
    plan = build_plan(gm, CTX)
    assert [s.name for s in plan.stages] == ["device.0", "edge.0", "cloud.0"]
    assert all(t.src is not None for t in plan.transfers if t.dst != "device.0")
    with torch.no_grad():
        np.testing.assert_array_equal(_run(plan, x)["output"], model(x).numpy())


def test_a_node_without_a_tier_is_refused():
    _, gm, _ = _traced(Residual())
    with pytest.raises(
        PartcError, match=r"7 node\(s\) have no tier \(conv1, relu, conv2, relu_1, conv3 and 2 more\); run a cut pass"
    ):
        build_plan(gm, CTX)


def test_an_unknown_tier_names_the_node_and_the_known_tiers():
    _, gm, _ = _traced(Residual())
    _assign(gm, {"head": "moon"})
    with pytest.raises(
        ClusterError, match=r"cluster.yaml: node 'head' is assigned to tier 'moon'.*device, edge, cloud"
    ):
        build_plan(gm, CTX)


def test_data_flowing_back_a_tier_is_a_bug_reported_by_lint():
    _, gm, _ = _traced(Residual())
    _assign(gm, {"conv2": "cloud", "relu_1": "edge"})
    with pytest.raises(RuntimeError, match="data flows back a tier"):
        build_plan(gm, CTX)


class ReturnsInput(nn.Module):
    def forward(self, x):
        return x, x + 1


def test_a_model_output_that_is_a_model_input_is_refused():
    _, gm, _ = _traced(ReturnsInput())
    _assign(gm, {})
    with pytest.raises(UnsupportedLayerError, match="model outputs output.0: not a tensor computed by the model"):
        build_plan(gm, CTX)


def test_run_plan_names_what_is_missing():
    _, gm, _ = _traced(Residual())
    _assign(gm, {"add": "cloud"})
    plan = build_plan(gm, CTX)
    with pytest.raises(PartcError, match="run_plan: missing x, stage cloud.0"):
        run_plan(plan, {"device.0": eager_stage_fn(plan.stages[0])}, {})
    assert plan.stage("cloud.0") is plan.stages[1]
    with pytest.raises(PartcError, match="no stage 'edge.0'; stages are: device.0, cloud.0"):
        plan.stage("edge.0")
