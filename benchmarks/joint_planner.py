"""The joint planner against the baselines, on partc's own cost model, over a grid of clusters.

For every model, uplink bandwidth and edge node count, plans the model (``partc plan
--compare``: the same pipeline and prices as ``partc compile``) on an edge tier of N
Raspberry Pi 4 nodes (1 Gbit/s, 0.2 ms between them) that sends up to a cloud CPU server
over the uplink, and prints, per cell: partc's predicted latency, the best baseline and
its latency, partc's speed-up over it, whether the primary plan is the fastest plan of its
build, and what runs in parallel. Every baseline is priced by the rules partc's own plans
are priced by (``partc.compilation``). Writes benchmarks/results/joint_planner.md and .json.
Takes about 10-40 s per cell on a 2-core host (the tile and branch searches of every plan
considered); the full grid (7 models x 3 uplinks x 2 node counts) about half an hour.

    python benchmarks/joint_planner.py [--models googlenet,resnet50] [--uplinks 1.1,5.85,18.88] [--nodes 2,4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from partc.planning import plan_model

RESULTS = Path(__file__).resolve().parent / "results"
MULTI_NODE = ("d3+tiles", "deepthings", "branch-lb")  # the seeds' strategies that use a tier's nodes
MODELS = ("vgg16", "resnet50", "googlenet", "inception_v3", "mobilenet_v2", "alexnet", "densenet121")
CLUSTER = """\
tiers:
  - {{name: edge, target: rpi4, backend: onnx, nodes: {nodes}}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}}
  - {{from: edge, to: cloud, bandwidth: {uplink}Mbit/s, latency: 20ms}}
"""


def run_cell(model: str, uplink: float, nodes: int, folder: Path) -> dict:
    """Plan ``model`` on the grid's cluster with ``nodes`` edge nodes and an ``uplink`` in Mbit/s."""
    cluster = folder / f"{model}-{uplink}-{nodes}.yaml"
    cluster.write_text(CLUSTER.format(nodes=nodes, uplink=uplink))
    shape = "1,3,299,299" if model == "inception_v3" else "1,3,224,224"
    started = time.perf_counter()
    report = plan_model(f"torchvision:{model}", [shape], cluster, compare=True)
    seconds = time.perf_counter() - started
    feasible = {name: cost.latency for name, cost in report.baselines.items() if cost is not None}
    classic = {name: v for name, v in feasible.items() if name not in MULTI_NODE}
    best, best_multi = min(classic, key=classic.get), min(MULTI_NODE, key=lambda n: feasible.get(n, float("inf")))
    kinds = sorted({g["kind"] for g in report.parallel})
    return {
        "model": model, "uplink_mbit": uplink, "nodes": nodes, "partc_ms": report.cost.latency * 1e3,
        "best_baseline": best, "best_baseline_ms": feasible[best] * 1e3,
        "speedup": feasible[best] / report.cost.latency,
        "best_multi_node": best_multi, "best_multi_node_ms": feasible.get(best_multi, float("inf")) * 1e3,
        "speedup_multi_node": feasible.get(best_multi, float("inf")) / report.cost.latency,
        "primary_fastest": all(report.cost.latency <= p.latency * (1 + 1e-9) for p in report.plans),
        "no_worse_than_baselines": all(report.cost.latency <= v * (1 + 1e-9) for v in feasible.values()),
        "parallel": ", ".join(kinds) or "-", "stages": " ".join(report.plans[0].stages), "plan_s": seconds,
    }


def markdown(rows: list[dict], command: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# The joint planner vs the baselines (partc's cost model)",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores. Edge: N x rpi4 joined at 1 Gbit/s; "
        "cloud: cloud-cpu over the uplink (20 ms). Every baseline is priced by partc's own rules; the multi-node "
        "ones (d3+tiles, deepthings, branch-lb) use the tier's nodes.",
        "",
        "| model | uplink Mbit/s | edge nodes | partc ms | best one-node baseline | its ms | speed-up "
        "| best multi-node baseline | its ms | speed-up | primary fastest | never worse | parallel | stages |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['uplink_mbit']:g} | {r['nodes']} | {r['partc_ms']:.1f} | {r['best_baseline']} "
            f"| {r['best_baseline_ms']:.1f} | {r['speedup']:.2f}x | {r['best_multi_node']} "
            f"| {r['best_multi_node_ms']:.1f} | {r['speedup_multi_node']:.2f}x "
            f"| {'yes' if r['primary_fastest'] else 'NO'} | {'yes' if r['no_worse_than_baselines'] else 'NO'} "
            f"| {r['parallel']} | {r['stages']} |"
        )
    better = sum(r["speedup"] > 1 + 1e-6 for r in rows)
    multi = sum(r["speedup_multi_node"] > 1 + 1e-6 for r in rows)
    lines += ["", f"partc strictly faster than the best one-node baseline in {better} of {len(rows)} cells, than the "
              f"best multi-node baseline in {multi}; never slower than any baseline in "
              f"{sum(r['no_worse_than_baselines'] for r in rows)} of {len(rows)}; the primary plan the fastest of "
              f"its build in {sum(r['primary_fastest'] for r in rows)} of {len(rows)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision models")
    parser.add_argument("--uplinks", default="1.1,5.85,18.88", help="comma-separated uplink bandwidths, Mbit/s")
    parser.add_argument("--nodes", default="2,4", help="comma-separated edge node counts")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "joint_planner.md", help="markdown to write")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for uplink in map(float, args.uplinks.split(",")):
                for nodes in map(int, args.nodes.split(",")):
                    row = run_cell(model, uplink, nodes, Path(tmp))
                    rows.append(row)
                    print(f"{model:13s} {uplink:6g} Mbit/s {nodes} nodes: partc {row['partc_ms']:8.1f} ms, "
                          f"{row['best_baseline']} {row['best_baseline_ms']:8.1f} ms ({row['speedup']:.2f}x), "
                          f"{row['best_multi_node']} ({row['speedup_multi_node']:.2f}x), "
                          f"{row['parallel']}, planned in {row['plan_s']:.0f} s", flush=True)
    command = "python benchmarks/joint_planner.py " + " ".join(
        f"--{k} {v}" for k, v in (("models", args.models), ("uplinks", args.uplinks), ("nodes", args.nodes)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(rows, command))
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
