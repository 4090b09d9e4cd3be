"""partc's pictures: the partition as Graphviz dot, the bandwidth sweep, a request's timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydot
import pytest
from clusters import three_tier

from partc.cli import main
from partc.cluster import cluster_from_dict, load_cluster
from partc.compilation import compile_plans
from partc.draw import CUT_COLOUR, Step, ir_to_dot, plot_bandwidth_sweep, plot_timeline, tier_colours
from partc.ir import META_TIER
from partc.passes import passes_named
from partc.pipeline import run_passes
from partc.report import trace_model

EXAMPLES = Path(__file__).parent.parent / "examples"


def _graph(dot: str) -> pydot.Dot:
    (graph,) = pydot.graph_from_dot_data(dot)
    return graph


def _nodes(graph) -> dict[str, pydot.Node]:
    """Every node of ``graph`` and of its clusters, by name (quotes stripped)."""
    found = {n.get_name().strip('"'): n for n in graph.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
    for sub in graph.get_subgraphs():
        found |= _nodes(sub)
    return found


def _clusters(graph) -> list[pydot.Subgraph]:
    found = []
    for sub in graph.get_subgraphs():
        found += [sub, *_clusters(sub)]
    return found


def _label(element) -> str:
    return (element.get_label() or element.get_attributes().get("label") or "").strip('"')


def _check_partition(gm, tiers) -> pydot.Dot:
    """The dot of ``gm`` parses; every IR node is filled in its tier's colour; every edge between two
    tiers is drawn as a cut, the first one of each tensor to each tier labelled with its bytes."""
    graph = _graph(ir_to_dot(gm, tiers))
    nodes, colour = _nodes(graph), tier_colours(tiers)
    for n in gm.graph.nodes:
        assert nodes[n.name].get_fillcolor() == colour[n.meta[META_TIER]], n.name
    assert {nodes[f"legend: {t}"].get_fillcolor() for t in tiers} == set(colour.values())
    edges = [(e.get_source().strip('"'), e.get_destination().strip('"'), e) for e in graph.get_edges()]
    tier = {n.name: n.meta[META_TIER] for n in gm.graph.nodes}
    cuts = [(a, b, e) for a, b, e in edges if a in tier and b in tier and tier[a] != tier[b]]
    assert cuts and all(e.get_color() == CUT_COLOUR for _, _, e in cuts)
    labelled = {(a, tier[b]) for a, b, e in cuts if _label(e)}
    assert labelled == {(a, tier[b]) for a, b, _ in cuts}
    assert all(_label(e).split()[1] in ("B", "kB", "MB") for _, _, e in cuts if _label(e))
    return graph


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """resnet18 at 128x128 on examples/edge4.yaml, the device forbidden: the edge's four nodes run tiles."""
    path = tmp_path_factory.mktemp("draw") / "edge4.yaml"
    path.write_text((EXAMPLES / "edge4.yaml").read_text() + "constraints: {forbid: [device]}\n")
    ctx = load_cluster(path)
    return compile_plans("torchvision:resnet18", ["1,3,128,128"], ctx), ctx


@pytest.mark.slow
def test_the_partition_colours_every_node_by_tier_and_marks_tiles(tiled, tmp_path):
    compiled, ctx = tiled
    graph = _check_partition(compiled.primary.gm, ctx.tier_names)
    labels = [_label(c) for c in _clusters(graph)]
    tiles = [text for text in labels if " tiles over " in text]
    assert tiles and all(text.startswith("edge: ") for text in tiles)
    assert any(text.startswith("node 1") for text in labels)  # each node's share boxed in its run


@pytest.mark.slow
def test_distributed_branches_are_marked():
    ctx = cluster_from_dict({
        "tiers": [{"name": "device", "target": "rpi4", "backend": "torchscript"},
                  {"name": "edge", "target": "rpi4", "backend": "onnx", "nodes": 3}],
        "links": [{"from": "device", "to": "edge", "bandwidth": "1Gbit/s", "latency": "1ms"},
                  {"from": "edge", "to": "edge", "bandwidth": "1Gbit/s", "latency": "0.2ms"}],
        "constraints": {"forbid": ["device"]}})
    gm = run_passes(trace_model("torchvision:googlenet", ["1,3,96,96"]),
                    passes_named(["annotate-profile", "select-cuts", "distribute-branches"]), ctx)
    graph = _check_partition(gm, ctx.tier_names)
    assert any(" branches over " in _label(c) and _label(c).startswith("edge: ") for c in _clusters(graph))


