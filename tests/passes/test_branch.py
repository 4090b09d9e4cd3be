"""distribute-branches: fork/join regions, the exact branch assignment, and exact runs across nodes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from partc.build import compile_model
from partc.cluster import cluster_from_dict
from partc.ir import META_PARALLEL, META_TILE
from partc.manifest import read_manifest
from partc.partition.price import LinkPrice
from partc.passes import PASSES, passes_named
from partc.passes.branch import distribute_branches
from partc.pipeline import run_passes
from partc.report import trace_model
from partc.runtime.deploy import LocalWorkers, connect_build
from partc.runtime.local import load
from partc.tiling.branches import assign_branches, branch_step, find_regions
from partc.trace import load_model

LINK = LinkPrice("edge->edge", 1.25e8, 2e-4)


def _brute_force(compute, inputs, outputs, nodes, link):
    """The least makespan over every assignment whose node 0 runs a branch and whose remote nodes are 1..m."""
    best = sum(compute)
    for labels in itertools.product(range(nodes), repeat=len(compute)):
        used = sorted(set(labels))
        if 0 in labels and used == list(range(len(used))):
            best = min(best, branch_step(labels, compute, inputs, outputs, link))
    return best


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 0.05), min_size=1, max_size=7),
    st.integers(1, 4),
    st.floats(1e3, 5e6),
    st.lists(st.floats(1e3, 5e6), min_size=7, max_size=7),
    st.sampled_from([LINK, LinkPrice("edge->edge", 1.25e6, 5e-3), LinkPrice("edge->edge", 1e10, 0.0)]),
)
def test_the_assignment_is_the_brute_force_optimum(compute, nodes, fork_bytes, result_bytes, link):
    inputs, outputs = [fork_bytes] * len(compute), result_bytes[: len(compute)]
    found = assign_branches(compute, inputs, outputs, nodes, link)
    assert found.seconds == pytest.approx(_brute_force(compute, inputs, outputs, nodes, link), rel=1e-12, abs=1e-15)
    assert found.seconds == pytest.approx(branch_step(found.node, compute, inputs, outputs, link), rel=1e-12)
    assert 0 in found.node and sorted(set(found.node)) == list(range(1 + max(found.node)))


def test_eight_branches_on_four_nodes_match_brute_force():
    rng = np.random.default_rng(3)
    compute = rng.uniform(0.001, 0.03, 8).tolist()
    inputs, outputs = [4e5] * 8, rng.uniform(1e4, 2e5, 8).tolist()
    found = assign_branches(compute, inputs, outputs, 4, LINK)
    assert found.seconds == pytest.approx(_brute_force(compute, inputs, outputs, 4, LINK), rel=1e-12)
    assert found.seconds < sum(compute)


def test_inception_blocks_and_downsampling_blocks_are_regions_identity_blocks_are_not():
    googlenet = trace_model("torchvision:googlenet", ["1,3,96,96"])
    regions = find_regions(googlenet, lambda n: True)
    assert [r.join.name for r in regions] == [f"cat{s}" for s in ["", "_1", "_2", "_3", "_4", "_5", "_6", "_7", "_8"]]
    assert all(len(r.branches) == 4 for r in regions)
    resnet = trace_model("torchvision:resnet18", ["1,3,64,64"])
    blocks = find_regions(resnet, lambda n: True)  # the projection shortcut runs beside the two 3x3 convs
    assert [(r.branches[0][0].name, r.branches[1][0].name) for r in blocks] == [
        (f"layer{k}_0_conv1", f"layer{k}_0_downsample_0") for k in (2, 3, 4)]
    inception = trace_model("torchvision:inception_v3", ["1,3,299,299"])
    outer = find_regions(inception, lambda n: True)
    assert len(outer) == 11 and all(3 <= len(r.branches) <= 4 for r in outer)  # Mixed_5b .. Mixed_7c


def _cluster(nodes: int, edge_link: bool = True) -> dict:
    links = [{"from": "device", "to": "edge", "bandwidth": "1Gbit/s", "latency": "1ms"}]
    if edge_link:
        links.append({"from": "edge", "to": "edge", "bandwidth": "1Gbit/s", "latency": "0.2ms"})
    return {"tiers": [{"name": "device", "target": "rpi4", "backend": "torchscript"},
                      {"name": "edge", "target": "rpi4", "backend": "onnx", "nodes": nodes}],
            "links": links, "constraints": {"forbid": ["device"]}}


def test_the_pass_tags_branches_and_records_them():
    ctx = cluster_from_dict(_cluster(3))
    gm = run_passes(trace_model("torchvision:googlenet", ["1,3,96,96"]), passes_named(["annotate-profile",
                                                                                      "select-cuts"]), ctx)
    out = distribute_branches(gm, ctx)
    records = out.gm.meta[META_PARALLEL]
    assert records and all(r["kind"] == "branches" and r["parallel_s"] < r["sequential_s"] for r in records)
    tagged = [n for n in out.gm.graph.nodes if META_TILE in n.meta]
    assert tagged and {n.meta[META_TILE][1] for n in tagged} <= {0, 1, 2}
    assert not any(META_TILE in n.meta for n in gm.graph.nodes)  # the input is untouched
    assert out.summary.startswith(f"{len(records)} region(s) distributed: cat")
    assert PASSES["distribute-branches"].run is distribute_branches


def test_without_a_link_within_the_tier_nothing_moves_and_the_build_says_why():
    ctx = cluster_from_dict(_cluster(3, edge_link=False))
    gm = trace_model("torchvision:googlenet", ["1,3,96,96"])
    out = distribute_branches(gm, ctx)
    assert out.gm is gm and out.summary.startswith("no tier has several nodes and a link to itself")


@pytest.mark.slow
@pytest.mark.parametrize(("model", "nodes"), [("googlenet", 2), ("googlenet", 3), ("inception_v3", 3)])
def test_branches_run_exactly_through_artifacts_and_across_workers(model, nodes, tmp_path):
    import yaml

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(_cluster(nodes)))
    build = compile_model(f"torchvision:{model}", ["1,3,96,96"], cluster, tmp_path / "b").path
    manifest = read_manifest(build)
    primary = manifest.plans[0]
    edge = manifest.stage("edge.0").program(primary.programs["edge.0"])
    assert any(len(step) > 1 for step in edge.steps)  # some step runs on several nodes
    # another node runs a branch; how many of them pays is the costs' choice (inception_v3 on 3 Pis: 2)
    stages = {s.name for s in manifest.stages}
    assert "edge.1" in stages and stages <= {"device.0"} | {f"edge.{t}" for t in range(nodes)}
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96), dtype=np.float32)
    with torch.no_grad():
        want = load_model(f"torchvision:{model}")(torch.from_numpy(x)).numpy()
    local = load(build)({"x": x})["output"]
    assert np.abs(local - want).max() <= 1e-5 * np.abs(want).max()
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, margin=math.inf) as driver:
        (remote,) = list(driver.run([{"x": x}]))
    np.testing.assert_array_equal(remote["output"], local)
