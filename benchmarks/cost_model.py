"""Calibrate partc's cost model on this host and report its leave-one-model-out error.

Run from the repository root::

    python benchmarks/cost_model.py              # profile (cached), fit, write results
    python benchmarks/cost_model.py --remeasure  # profile every model again
    python benchmarks/cost_model.py --remeasure --threads 1  # on a busy shared host

Steps:

1. Profile every model of ``MODELS`` with ``partc.profile.profile_model`` at
   ``THREADS`` threads, in round-robin rounds (see ``measure``), and measure this host's
   sgemm GFLOP/s and copy bandwidth at the same thread count. Results are cached in
   ``benchmarks/results/profiles/NAME.json`` (the format ``partc profile`` writes) and
   ``benchmarks/results/host_peak.json``.
2. Fit the calibration on all models and write it to ``targets/calibration.json``, the
   data the ``annotate-profile`` pass ships with.
3. Leave one model out: fit on the others, predict the left-out model's whole-model
   latency (sum of predicted node times), compare with its measured whole-model median.
4. Predict Scission's five models (``SCISSION_MS``, PRIOR_ART.md section 3) on the four
   targets that describe its machines, from their traced graphs, and compare with its
   measured totals: absolute (within 2x?) and the device : edge and edge : cloud-cpu
   ratios (within 25%?).
5. Write ``benchmarks/results/cost_model.md`` (tables) and ``cost_model.json`` (numbers).

With the cached profiles it takes seconds; ``--remeasure`` profiles ten torchvision models
three times and takes about five minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from partc.costmodel import (
    MEMORY_EFFICIENCY_MIN,
    Calibration,
    fit_calibration,
    predict_graph,
    predict_profile_total,
    write_calibration,
)
from partc.ir import META_FLOPS, compute_nodes
from partc.profile import Profile, host_fingerprint, profile_model, read_profile, write_profile
from partc.report import trace_model
from partc.targets import TARGETS, TargetDesc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "targets" / "calibration.json"
MODELS = (
    "resnet18", "resnet50", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "densenet121",
    "squeezenet1_0", "vgg16", "efficientnet_b0", "shufflenet_v2_x1_0",
)
THREADS = 2  # the default; --threads overrides it
ROUNDS = 3  # every model is profiled once per round, so that all see the same load on a shared host
WARMUP = 2  # per round
REPEATS = 5  # per round
SCISSION_MS = {  # PRIOR_ART.md section 3: measured totals (Keras) on Scission's machines
    "vgg16": {"rpi4": 2111, "edge-x86": 388, "cloud-cpu": 113.5, "cloud-gpu": 7.4},
    "resnet50": {"rpi4": 961, "edge-x86": 222, "cloud-cpu": 81.5, "cloud-gpu": 34.5},
    "inception_v3": {"rpi4": 1291, "edge-x86": 327, "cloud-cpu": 110.5, "cloud-gpu": 52.5},
    "mobilenet_v2": {"rpi4": 444, "edge-x86": 109, "cloud-cpu": 54.5, "cloud-gpu": 34.7},
    "densenet121": {"rpi4": 1241, "edge-x86": 275, "cloud-cpu": 122.7, "cloud-gpu": 73.4},
}
SCISSION_SHAPES = {"inception_v3": "1,3,299,299"}  # Keras' own input size; the others take 224x224
RATIOS = {"device:edge": ("rpi4", "edge-x86"), "edge:cloud-cpu": ("edge-x86", "cloud-cpu"),
          "device:cloud-cpu": ("rpi4", "cloud-cpu")}  # the aim covers the first two; the third locates a miss
RATIO_BOUND = 0.25  # predicted tier ratios within 25% of the measured ones
ABSOLUTE_BOUND = 2.0  # predicted totals within 2x of the measured ones


def measure(threads: int) -> tuple[dict, dict]:
    """Profile every model in ``ROUNDS`` round-robin rounds; return name -> Profile and host peaks.

    The load of a shared host drifts over minutes; profiling model after model would give
    each model a different share of the machine. Round-robin rounds spread the drift over
    all models, and this host's sgemm and copy rates are measured once per round as well.
    Per node, the merged median is the median of the rounds' medians.
    """
    graphs = {name: trace_model(f"torchvision:{name}", ["1,3,224,224"]) for name in MODELS}
    rounds: dict[str, list[Profile]] = {name: [] for name in MODELS}
    peaks = []
    for index in range(ROUNDS):
        for name, gm in graphs.items():
            start = time.perf_counter()
            profile = profile_model(gm, model=f"torchvision:{name}", warmup=WARMUP, repeats=REPEATS,
                                    threads=threads)
            rounds[name].append(profile)
            print(f"round {index + 1}/{ROUNDS} {name}: whole {profile.whole_median_s * 1e3:.1f} ms, sum of "
                  f"nodes {profile.sum_node_median_s * 1e3:.1f} ms ({time.perf_counter() - start:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        peaks.append(measure_host(threads))
    host = {key: statistics.median(p[key] for p in peaks) for key in peaks[0]}
    return {name: _merge(runs) for name, runs in rounds.items()}, host


def _merge(runs: list[Profile]) -> Profile:
    """One profile from several rounds: medians of medians, widest p10..p90."""
    first = runs[0]
    nodes = tuple(
        dataclasses.replace(
            node,
            median_s=statistics.median(r.nodes[i].median_s for r in runs),
            p10_s=min(r.nodes[i].p10_s for r in runs),
            p90_s=max(r.nodes[i].p90_s for r in runs),
        )
        for i, node in enumerate(first.nodes)
    )
    return dataclasses.replace(
        first, repeats=sum(r.repeats for r in runs), nodes=nodes,
        whole_median_s=statistics.median(r.whole_median_s for r in runs),
        whole_p10_s=min(r.whole_p10_s for r in runs), whole_p90_s=max(r.whole_p90_s for r in runs),
    )


def measure_host(threads: int) -> dict:
    """This host's sgemm GFLOP/s and copy GB/s at ``threads`` threads (medians of 10 runs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        src = torch.empty(64 * 2**20)
        dst = torch.empty_like(src)
        gemm, copy = [], []
        for _ in range(10):
            start = time.perf_counter()
            torch.mm(a, b)
            gemm.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            dst.copy_(src)
            copy.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(saved)
    return {"peak_gflops": statistics.median(gemm), "memory_bandwidth_gbs": statistics.median(copy),
            "dispatch_us": measure_dispatch(threads)}


