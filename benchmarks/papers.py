"""The seed papers' experiments, side by side with partc's plan for the same setting (partc's cost model).

For every concrete figure ``/work/shared/PRIOR_ART.md`` gives, this sets up the paper's
setting as a partc cluster, plans it (``partc.planning.plan_model``: the pipeline and prices
of ``partc compile``, every baseline priced by partc's own rules,
``partc.partition.baselines`` and ``partc.compilation``), and writes one row: the setting,
the paper's figure, partc's figure for the same setting, and their ratio.

- **Scission** (its four machines, five models): per-model whole-model ms per tier,
  measured by Scission, vs partc's cost model in Scission's workflow (each machine fitted to
  its times of the other four models, ``partc.costmodel.fit_target_to_totals``); and the
  device : edge and edge : cloud-cpu ratios so fitted and from the target descriptions that
  describe those machines (``benchmarks/cost_model.py``'s table).
- **DADS** (edge = Raspberry Pi class, cloud = CPU server; uplinks CAT1 0.13, 3G 1.1, 4G
  5.85, WiFi 18.88 Mbit/s; AlexNet, ResNet18, VGG16): light load (latency) and heavy load
  (throughput: the slowest pipeline stage) speed-ups over edge-only and cloud-only, and over
  Neurosurgeon's topological-order cut on the DAG model.
- **D3** (device -> N edge nodes -> cloud, N = 2 and 4): partc's latency over the best
  two-tier partitioner (Neurosurgeon, DADS) and over every baseline; the edge -> cloud
  (backbone) bytes of the best two-tier plan over partc's.
- **DeepThings** (2-6 edge devices, a CNN's convolutional part: VGG16's ``features``): the
  speed-up of the edge tier's nodes over one node, partc's plan and the DeepThings-like
  baseline (fused tiles over every node) priced in the same run.

Neurosurgeon's and JALAD's figures name no setting partc could rebuild (PRIOR_ART.md), so
they are not rows. Writes ``benchmarks/results/papers.md`` (``-o``). On 2 cores the full run
plans about 40 clusters (some 20-40 minutes on a loaded host); ``--quick`` plans a few
(one model per paper, fewer bandwidths and node counts), a few minutes.

Usage: ``python benchmarks/papers.py [--quick] [-o benchmarks/results/papers.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torchvision
from cost_model import SCISSION_MS, scission_graphs, scission_table  # benchmarks/cost_model.py, beside this script

from partc.costmodel import load_calibration
from partc.planning import PlanReport, plan_model

HERE = Path(__file__).resolve().parent

DADS_UPLINKS = (0.13, 1.1, 5.85, 18.88)  # Mbit/s: CAT1, 3G, 4G, WiFi (DADS Table I)
DADS = """\
tiers:
  - {{name: edge, target: rpi4, backend: onnx}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: edge, to: cloud, bandwidth: {uplink}Mbit/s, latency: 10ms}}
objective: {objective}
"""
D3 = """\
tiers:
  - {{name: device, target: rpi4, backend: onnx}}
  - {{name: edge, target: edge-x86, backend: onnx, nodes: {nodes}}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: edge, bandwidth: 18.88Mbit/s, latency: 10ms}}
  - {{from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}}
  - {{from: edge, to: cloud, bandwidth: 50Mbit/s, latency: 20ms}}
"""
DEEPTHINGS = """\
tiers:
  - {{name: edge, target: rpi4, backend: onnx, nodes: {nodes}}}
{links}"""
DEEPTHINGS_LINKS = "links:\n  - {from: edge, to: edge, bandwidth: 100Mbit/s, latency: 1ms}\n"  # with 2 nodes or more
TWO_TIER = ("neurosurgeon", "dads")  # the prior partitioners that cut between two tiers
SHAPES = {"inception_v3": "1,3,299,299"}


def vgg16_features():
    """VGG16's convolutional part, the kind of model DeepThings partitions (its YOLOv2 is not in torchvision)."""
    return torchvision.models.vgg16(weights=None).features


