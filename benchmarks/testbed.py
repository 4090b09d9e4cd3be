"""Predicted vs measured latency in the emulated testbed, for several models and bandwidths (root).

For every model, every bandwidth of the first link and every count of edge nodes, the model
is compiled for a device -> edge -> cloud cluster (``CLUSTER``; the plan, so the cut, changes
with the bandwidth; with several edge nodes, joined by 1 Gbit/s, the edge part may run tiled
or branched over them), then run in ``partc.runtime.testbed.Testbed``: every stage in its own network
namespace, links shaped with tc tbf + a user-space delay proxy, CPU quotas from the targets.
Before measuring, the testbed calibrates: it times every program under its node's quota and
prices the plan again with those times (``Testbed.calibrate``). Requests run one at a time;
end-to-end latency is the median. Reported per cell, stage and link: predicted for the
targets (the manifest), predicted for the emulated nodes (calibrated) and measured.

Writes ``benchmarks/results/testbed.md`` (``-o``). Needs root (network namespaces, tc,
cgroups) and the onnx and runtime extras. Every model and bandwidth compiles a build and
starts a testbed, about a minute each on 2 cores: some ten minutes with the defaults.

Usage: ``sudo python benchmarks/testbed.py [--models resnet18,mobilenet_v2,googlenet]
[--bandwidths 5,20,100] [--edge-nodes 1,2] [--size 224] [--requests 5] [-o benchmarks/results/testbed.md]``.
Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from partc.build import compile_model
from partc.errors import RunError
from partc.runtime.testbed import Testbed

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = """\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: edge, target: edge-x86, backend: onnx, nodes: {nodes}}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: edge, bandwidth: {bandwidth}Mbit/s, latency: 10ms}}
  - {{from: edge, to: cloud, bandwidth: 100Mbit/s, latency: 20ms}}{edge_link}
"""
EDGE_LINK = "\n  - {from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}"


def run_one(model: str, bandwidth: float, nodes: int, size: int, requests: int, workdir: Path) -> dict:
    """Compile ``model`` for the cluster with ``bandwidth`` Mbit/s on its first link and ``nodes`` edge
    nodes; measure it in the testbed."""
    folder = workdir / f"{model}-{bandwidth:g}-{nodes}"
    folder.mkdir(exist_ok=True)  # a retry rewrites the build
    (folder / "cluster.yaml").write_text(CLUSTER.format(bandwidth=bandwidth, nodes=nodes,
                                                        edge_link=EDGE_LINK if nodes > 1 else ""))
    build = compile_model(f"torchvision:{model}", [f"1,3,{size},{size}"], folder / "cluster.yaml", folder / "build")
    with Testbed(build.path) as testbed:
        report = testbed.measure(requests)
    primary = build.manifest.plans[0]
    parallel = sorted({s.name for s in build.manifest.stages if s.index} & set(_peers(build.manifest, primary)))
    return {"model": model, "bandwidth_mbit": bandwidth, "nodes": nodes,
            "chain": [*primary.stages, *(f"{name} (parallel steps)" for name in parallel)], "report": report}


def _peers(manifest, plan) -> set[str]:
    """The further tier nodes ``plan``'s tiled or branched stages call."""
    out = set()
    for name, pid in plan.programs.items():
        stage = manifest.stage(name)
        program = stage.program(pid)
        out |= {f"{stage.tier}.{t}" for ids in getattr(program, "steps", ()) for t in range(1, len(ids))}
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.2f}" if predicted else "-"