def measure_dispatch(threads: int) -> float:
    """Per-node eager dispatch on this host, microseconds: a module call on a one-element tensor (median of 7x2000)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        relu, x = torch.nn.ReLU(), torch.ones(1)
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                relu(x)
            samples.append((time.perf_counter() - start) / 2000 * 1e6)
    finally:
        torch.set_num_threads(saved)
    return statistics.median(samples)


def load_or_measure(remeasure: bool, threads: int) -> tuple[dict, dict]:
    """Profiles and host peaks from ``benchmarks/results`` unless ``remeasure`` (or missing)."""
    host_file = RESULTS / "host_peak.json"
    paths = {name: RESULTS / "profiles" / f"{name}.json" for name in MODELS}
    if remeasure or not host_file.is_file() or not all(p.is_file() for p in paths.values()):
        load_before = round(os.getloadavg()[0], 2)
        profiles, peaks = measure(threads)
        load = {"load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
        for name, profile in profiles.items():
            write_profile(profile, paths[name])
        host_file.write_text(json.dumps({**peaks, **load, "threads": threads}, indent=1) + "\n")
    peaks = json.loads(host_file.read_text())
    if "dispatch_us" not in peaks:  # host_peak.json from before dispatch was measured
        peaks["dispatch_us"] = round(measure_dispatch(threads), 2)
        host_file.write_text(json.dumps(peaks, indent=1) + "\n")
    return {name: read_profile(path) for name, path in paths.items()}, peaks


def reference_target(host: dict, measured: dict) -> TargetDesc:
    """This host as a target description: sgemm rate and copy bandwidth as measured."""
    threads = measured["threads"]
    clock = _clock_ghz()
    return TargetDesc(
        name="calibration-host",
        summary=f"{host['cpu']}, {threads} threads (the host partc's cost model was calibrated on)",
        kind="cpu", cores=threads, clock_ghz=clock,
        peak_gflops=round(measured["peak_gflops"], 1),
        memory_bandwidth_gbs=round(measured["memory_bandwidth_gbs"], 2),
        memory_bytes=0, launch_overhead_us=0.0, triple=f"{host['machine']}-linux-gnu", mcpu="", mattr="",
        source=f"measured by benchmarks/cost_model.py: median of 10 runs of a 1024x1024 sgemm and of a "
        f"256 MB tensor copy at {threads} threads, once per profiling round, median of the rounds; "
        "dispatch: an nn.ReLU call on a one-element tensor; clock from /proc/cpuinfo",
        dispatch_us=round(measured["dispatch_us"], 2),
    )


def _clock_ghz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            return round(float(value) / 1000, 2)
    return 1.0


def leave_one_out(profiles: dict, reference: TargetDesc) -> list[dict]:
    """Fit on all models but one, predict the left-out model's whole-model latency."""
    rows = []
    for name, profile in profiles.items():
        others = [p for other, p in profiles.items() if other != name]
        cal = fit_calibration(others, reference)
        predicted = predict_profile_total(cal, profile)
        measured = profile.whole_median_s
        rows.append({
            "model": name, "nodes": len(profile.nodes), "measured_ms": measured * 1e3,
            "sum_node_median_ms": profile.sum_node_median_s * 1e3, "predicted_ms": predicted * 1e3,
            "error_pct": (predicted - measured) / measured * 100,
            "error_vs_nodes_pct": (predicted - profile.sum_node_median_s) / profile.sum_node_median_s * 100,
        })
    return rows