class Planner:
    """Plans a model on a cluster text in a scratch folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self, model: str, cluster: str) -> PlanReport:
        self.count += 1
        path = self.folder / f"cluster-{self.count}.yaml"
        path.write_text(cluster)
        spec = f"{HERE / 'papers.py'}:vgg16_features" if model == "vgg16_features" else f"torchvision:{model}"
        print(f"planning {model} ({self.count})", file=sys.stderr, flush=True)
        return plan_model(spec, [SHAPES.get(model, "1,3,224,224")], path, compare=True)


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def scission(_: Planner, quick: bool) -> list[tuple]:
    """Scission's measured per-model totals vs partc's cost model, per target and as tier ratios: in
    Scission's workflow (each machine fitted to the other four models' times) and from the descriptions."""
    rows = []
    for r in scission_table(load_calibration(), scission_graphs()):
        if quick and r["model"] != "resnet50":
            continue
        fitted, described = r["fitted"], r["described"]
        for t, measured in SCISSION_MS[r["model"]].items():
            rows.append(("Scission", f"{r['model']} on {t}, whole model (fitted)", f"{measured:g} ms",
                         f"{fitted['predicted_ms'][t]:.1f} ms", fitted["predicted_ms"][t] / measured))
        for label in ("device:edge", "edge:cloud-cpu"):
            for kind, x in (("fitted", fitted), ("described", described)):
                rows.append(("Scission", f"{r['model']}, {label} time ratio ({kind})", f"{x[label]['measured']:.2f}",
                             f"{x[label]['predicted']:.2f}", x[label]["predicted"] / x[label]["measured"]))
    return rows


def dads(plan: Planner, quick: bool) -> list[tuple]:
    """DADS light (latency) and heavy (throughput) load speed-ups over edge-only, cloud-only, Neurosurgeon."""
    models = ("resnet18",) if quick else ("alexnet", "resnet18", "vgg16")
    uplinks = (1.1, 18.88) if quick else DADS_UPLINKS
    figure = {"latency": ("latency", {"edge-only": "1.91-6.45x", "cloud-only": "1.35-8.08x"}),
              "throughput": ("bottleneck", {"edge-only": "4.34-9.14x", "cloud-only": "1.46-14.10x"})}
    rows = []
    for objective, (attr, paper) in figure.items():
        speedups: dict[str, list[float]] = {"edge-only": [], "cloud-only": [], "neurosurgeon": []}
        for model in models:
            for uplink in uplinks:
                report = plan(model, DADS.format(uplink=uplink, objective=objective))
                ours = getattr(report.cost, attr)
                for name, values in speedups.items():
                    base = report.baselines.get(name)
                    if base is not None:
                        values.append(getattr(base, attr) / ours)
        load = "light load (latency)" if objective == "latency" else "heavy load (throughput)"
        for name, text in paper.items():
            rows.append(("DADS", f"{load}, speed-up over {name}; {', '.join(models)} x uplinks "
                         f"{', '.join(map(str, uplinks))} Mbit/s, rpi4 -> cloud-cpu", text, _span(speedups[name]),
                         max(speedups[name]) / float(text.split("-")[1].rstrip("x"))))
        if objective == "latency":
            rows.append(("DADS", "DAG models vs Neurosurgeon on a topological order, latency; same grid",
                         "1.66-1.86x", _span(speedups["neurosurgeon"]), max(speedups["neurosurgeon"]) / 1.86))
    return rows


def d3(plan: Planner, quick: bool) -> list[tuple]:
    """D3: three tiers with N edge nodes; speed-up over the best two-tier partitioner, backbone bytes."""
    models = ("googlenet",) if quick else ("vgg16", "resnet50", "googlenet", "inception_v3", "mobilenet_v2")
    rows = []
    for nodes in (2,) if quick else (2, 4):
        speedup, best, backbone = [], [], []
        for model in models:
            report = plan(model, D3.format(nodes=nodes))
            two_tier = {n: report.baselines[n] for n in TWO_TIER if report.baselines.get(n) is not None}
            name = min(two_tier, key=lambda n: two_tier[n].latency)
            speedup.append(two_tier[name].latency / report.cost.latency)
            best.append(min(c.latency for c in report.baselines.values() if c is not None) / report.cost.latency)
            edge_cloud = report.links.index("edge->cloud")
            backbone.append(f"{model} {two_tier[name].link_bytes[edge_cloud] / 1e3:.0f} / "
                            f"{report.cost.link_bytes[edge_cloud] / 1e3:.0f} KB")
        setting = f"rpi4 -> {nodes} x edge-x86 -> cloud-cpu (18.88 / 50 Mbit/s); {', '.join(models)}"
        rows += [("D3", f"latency vs the best two-tier partitioner; {setting}", "up to 3.4x", _span(speedup),
                  max(speedup) / 3.4),
                 ("D3", f"latency vs the best of every baseline (D3-like and DeepThings-like included); {setting}",
                  "-", _span(best), None),
                 ("D3", f"backbone (edge->cloud) bytes, best two-tier plan / partc's; {setting}", "up to 3.68x less",
                  "; ".join(backbone), None)]
    return rows


def deepthings(plan: Planner, quick: bool) -> list[tuple]:
    """DeepThings: the conv part of a CNN on 2-6 edge devices, speed-up over one device."""
    counts = (2, 4) if quick else (2, 3, 4, 5, 6)
    one = plan("vgg16_features", DEEPTHINGS.format(nodes=1, links="")).cost.latency
    ours, baseline = [], []
    for nodes in counts:
        report = plan("vgg16_features", DEEPTHINGS.format(nodes=nodes, links=DEEPTHINGS_LINKS))
        ours.append(one / report.cost.latency)
        if report.baselines.get("deepthings") is not None:
            baseline.append(one / report.baselines["deepthings"].latency)
    setting = f"VGG16 features, 224x224, {', '.join(map(str, counts))} x rpi4 at 100 Mbit/s"
    return [("DeepThings", f"speed-up over one device, partc's plan; {setting}", "1.7-3.5x", _span(ours),
             max(ours) / 3.5),
            ("DeepThings", f"speed-up over one device, DeepThings-like baseline priced by partc; {setting}",
             "1.7-3.5x", _span(baseline), max(baseline) / 3.5)]


EXPERIMENTS: tuple[Callable[[Planner, bool], list[tuple]], ...] = (scission, dads, d3, deepthings)


def markdown(rows: list[tuple], command: str, load: tuple[float, float]) -> str:
    """Return the side-by-side table as markdown."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# The seed papers' experiments, side by side with partc (partc's cost model)",
        "",
        f"`{command}`, {when}, {platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} before "
        f"and {load[1]:.1f} after (predictions: the load changes only how long planning takes). Paper figures "
        "from PRIOR_ART.md; partc's figure is its plan's prediction for the same setting on partc's cost model and "
        "target descriptions (Scission's rows marked fitted: its machines fitted to their times of the other "
        "four models, its own workflow), with every baseline priced by partc's own rules in the same run. "
        "Ratio: partc / "
        "paper (for a range, partc's best over the paper's best). The papers measured their own hardware, "
        "frameworks and models (DADS: Caffe on a Pi 3B; DeepThings: YOLOv2 on Pi 3s; D3: unpublished setting); "
        "partc predicts rpi4 / edge-x86 / cloud-cpu targets, so the ratios say how far partc's plans reach, not "
        "a reproduction.",
        "",
        "| paper | setting | paper's figure | partc | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {p} | {s} | {f} | {o} | {'-' if r is None else f'{r:.2f}'} |" for p, s, f, o, r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one model per paper, fewer bandwidths and nodes")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "results" / "papers.md",
                        help="report to write (default benchmarks/results/papers.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="partc-bench-papers-") as tmp:
        plan = Planner(Path(tmp))
        for experiment in EXPERIMENTS:
            rows += experiment(plan, args.quick)
    command = "python " + " ".join(["benchmarks/papers.py", *sys.argv[1:]])
    text = markdown(rows, command, (load_before, os.getloadavg()[0]))
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