def markdown(rows: list[dict], command: str, size: int, load: tuple[float, float]) -> str:
    """Return the results as the markdown report."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    reports = [r["report"] for r in rows]
    e2e = [r.measured_s / r.calibrated_s for r in reports]
    stage_ratios = [s.measured_s / s.calibrated_s for r in reports for s in r.stages
                    if s.calibrated_s and s.measured_s]
    lines = [
        "# Testbed: predicted (for the targets, and calibrated for the emulated nodes) vs measured latency",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores, 1x3x{size}x{size} inputs, load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after (the machine is shared with other engineers' test runs; "
        "each cell also gives the load average after it). Cluster: device (rpi4, torchscript) -> edge "
        "(edge-x86, onnx) -> cloud (cloud-cpu, onnx); device->edge at the bandwidth shown with 10 ms latency, "
        "edge->cloud 100 Mbit/s, 20 ms; several edge nodes are joined by 1 Gbit/s, 0.2 ms. Each build is "
        "compiled for its bandwidth, then run in the testbed; "
        "requests one at a time (after warm-up).",
        "",
        "CPU quotas emulate a target's speed in cores of this host (its peak GFLOP/s over the cost model's "
        "reference core) and are capped at this host's cores: edge-x86 and cloud-cpu need more cores than this "
        "host has, so they are *not emulated* (the testbed says so) and their stages run slower than predicted "
        "for the target by construction. **Calibrated**: before measuring, the testbed times every program of "
        "the primary plan in its node's cgroup with its thread count (warm, median of 9, resting between calls "
        "so the quota refills as between requests, the calls' and the requests' starts spread over the quota's "
        "period), measures a call to each further edge node and each stage's "
        "per-request overhead (frames and gRPC: its identity route) under the same quotas, and prices the plan "
        "with those figures, the links as shaped and the reply carrying the outputs back to the driver "
        "(`partc.partition.price`). Measured / calibrated is the check that the testbed measures what the plan "
        "says about the machines it runs on; measured / target is what the emulation cannot reach.",
        "",
        f"Measured / calibrated end to end: {min(e2e):.2f}-{max(e2e):.2f} (median {statistics.median(e2e):.2f}), "
        f"{sum(abs(x - 1) <= 0.15 for x in e2e)} of {len(e2e)} cells within 15%, "
        f"{sum(abs(x - 1) <= 0.25 for x in e2e)} within 25%; per stage {min(stage_ratios):.2f}-"
        f"{max(stage_ratios):.2f}, {sum(abs(x - 1) <= 0.25 for x in stage_ratios)} of {len(stage_ratios)} within 25%.",
        "",
        "| model | device->edge Mbit/s | edge nodes | primary plan's stages | predicted for targets ms | "
        "calibrated ms | measured ms (median) | min ms | measured / calibrated | measured / target | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rep = r["report"]
        lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {r['nodes']} | {', '.join(r['chain'])} | "
                     f"{_ms(rep.predicted_s)} | "
                     f"{_ms(rep.calibrated_s)} | {_ms(rep.measured_s)} | {_ms(rep.measured_min_s)} | "
                     f"{_ratio(rep.measured_s, rep.calibrated_s)} | {_ratio(rep.measured_s, rep.predicted_s)} | "
                     f"{rep.load_average:.1f} |")
    lines += ["", "Per stage: compute predicted for the target, calibrated (the stage's programs timed under its "
              "quota, tile steps priced), measured (median of the worker's reported compute per request). "
              "*needs*: cores of this host that would run as fast as the target.", "",
              "| model | Mbit/s | edge nodes | stage | target | cores | needs | emulated | target ms | "
              "calibrated ms | overhead ms | measured ms | measured / calibrated |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["report"].stages:
            if not s.predicted_s:
                continue
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {r['nodes']} | {s.stage} | {s.target} | "
                         f"{s.share:.2f} | {s.target_cores:.2f} | {'yes' if s.emulates_target else '**no**'} | "
                         f"{s.predicted_s * 1e3:.2f} | {s.calibrated_s * 1e3:.2f} | {s.overhead_s * 1e3:.2f} | "
                         f"{s.measured_s * 1e3:.2f} | {_ratio(s.measured_s, s.calibrated_s)} |")
    calls = [(r, c) for r in rows for c in r["report"].calls]
    if calls:
        lines += ["", "A call to a further edge node, besides its program and bytes: priced for the target, and "
                  "measured under the quotas (the calibrated prices use it).", "",
                  "| model | Mbit/s | edge nodes | link | target ms | calibrated ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['bandwidth_mbit']:g} | {r['nodes']} | {c.link} | {_ms(c.predicted_s)} | "
                  f"{_ms(c.calibrated_s)} |" for r, c in calls]
    lines += ["", "Per link, per request: target = the plan's forward bytes / bandwidth + one-way latency (the "
              "manifest); calibrated = that plus the reply (the model's outputs) back, at the links as shaped; "
              "measured = both on the wire, latency both ways; measured Mbit/s = measured bytes / seconds on "
              "the wire without the latency.", "",
              "| model | Mbit/s | link | shaped Mbit/s | predicted KB | measured KB | target ms | calibrated ms | "
              "measured ms | measured Mbit/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k in r["report"].links:
            shaped = f"{k.bandwidth * 8e-6:.1f}" if k.bandwidth else "unshaped"
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} ({r['nodes']} edge) | {k.link} | {shaped} | "
                         f"{k.predicted_bytes / 1e3:.1f} | {k.measured_bytes / 1e3:.1f} | {_ms(k.predicted_s)} | "
                         f"{_ms(k.calibrated_s)} | {_ms(k.measured_s)} | {k.measured_bandwidth * 8e-6:.2f} |")
        if not r["report"].links:
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} ({r['nodes']} edge) | (one stage: no link "
                         "crossed) | | | | | | | |")
    return "\n".join(lines) + "\n"


def retried(run: Callable[..., dict], *args: object) -> dict:
    """``run(*args)``, once more if it fails at run time: on a loaded shared host a worker may not start in time."""
    try:
        return run(*args)
    except RunError as err:
        print(f"retrying once: {err}", file=sys.stderr, flush=True)
        return run(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,googlenet",
                        help="comma-separated torchvision models (default resnet18,mobilenet_v2,googlenet)")
    parser.add_argument("--bandwidths", default="5,20,100",
                        help="comma-separated Mbit/s of the device->edge link (default 5,20,100)")
    parser.add_argument("--edge-nodes", default="1,2", help="comma-separated edge node counts (default 1,2)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--requests", type=int, default=5, help="timed requests per build (default 5)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "testbed.md",
                        help="report to write (default benchmarks/results/testbed.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    command = "sudo python " + " ".join(["benchmarks/testbed.py", *sys.argv[1:]])
    rows = []
    with tempfile.TemporaryDirectory(prefix="partc-bench-testbed-") as tmp:
        for model in args.models.split(","):
            for bandwidth in map(float, args.bandwidths.split(",")):
                for nodes in map(int, args.edge_nodes.split(",")):
                    row = retried(run_one, model, bandwidth, nodes, args.size, args.requests, Path(tmp))
                    rep = row["report"]
                    print(json.dumps({"model": model, "bandwidth_mbit": bandwidth, "nodes": nodes,
                                      "predicted_s": rep.predicted_s, "calibrated_s": rep.calibrated_s,
                                      "measured_s": rep.measured_s}), flush=True)
                    rows.append(row)
                    text = markdown(rows, command, args.size, (load_before, os.getloadavg()[0]))
                    args.output.write_text(text)  # after every cell: an interrupted run keeps what it measured
    print(text)


if __name__ == "__main__":
    main()