def target_table(cal: Calibration, profiles: dict) -> list[dict]:
    """Predicted whole-model ms on every target, next to Scission's measurements where they exist."""
    rows = []
    for name, profile in profiles.items():
        row = {"model": name}
        for target_name, desc in sorted(TARGETS.items()):
            row[target_name] = predict_profile_total(cal, profile, desc) * 1e3
            row[f"{target_name}_scission"] = SCISSION_MS.get(name, {}).get(target_name)
        rows.append(row)
    return rows


def scission_table(cal: Calibration) -> list[dict]:
    """Predicted vs Scission's measured totals (ms) and tier ratios, per model, from the traced graphs."""
    rows = []
    for name, measured in SCISSION_MS.items():
        gm = trace_model(f"torchvision:{name}", [SCISSION_SHAPES.get(name, "1,3,224,224")])
        predicted = {t: sum(predict_graph(cal, gm, TARGETS[t]).values()) * 1e3 for t in measured}
        nodes = compute_nodes(gm)
        row = {"model": name, "predicted_ms": predicted, "measured_ms": measured, "nodes": len(nodes),
               "gflop": sum(n.meta[META_FLOPS] for n in nodes) / 1e9}
        for label, (a, b) in RATIOS.items():
            want, got = measured[a] / measured[b], predicted[a] / predicted[b]
            row[label] = {"predicted": got, "measured": want, "error_pct": (got / want - 1) * 100}
        row["worst_factor"] = max(max(p / measured[t], measured[t] / p) for t, p in predicted.items())
        rows.append(row)
    return rows


