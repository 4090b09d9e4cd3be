"""The edge tier on several nodes in the testbed: spatial tiles (vgg16) and branches (googlenet) (root).

For each model and each edge node count N, the model is compiled for a device -> edge
cluster whose edge tier has N nodes joined by a 1 Gbit/s, 0.2 ms link (the device runs the
stem, pinned; the edge the rest). The joint planner chooses what runs in parallel on the
edge nodes: spatial tiles of convolution runs (``tile-conv-stages``, vgg16) or the branches
of fork/join regions (``distribute-branches``, googlenet's inception blocks). The build then
runs in ``partc.runtime.testbed.Testbed``: every worker in its own namespace and with the
same CPU quota (``--share`` cores each, so that several fit on this host), requests one at a
time. Reported per N: the edge stage's steps (local, or parallel over k nodes), its seconds
predicted for the edge target (the manifest), predicted for the emulated nodes (calibrated:
every step program timed under its node's quota, parallel steps priced by
``partc.partition.price.tiled_step_seconds`` over the shaped edge link) and measured (median
of the stage's compute per request, its calls to the other nodes included), the speed-up of
each over N = 1, and end-to-end latency predicted, calibrated and measured.

Writes ``benchmarks/results/tiling.md`` (``-o``). Needs root (network namespaces, tc,
cgroups) and the onnx and runtime extras. Every model and node count compiles a build and
starts a testbed: about ten minutes on 2 cores with the defaults (112x112 inputs).

Usage: ``sudo python benchmarks/tiling.py [--runs googlenet:1,2,3 --runs vgg16:1,2,4]
[--size 112] [--share 0.45] [--requests 5] [-o benchmarks/results/tiling.md]``.
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

from testbed import retried  # benchmarks/testbed.py, beside this script

from partc.build import compile_model
from partc.manifest import Manifest
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
SIZES = {"vgg16": 224}  # its classifier needs a 7x7 feature map: ONNX cannot export its pooling from a smaller one
RUNS = ("googlenet:1,2,3", "vgg16:1,2,4")


def run_one(model: str, nodes: int, size: int, share: float, requests: int, workdir: Path) -> dict:
    """Compile ``model`` for an edge tier of ``nodes`` nodes and measure it in the testbed."""
    folder = workdir / f"{model}-{nodes}"
    folder.mkdir(exist_ok=True)  # a retry rewrites the build
    edge_link = "\n  - {from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}" if nodes > 1 else ""
    (folder / "cluster.yaml").write_text(CLUSTER.format(nodes=nodes, stem=STEMS[model], edge_link=edge_link))
    size = SIZES.get(model, size)
    build = compile_model(f"torchvision:{model}", [f"1,3,{size},{size}"], folder / "cluster.yaml", folder / "build")
    shares = {s.name: share for s in build.manifest.stages}
    with Testbed(build.path, cpu_shares=shares) as testbed:
        report = testbed.measure(requests)
    edge = next(s for s in report.stages if s.stage == "edge.0")
    return {"model": model, "nodes": nodes, "summary": _steps(build.manifest), "edge": edge, "report": report}


def _steps(manifest: Manifest) -> str:
    """The primary plan's edge stage: its steps, local or parallel over several nodes."""
    pid = manifest.plans[0].programs.get("edge.0")
    program = manifest.stage("edge.0").program(pid) if pid else None
    steps = [len(ids) for ids in getattr(program, "steps", ())]
    return " / ".join(f"{n} nodes" if n > 1 else "local" for n in steps) or ("one program" if pid else "(none)")


def markdown(rows: list[dict], command: str, size: int, share: float, load: tuple[float, float]) -> str:
    """Return the results as the markdown report."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# The edge tier on several nodes in the testbed: branches (googlenet) and tiles (vgg16)",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores, 1x3x{size}x{size} inputs "
        f"(vgg16: 224x224), load average {load[0]:.1f} before and {load[1]:.1f} after (shared machine; each row "
        "gives the load after it). Every "
        f"worker gets {share} cores of this host (the edge-x86 target is not emulated: it would need more cores "
        "than this host has); the edge tier's nodes are joined by 1 Gbit/s, 0.2 ms. *Target*: the manifest's "
        "prediction for the edge-x86 target. *Calibrated*: every program of the plan timed under its node's quota "
        "(warm, median of 9), parallel steps priced by `tiled_step_seconds` over the shaped edge link. "
        "*Measured*: the edge stage's compute per request as its worker reports it (median), its calls to the "
        "other nodes included. Speed-ups are over the same model on one edge node.",
        "",
        "| model | edge nodes | edge stage steps | target ms | calibrated ms | measured ms | measured / calibrated | "
        "target speed-up | calibrated speed-up | measured speed-up | e2e target ms | e2e calibrated ms | "
        "e2e measured ms | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r["edge"] for r in rows if r["nodes"] == 1}
    for r in rows:
        e, b, rep = r["edge"], base.get(r["model"], r["edge"]), r["report"]
        figures = [e.predicted_s * 1e3, e.calibrated_s * 1e3, e.measured_s * 1e3, e.measured_s / e.calibrated_s,
                   b.predicted_s / e.predicted_s, b.calibrated_s / e.calibrated_s, b.measured_s / e.measured_s,
                   rep.predicted_s * 1e3, rep.calibrated_s * 1e3, rep.measured_s * 1e3, rep.load_average]
        lines.append(f"| {r['model']} | {r['nodes']} | {r['summary']} | " + " | ".join(
            f"{x:.2f}" if i in (3, 4, 5, 6) else f"{x:.1f}" for i, x in enumerate(figures)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", action="append", metavar="MODEL:N,N,...",
                        help=f"a model, of {', '.join(STEMS)}, and its edge node counts; repeatable "
                        f"(default {' '.join(RUNS)})")
    parser.add_argument("--size", type=int, default=112,
                        help="input height and width (default 112; vgg16 always 224)")
    parser.add_argument("--share", type=float, default=0.45, help="cores of this host per worker (default 0.45)")
    parser.add_argument("--requests", type=int, default=5, help="timed requests per build (default 5)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "tiling.md",
                        help="report to write (default benchmarks/results/tiling.md)")
    args = parser.parse_args()
    runs = [(model, [int(n) for n in counts.split(",")])
            for model, _, counts in (run.partition(":") for run in args.runs or RUNS)]
    unknown = [model for model, _ in runs if model not in STEMS]
    if unknown:
        parser.error(f"--runs {unknown[0]}: no stem known for it; models are {', '.join(STEMS)}")
    load_before = os.getloadavg()[0]
    command = "sudo python " + " ".join(["benchmarks/tiling.py", *sys.argv[1:]])
    rows = []
    with tempfile.TemporaryDirectory(prefix="partc-bench-tiling-") as tmp:
        for model, counts in runs:
            for nodes in counts:
                row = retried(run_one, model, nodes, args.size, args.share, args.requests, Path(tmp))
                e = row["edge"]
                print(json.dumps({"model": model, "nodes": nodes, "steps": row["summary"], "edge_target_s":
                                  e.predicted_s, "edge_calibrated_s": e.calibrated_s, "edge_measured_s": e.measured_s}),
                      flush=True)
                rows.append(row)
                text = markdown(rows, command, args.size, args.share, (load_before, os.getloadavg()[0]))
                args.output.write_text(text)  # after every cell: a long run interrupted keeps what it measured
    print(text)


if __name__ == "__main__":
    main()
