"""Vertical tiling in the testbed: the edge segment on 1, 2 and 4 edge workers (root).

For each model and each edge node count N, the model is compiled for a device -> edge
cluster whose edge tier has N nodes joined by a 1 Gbit/s, 0.2 ms link (the device runs the
stem, pinned; the edge the rest, where ``tile-conv-stages`` tiles its convolutions). The
build then runs in ``partc.runtime.testbed.Testbed``: every worker in its own namespace and
with the same CPU quota (``--share`` cores each, so that four of them fit on this host),
requests one at a time. Reported per N: the tiling the pass chose (grid and halo FLOPs over
the untiled run), the edge stage's predicted seconds (cost model, the edge target's speed)
and measured seconds (smoothed, on this host under the quota, tiles' network round trips
included), and the speedup of each over N = 1. The predicted speedup is the cost model's;
the measured one is what the tiles buy on real processes and sockets.

Writes ``benchmarks/results/tiling.md`` (``-o``). Needs root (network namespaces, tc,
cgroups) and the onnx and runtime extras. Every model and node count compiles a build and
starts a testbed (vgg16's builds are the slow ones): some ten to twenty minutes on 2 cores
with the defaults.

Usage: ``sudo python benchmarks/tiling.py [--models resnet18,vgg16] [--nodes 1,2,4]
[--share 0.45] [--requests 5] [-o benchmarks/results/tiling.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from partc.build import compile_model
from partc.cluster import load_cluster
from partc.ir import META_FLOPS, META_TIER
from partc.manifest import Manifest
from partc.passes import DEFAULT_PIPELINE
from partc.pipeline import run_passes
from partc.report import trace_model
from partc.runtime.testbed import Testbed

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = """\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: edge, target: edge-x86, backend: onnx, nodes: {nodes}}}
links:
  - {{from: device, to: edge, bandwidth: 100Mbit/s, latency: 2ms}}{edge_link}
constraints:
  pin: {{device: [{stem}]}}
"""
STEMS = {"resnet18": "conv1", "vgg16": "features_0", "googlenet": "conv1_conv"}


def run_one(model: str, nodes: int, share: float, requests: int, workdir: Path) -> dict:
    """Compile ``model`` for an edge tier of ``nodes`` nodes and measure it in the testbed."""
    folder = workdir / f"{model}-{nodes}"
    folder.mkdir()
    edge_link = "\n  - {from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}" if nodes > 1 else ""
    (folder / "cluster.yaml").write_text(CLUSTER.format(nodes=nodes, stem=STEMS[model], edge_link=edge_link))
    build = compile_model(f"torchvision:{model}", ["1,3,224,224"], folder / "cluster.yaml", folder / "build")
    halo = _halo(f"torchvision:{model}", folder / "cluster.yaml")
    manifest = build.manifest
    entry = manifest.stage("edge.0").program(manifest.plans[0].programs["edge.0"])
    shares = {s.name: share for s in manifest.stages}
    with Testbed(build.path, cpu_shares=shares) as testbed:
        report = testbed.measure(requests)
    measured = next(s["measured_s"] for s in report.to_json()["stages"] if s["stage"] == "edge.0")
    return {"model": model, "nodes": nodes, "predicted_s": entry.predicted_s, "measured_s": measured,
            "e2e_s": report.measured_s, "summary": _tiling_summary(manifest), "halo": halo}


def _halo(model: str, cluster: Path) -> float:
    """FLOPs on the edge tier with the primary plan tiled, over those untiled, minus one."""
    ctx = load_cluster(cluster)
    gm = run_passes(trace_model(model, ["1,3,224,224"]), DEFAULT_PIPELINE.model, ctx)
    tiled = run_passes(gm, DEFAULT_PIPELINE.plan, ctx)

    def flops(g):
        return sum(n.meta.get(META_FLOPS, 0) for n in g.graph.nodes if n.meta.get(META_TIER) == "edge")

    return flops(tiled) / flops(gm) - 1


def _tiling_summary(manifest: Manifest) -> str:
    """The primary plan's edge stage: its steps, local or tiles on several nodes."""
    steps = [len(s) for sch in manifest.stage("edge.0").schedules if sch.id == "edge.0" for s in sch.steps]
    return " / ".join(f"{n} tiles" if n > 1 else "local" for n in steps) or "untiled"


def markdown(rows: list[dict], command: str, share: float, load: tuple[float, float]) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Vertical tiling in the testbed: the edge segment on 1, 2 and 4 workers",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} before and "
        f"{load[1]:.1f} after (shared machine: compare the speedups, not the times). Every worker gets {share} "
        "cores of this host; the edge tier's nodes are joined by 1 Gbit/s, 0.2 ms. Predicted: the cost model's "
        "edge stage on the edge-x86 target (tiles in parallel, scatter and gather over the edge link); measured: "
        "the edge stage's smoothed time in the testbed, its tiles' round trips to the other nodes included.",
        "",
        "| model | edge nodes | edge stage steps | halo FLOPs | predicted ms | predicted speedup | measured ms | "
        "measured speedup | end to end ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r for r in rows if r["nodes"] == 1}
    for r in rows:
        b = base.get(r["model"], r)
        lines.append(f"| {r['model']} | {r['nodes']} | {r['summary']} | +{r['halo']:.1%} | "
                     f"{r['predicted_s'] * 1e3:.1f} | {b['predicted_s'] / r['predicted_s']:.2f} | "
                     f"{r['measured_s'] * 1e3:.1f} | {b['measured_s'] / r['measured_s']:.2f} | "
                     f"{r['e2e_s'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vgg16",
                        help=f"comma-separated torchvision models, of {', '.join(STEMS)} (default resnet18,vgg16)")
    parser.add_argument("--nodes", default="1,2,4", help="comma-separated edge node counts (default 1,2,4)")
    parser.add_argument("--share", type=float, default=0.45, help="cores of this host per worker (default 0.45)")
    parser.add_argument("--requests", type=int, default=5, help="timed requests per build (default 5)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "tiling.md",
                        help="report to write (default benchmarks/results/tiling.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="partc-bench-tiling-") as tmp:
        for model in args.models.split(","):
            for nodes in map(int, args.nodes.split(",")):
                row = run_one(model, nodes, args.share, args.requests, Path(tmp))
                print(json.dumps({k: row[k] for k in ("model", "nodes", "summary", "predicted_s", "measured_s")}),
                      flush=True)
                rows.append(row)
    command = "sudo python " + " ".join(["benchmarks/tiling.py", *sys.argv[1:]])
    text = markdown(rows, command, args.share, (load_before, os.getloadavg()[0]))
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