def _head(*columns: str) -> list[str]:
    """A Markdown table's header: the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def scission_markdown(rows: list[dict]) -> list[str]:
    """The Scission check as Markdown lines."""
    names = list(next(iter(SCISSION_MS.values())))
    ratios_ok = sum(abs(r[k]["error_pct"]) <= RATIO_BOUND * 100
                    for r in rows for k in ("device:edge", "edge:cloud-cpu"))
    within = [(t, max(p / r["measured_ms"][t], r["measured_ms"][t] / p) <= ABSOLUTE_BOUND)
              for r in rows for t, p in r["predicted_ms"].items()]
    cells_ok = sum(ok for _, ok in within)
    cpu_ok = sum(ok for t, ok in within if TARGETS[t].kind == "cpu")
    lines = [
        "",
        "## Against Scission's measured times (PRIOR_ART.md section 3)",
        "",
        "Predicted (partc's cost model, shipped calibration and target descriptions) / measured (Scission, "
        "Keras on TensorFlow 2.1) whole-model ms; inception_v3 at 299x299, the others at 224x224. Targets: "
        "rpi4 = Raspberry Pi 4, edge-x86 = i5-2500, cloud-cpu = i7-6700K, cloud-gpu = the 6700K's GPU "
        "(Scission does not name it; described as a T4). Aim: ratios within 25%, absolute within 2x.",
        "",
        *_head("model", *names, *(f"{k} pred / meas (err)" for k in RATIOS), "worst absolute factor"),
    ]
    for r in rows:
        cells = [f"{r['predicted_ms'][t]:.1f} / {r['measured_ms'][t]}" for t in names]
        ratios = [f"{r[k]['predicted']:.2f} / {r[k]['measured']:.2f} ({r[k]['error_pct']:+.0f}%)"
                  for k in RATIOS]
        lines.append(f"| {r['model']} | " + " | ".join(cells + ratios) + f" | {r['worst_factor']:.2f}x |")
    lines += [
        "",
        f"Ratios within 25%: {ratios_ok} of {2 * len(rows)}; totals within 2x: {cells_ok} of "
        f"{len(rows) * len(names)} (on the CPU targets: {cpu_ok} of {len(rows) * (len(names) - 1)}).",
        "",
        "Where the aim is missed, the measurements are not explained by the machines' rates: the GFLOP/s "
        "Scission's Keras reached (model GFLOP / measured seconds) as a fraction of each target's sustained "
        "sgemm rate (`peak_gflops`):",
        "",
        *_head("model", "GFLOP", *names),
    ]
    for r in rows:
        rates = [r["gflop"] / (r["measured_ms"][t] / 1e3) for t in names]
        cells = [f"{rate:.0f} ({rate / TARGETS[t].peak_gflops:.0%})" for rate, t in zip(rates, names, strict=True)]
        lines.append(f"| {r['model']} | {r['gflop']:.1f} | " + " | ".join(cells) + " |")
    gpu = [(r["measured_ms"]["cloud-gpu"] - r["predicted_ms"]["cloud-gpu"]) / r["nodes"] * 1e3 for r in rows]
    lines += [
        "",
        "- edge : cloud-cpu is predicted low for every model. Rates alone cannot give VGG16's 3.42: it is "
        "above the machines' peak ratio (4 x 4.0 GHz x 32 / 4 x 3.3 GHz x 16 = 512 / 211 = 2.43) and their "
        "bandwidth ratio (34.1 / 21.3 GB/s = 1.6); the i5 ran it at 44% of its sustained sgemm rate, the i7 "
        "at 61%. For the other models Keras reached the same fraction on both (resnet50 21 / 22%), so its "
        "whole time scaled like compute (2.0-3.0x), while partc prices its PyTorch stages' memory-bound "
        "nodes by bandwidth (28 / 16 GB/s = 1.75x) and their per-node overhead by single-thread speed "
        "(1.47x), as the calibration host measures them.",
        "- device : edge is predicted high for the compute-heavy models: the Pi reached about twice the "
        "fraction of its rate that the i5 did (resnet50 43 vs 21%). device : cloud-cpu, which leaves the "
        "edge out, is within "
        f"{max(abs(r['device:cloud-cpu']['error_pct']) for r in rows):.0f}% for every model: the i5's "
        "measurements, not the Pi's or the i7's, sit apart from the machines' rates. Describing `edge-x86` "
        "by what Keras reached would describe TensorFlow 2.1 on it, not the i5-2500; partc predicts its own "
        "PyTorch stages, whose convolutions run at about the sgemm rate on the calibration host (`conv2d` "
        "compute efficiency above).",
        "- cloud-gpu describes a T4 running PyTorch (20 us launch and dispatch per node); Scission does not "
        "name its GPU and measured Keras layer by layer: the difference between its totals and the "
        "prediction is " + ", ".join(f"{r['model']} {g:.0f}" for r, g in zip(rows, gpu, strict=True))
        + " us per node, Keras' per-layer call, not the GPU's work. The GPU column is shown, not aimed at.",
    ]
    return lines


def markdown(rows: list[dict], targets: list[dict], cal: Calibration, meta: dict) -> str:
    """The results as Markdown tables."""
    errors = [abs(r["error_pct"]) for r in rows]
    node_errors = [abs(r["error_vs_nodes_pct"]) for r in rows]
    lines = [
        "# Cost model: leave-one-model-out error on the calibration host",
        "",
        f"Host: {meta['host']['cpu']}, {meta['host']['cores']} cores, torch {meta['host']['torch']}; "
        f"{meta['threads']} threads, {ROUNDS} round-robin rounds of {WARMUP} warm-up + {REPEATS} timed runs "
        "per model; load average "
        f"before/after profiling {meta['load_before']} / {meta['load_after']}.",
        f"Reference peak (measured): {cal.reference.peak_gflops} GFLOP/s sgemm, "
        f"{cal.reference.memory_bandwidth_gbs} GB/s copy, {cal.reference.clock_ghz} GHz.",
        "",
        "Each row: the model's measured whole-model median (the GraphModule called directly), the sum "
        "of its per-node medians (fx.Interpreter), and the cost model's prediction when fitted on the "
        "*other* models only; the error is against the measured whole-model median, and (last column) "
        "against the sum of node medians, the quantity the model is fitted to.",
        "",
        "On a busy shared host (load average above the core count) a whole-model run of 100 ms is "
        "preempted many times, while a node of 50 us rarely is, so per-node medians filter out waiting "
        "that whole-model medians include: models made of many small nodes (MobileNets, EfficientNet, "
        "ShuffleNet) then measure far above their node sums. On a quiet host the two agree within a few "
        "percent (ENVIRONMENT.md section 8: +3-7% for resnet50).",
        "",
        "| model | nodes | measured ms | sum of node medians ms (vs measured) | predicted ms | error % "
        "| error vs node sum % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = (r["sum_node_median_ms"] / r["measured_ms"] - 1) * 100
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['measured_ms']:.1f} | {r['sum_node_median_ms']:.1f} ({gap:+.1f}%) "
            f"| {r['predicted_ms']:.1f} | {r['error_pct']:+.1f} | {r['error_vs_nodes_pct']:+.1f} |"
        )
    lines += [
        "",
        f"Mean absolute error {statistics.mean(errors):.1f}%, median {statistics.median(errors):.1f}%, "
        f"max {max(errors):.1f}% over {len(rows)} models (against the sum of node medians: mean "
        f"{statistics.mean(node_errors):.1f}%, max {max(node_errors):.1f}%).",
        "",
        "## Fitted classes (all models)",
        "",
        "Compute efficiency: fitted on the class's nodes above the reference's ridge point (sgemm rate / "
        "copy bandwidth), relative to the sgemm rate; memory efficiency: on the others, relative to copy "
        "bandwidth; a side without nodes takes the default's. Op efficiency: a memory side slower than "
        f"{MEMORY_EFFICIENCY_MIN} of copy is limited by its instructions, priced by compute (bytes per FLOP "
        "of the target's sgemm rate; empty: none).",
        "",
        "| class | compute efficiency | memory efficiency | op efficiency | overhead us |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v.compute_efficiency:.3f} | {v.memory_efficiency:.3f} | "
        f"{f'{v.op_efficiency:.4f}' if v.op_efficiency else ''} | {v.overhead_us:.1f} |"
        for k, v in sorted(cal.classes.items())
    ]
    names = sorted(TARGETS)
    lines += [
        "",
        "## Predicted whole-model ms per target (Scission's measured ms in brackets)",
        "",
        "Scission's numbers are Keras/TensorFlow on its own machines (PRIOR_ART.md section 3): compare the "
        "ratios between targets, not the absolute values.",
        "",
        *_head("model", *names),
    ]
    for row in targets:
        cells = [
            f"{row[n]:.1f}" + (f" ({row[n + '_scission']})" if row[n + "_scission"] is not None else "")
            for n in names
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += scission_markdown(meta["scission"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remeasure", action="store_true",
                        help="profile every model again (overwrites benchmarks/results/profiles/ and host_peak.json)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    args = parser.parse_args()
    profiles, peaks = load_or_measure(args.remeasure, args.threads)
    host = host_fingerprint()
    reference = reference_target(host, peaks)
    cal = fit_calibration(list(profiles.values()), reference, host)
    write_calibration(cal, CALIBRATION)
    rows = leave_one_out(profiles, reference)
    targets = target_table(cal, profiles)
    meta = {"host": host, "threads": peaks["threads"], "load_before": peaks["load_before"],
            "load_after": peaks["load_after"], "scission": scission_table(cal)}
    (RESULTS / "cost_model.md").write_text(markdown(rows, targets, cal, meta))
    (RESULTS / "cost_model.json").write_text(json.dumps(
        {**meta, "rounds": ROUNDS, "warmup": WARMUP, "repeats": REPEATS, "leave_one_out": rows,
         "targets": targets}, indent=1) + "\n")
    print((RESULTS / "cost_model.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