def test_plan_draws_the_partition_and_dumps_after_a_pass(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(three_tier(pin="{device: [left]}"))
    code = main(["plan", "tests/models.py:branches", "--input-shape", "1,4,16,16", "--cluster", str(cluster),
                 "--draw", str(tmp_path / "plan.svg"), "--dump-after", "select-cuts",
                 "--dump-dir", str(tmp_path / "dump")])
    assert code == 0
    assert f"partition drawn: {tmp_path / 'plan.dot'}" in capsys.readouterr().out
    graph = _graph((tmp_path / "plan.dot").read_text())
    assert {f"legend: {t}" for t in ("device", "edge", "cloud")} <= set(_nodes(graph))
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == ["02-select-cuts.dot", "02-select-cuts.json"]
    _graph((tmp_path / "dump" / "02-select-cuts.dot").read_text())


def test_the_sweep_plot_shows_only_feasible_strategies_and_marks_plans(tmp_path):
    bandwidths = np.geomspace(1e4, 1e8, 9)
    ours = 0.05 + 1e4 / bandwidths
    series = {"partc": ours, "dads": ours.copy(), "cloud-only": 0.02 + 1e5 / bandwidths,
              "deepthings": np.full(9, np.nan)}
    regions = [(1e4, 1e6, "layers: device 3"), (1e6, 1e8, "layers: device 1, cloud 2")]
    fig = plot_bandwidth_sweep(series, bandwidths, tmp_path / "sweep.png", title="t", regions=regions,
                               bandwidth=2.5e6)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    strategies, plans = (sorted(t.get_text() for t in legend.get_texts()) for legend in fig.legends)
    assert strategies == ["cloud-only", "cluster file: 20 Mbit/s", "dads (= partc)",
                          "partc", "plan switch"]
    assert plans == ["A: 0.08 - 8 Mbit/s, layers: device 3", "B: 8 - 800 Mbit/s, layers: device 1, cloud 2"]
    (ax,) = fig.axes
    ours_line = next(line for line in ax.get_lines() if line.get_label() == "partc")
    assert all(ours_line.get_zorder() > line.get_zorder() for line in ax.get_lines() if line is not ours_line)
    assert ax.yaxis.get_major_formatter()(600, 0) == "600" and ax.xaxis.get_major_formatter()(0.1, 0) == "0.1"


def test_the_timeline_has_one_bar_per_step_in_each_row(tmp_path):
    steps = [Step("device.0", "device", 0.030, 0.041), Step("device.0->edge.0", None, 0.018, 0.011),
             Step("edge.0", "edge", 0.012, 0.010), Step("edge.0->cloud.0", None, 0.025, None),
             Step("cloud.0", "cloud", 0.025, None)]
    fig = plot_timeline(steps, tmp_path / "t.png", title="t", tiers=["device", "edge", "cloud"])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    rows = [round(p.get_y() + p.get_height() / 2) for p in ax.patches]
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6, 8]  # measured rows of steps not run have no bar
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["device.0 predicted", "device.0 measured"]
    bars = {p.get_gid(): p for p in ax.patches}
    assert bars["edge.0:measured"].get_x() == pytest.approx((0.041 + 0.011) * 1e3)  # after the steps before it
    assert bars["cloud.0:predicted"].get_facecolor()[:3] != bars["device.0:predicted"].get_facecolor()[:3]


@pytest.mark.slow
def test_run_draws_a_timeline_of_the_workers(tmp_path):
    import matplotlib.image

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(three_tier(pin="{device: [conv1]}"))
    build = tmp_path / "b"
    assert main(["compile", "tests/models.py:residual", "--input-shape", "1,8,16,16", "--cluster", str(cluster),
                 "-o", str(build)]) == 0
    assert main(["run", str(build), "--distributed", "--requests", "3", "--timeline", str(tmp_path / "t.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "t.png").shape[2] in (3, 4)
