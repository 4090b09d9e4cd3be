"""Predicted vs measured latency in the emulated testbed, for several models and bandwidths (root).

For every model and every bandwidth of the first link, the model is compiled for a
device -> edge -> cloud cluster (``CLUSTER``; the plan, so the cut, changes with the
bandwidth), then run in ``partc.runtime.testbed.Testbed``: every stage in its own network
namespace, links shaped with tc tbf + a user-space delay proxy, CPU quotas from the targets.
Requests run one at a time; end-to-end latency is the median. Per link, the table gives the
plan's predicted transfer seconds (forward bytes / bandwidth + latency) and the measured
seconds per transfer (forward bytes + the reply travelling back, + both directions' delay).

Writes ``benchmarks/results/testbed.md`` (``-o``). Needs root (network namespaces, tc,
cgroups) and the onnx and runtime extras. Every model and bandwidth compiles a build and
starts a testbed, about a minute each on 2 cores: some ten minutes with the defaults.

Usage: ``sudo python benchmarks/testbed.py [--models resnet18,mobilenet_v2,googlenet]
[--bandwidths 5,20,100] [--requests 5] [-o benchmarks/results/testbed.md]``.
Timings on a shared machine are noisy.
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
from partc.runtime.testbed import Testbed

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = """\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: edge, target: edge-x86, backend: onnx}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: edge, bandwidth: {bandwidth}Mbit/s, latency: 10ms}}
  - {{from: edge, to: cloud, bandwidth: 100Mbit/s, latency: 20ms}}
"""


def run_one(model: str, bandwidth: float, requests: int, workdir: Path) -> dict:
    """Compile ``model`` for the cluster with ``bandwidth`` Mbit/s on its first link; measure it in the testbed."""
    folder = workdir / f"{model}-{bandwidth:g}"
    folder.mkdir()
    (folder / "cluster.yaml").write_text(CLUSTER.format(bandwidth=bandwidth))
    build = compile_model(f"torchvision:{model}", ["1,3,224,224"], folder / "cluster.yaml", folder / "build")
    with Testbed(build.path) as testbed:
        report = testbed.measure(requests)
    return {"model": model, "bandwidth_mbit": bandwidth, "chain": list(build.manifest.plans[0].stages),
            **report.to_json()}


def markdown(rows: list[dict], command: str, load: tuple[float, float]) -> str:
    """Return the results as the markdown report."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Testbed: predicted vs measured latency",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after (the machine is shared with other engineers' test runs: "
        "absolute times are noisy). Cluster: device (rpi4, torchscript) -> edge (edge-x86, onnx) -> cloud "
        "(cloud-cpu, onnx); device->edge at the bandwidth shown with 10 ms latency, edge->cloud 100 Mbit/s, 20 ms. "
        "Each build is compiled for its bandwidth, then run in the testbed; requests one at a time (after warm-up). "
        "CPU quotas emulate a target's speed in cores of this host (peak GFLOP/s over the cost model's reference "
        "core, 9.8 GFLOP/s) and are capped at this host's cores: rpi4 (20 GFLOP/s) gets 2.0 cores, and edge-x86 "
        "(180) and cloud-cpu (450) cannot be emulated faster than 2 cores, so stages on them run slower than "
        "predicted by construction.",
        "",
        "| model | device->edge Mbit/s | primary plan's stages | predicted e2e ms | measured e2e ms (median) | "
        "min ms | median / predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {', '.join(r['chain'])} | "
                     f"{r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | {r['measured_min_s'] * 1e3:.1f} | "
                     f"{r['measured_s'] / r['predicted_s']:.2f} |")
    lines += ["", "Per stage: predicted compute on the target vs measured on this host under the stage's CPU quota "
              "(cores of this host; smoothed).", "",
              "| model | Mbit/s | stage | cores | predicted ms | measured ms | ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["stages"]:
            ratio = s["measured_s"] / s["predicted_s"] if s["predicted_s"] else float("nan")
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {s['stage']} | {s['share']:.2f} | "
                         f"{s['predicted_s'] * 1e3:.2f} | {s['measured_s'] * 1e3:.2f} | {ratio:.2f} |")
    lines += ["", "Per link, per transfer: predicted = plan's forward bytes / bandwidth + one-way latency; measured = "
              "forward bytes + reply bytes, seconds on the wire less the round trip's latency (as the driver "
              "estimates bandwidth) plus one-way latency, to compare with the prediction; measured Mbit/s = "
              "measured bytes / seconds on the wire without the latency.", "",
              "| model | Mbit/s | link | shaped Mbit/s | predicted KB | measured KB | predicted ms | measured ms | "
              "measured Mbit/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k in r["links"]:
            shaped = f"{k['bandwidth'] * 8e-6:.1f}" if k["bandwidth"] else "unshaped"
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | {k['link']} | {shaped} | "
                         f"{k['predicted_bytes'] / 1e3:.1f} | {k['measured_bytes'] / 1e3:.1f} | "
                         f"{k['predicted_s'] * 1e3:.1f} | {k['measured_s'] * 1e3:.1f} | "
                         f"{k['measured_bandwidth'] * 8e-6:.2f} |")
        if not r["links"]:
            lines.append(f"| {r['model']} | {r['bandwidth_mbit']:g} | (one stage: no link crossed) | | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,googlenet",
                        help="comma-separated torchvision models (default resnet18,mobilenet_v2,googlenet)")
    parser.add_argument("--bandwidths", default="5,20,100",
                        help="comma-separated Mbit/s of the device->edge link (default 5,20,100)")
    parser.add_argument("--requests", type=int, default=5, help="timed requests per build (default 5)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "testbed.md",
                        help="report to write (default benchmarks/results/testbed.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="partc-bench-testbed-") as tmp:
        for model in args.models.split(","):
            for bandwidth in map(float, args.bandwidths.split(",")):
                row = run_one(model, bandwidth, args.requests, Path(tmp))
                print(json.dumps({k: row[k] for k in ("model", "bandwidth_mbit", "predicted_s", "measured_s")}),
                      flush=True)
                rows.append(row)
    command = "sudo python " + " ".join(["benchmarks/testbed.py", *sys.argv[1:]])
    text = markdown(rows, command, (load_before, os.getloadavg()[0]))
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
