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
2. Time every codec stage (``partc.codec``: the QUANT stages ``none``, ``fp16``, ``int8``,
   ``int8c``; the PACK stages ``zstd-1`` .. ``zstd-22``, ``lz4``) single-threaded on a
   realistic activation (``measure_codec_stages``), cached in
   ``benchmarks/results/codec_rates.json``.
   Fit the calibration on all models and write it, with the codec stages' speeds, to
   ``targets/calibration.json``, the data the ``annotate-profile`` and
   ``compress-cut-tensors`` passes ship with.
3. Leave one model out: fit on the others, predict the left-out model's whole-model
   latency (sum of predicted node times), compare with its measured whole-model median.
4. Predict Scission's five models (``SCISSION_MS``, PRIOR_ART.md section 3) on the four
   targets that describe its machines, from their traced graphs, and compare with its
   measured totals: absolute (within 2x?) and the device : edge and edge : cloud-cpu
   ratios (within 25%?); once from the shipped descriptions, once in Scission's workflow,
   each machine fitted to its times of the other four models
   (``partc.costmodel.fit_target_to_totals``).
5. Write ``benchmarks/results/cost_model.md`` (tables) and ``cost_model.json`` (numbers).

With the cached profiles it takes seconds; ``--remeasure`` profiles ten torchvision models
three times and takes about five minutes on 2 cores, and times the codec stages again in about
five more (zstd's levels 13-22 compress at 1-2 MB/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision

from partc.codec import decode, encode, pack, parse_codec, unpack
from partc.costmodel import (
    MEMORY_EFFICIENCY_MIN,
    Calibration,
    CodecRate,
    fit_calibration,
    fit_target_to_totals,
    predict_graph,
    predict_profile_total,
    write_calibration,
)
from partc.ir import META_FLOPS, compute_nodes
from partc.profile import Profile, host_fingerprint, profile_model, read_profile, time_call, write_profile
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
QUANTS = ("none", "fp16", "int8", "int8c")  # partc.codec's QUANT stages
PACKS = (*(f"zstd-{level}" for level in range(1, 23)), "lz4")  # and its PACK stages
CODEC_REPEATS = 7  # timed calls per codec stage and payload, after one warm-up call ...
CODEC_BUDGET_S = 1.0  # ... but only three when the warm-up took a third of this (zstd's top levels: seconds a call)
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


def activation() -> np.ndarray:
    """What codecs are timed on: resnet18's stem ReLU output (1x64x112x112 float32, 3.2 MB) with seeded
    random weights on a seeded random image; about half of it is zero, as after a ReLU of a trained model."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.relu(model.bn1(model.conv1(image))).numpy()


def measure_codec_stages() -> dict:
    """Single-threaded encode and decode speed of every codec stage on ``activation()``.

    A QUANT stage (``partc.codec.encode`` / ``decode`` with that quant alone) in raw float32 bytes
    per second; a PACK stage (``partc.codec.pack`` / ``unpack``) in its input bytes per second, on
    each QUANT stage's payload (``pack_by_quant``, with the ratio) and, for the calibration
    (``stages``), their harmonic mean: every QUANT stage's payload weighs the same. Speeds are
    rounded to three significant digits.
    """
    x = activation()
    stages, by_quant, payloads = {}, {}, {}
    for quant in QUANTS:
        codec = parse_codec(quant)
        payloads[quant] = encode(x, codec)
        stages[quant] = _stage_rate(x.nbytes, partial(encode, x, codec),
                                    partial(decode, payloads[quant], codec, x.shape, x.dtype))
    for name in PACKS:
        codec = parse_codec(f"none+{name}")
        by_quant[name] = {}
        for quant, payload in payloads.items():
            packed = pack(payload, codec)
            unpacking = partial(unpack, packed, codec, len(payload))
            rate = _stage_rate(len(payload), partial(pack, payload, codec), unpacking)
            by_quant[name][quant] = {**rate, "ratio": round(len(payload) / len(packed), 3)}
            print(f"codec stage {name} on {quant}: encode {rate['encode_bytes_per_s'] / 1e6:.1f} MB/s, decode "
                  f"{rate['decode_bytes_per_s'] / 1e6:.1f} MB/s", file=sys.stderr)
        stages[name] = {key: _3g(len(QUANTS) / sum(1 / r[key] for r in by_quant[name].values()))
                        for key in ("encode_bytes_per_s", "decode_bytes_per_s")}
    return {"tensor": "resnet18 stem ReLU output, seeded (benchmarks/cost_model.py activation)", "bytes": x.nbytes,
            "zeros": round(float((x == 0).mean()), 4), "repeats": CODEC_REPEATS, "budget_s": CODEC_BUDGET_S,
            "stages": stages, "pack_by_quant": by_quant}


def _stage_rate(nbytes: int, encoding: Callable[[], object], decoding: Callable[[], object]) -> dict:
    return {"encode_bytes_per_s": _3g(nbytes / _median_s(encoding)),
            "decode_bytes_per_s": _3g(nbytes / _median_s(decoding))}


def _median_s(call: Callable[[], object]) -> float:
    """Median seconds of ``call`` (``partc.profile.time_call``) over ``CODEC_REPEATS`` timed calls after a
    warm-up one, or three when the warm-up took a third of ``CODEC_BUDGET_S``."""
    start = time.perf_counter()
    call()  # the warm-up, timed to size the rest
    slow = 3 * (time.perf_counter() - start) >= CODEC_BUDGET_S
    return time_call(call, 0, 3 if slow else CODEC_REPEATS)[0]


def _3g(value: float) -> float:
    return float(f"{value:.3g}")


def load_or_measure_codecs(remeasure: bool) -> dict[str, CodecRate]:
    """Codec stage speeds from ``benchmarks/results/codec_rates.json`` unless ``remeasure`` (or missing)."""
    path = RESULTS / "codec_rates.json"
    if remeasure or not path.is_file():
        load_before = round(os.getloadavg()[0], 2)
        measured = measure_codec_stages()
        load = {"load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
        path.write_text(json.dumps({**measured, **load}, indent=1) + "\n")
    return {stage: CodecRate(**rate) for stage, rate in json.loads(path.read_text())["stages"].items()}


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


def scission_graphs() -> dict:
    """Scission's five models traced at its input sizes, by name."""
    return {name: trace_model(f"torchvision:{name}", [SCISSION_SHAPES.get(name, "1,3,224,224")])
            for name in SCISSION_MS}


def scission_table(cal: Calibration, graphs: dict) -> list[dict]:
    """Predicted vs Scission's measured totals (ms) and tier ratios, per model, from the traced graphs.

    Two predictions per model: ``described`` from the shipped target descriptions, and ``fitted`` from
    each target fitted (``fit_target_to_totals``) to Scission's times of the *other* four models on that
    machine (its workflow: benchmark once on each resource, then plan; the model predicted is never fitted on).
    """
    rows = []
    for name, measured in SCISSION_MS.items():
        gm = graphs[name]
        fitted = {t: fit_target_to_totals(cal, {o: (graphs[o], SCISSION_MS[o][t] / 1e3) for o in SCISSION_MS
                                                 if o != name}, TARGETS[t]) for t in measured}
        nodes = compute_nodes(gm)
        rows.append({
            "model": name, "measured_ms": measured, "nodes": len(nodes),
            "gflop": sum(n.meta[META_FLOPS] for n in nodes) / 1e9,
            "described": _against(measured, {t: _total_ms(cal, gm, TARGETS[t]) for t in measured}),
            "fitted": _against(measured, {t: _total_ms(cal, gm, desc) for t, desc in fitted.items()}),
        })
    return rows


def scission_fitted_targets(cal: Calibration, graphs: dict) -> dict[str, TargetDesc]:
    """Each of Scission's machines fitted to all five models' measured times (the rates the workflow finds)."""
    names = next(iter(SCISSION_MS.values()))
    return {t: fit_target_to_totals(cal, {m: (graphs[m], SCISSION_MS[m][t] / 1e3) for m in SCISSION_MS}, TARGETS[t])
            for t in names}


def _total_ms(cal: Calibration, gm, desc: TargetDesc) -> float:
    return sum(predict_graph(cal, gm, desc).values()) * 1e3


def _against(measured: dict, predicted: dict) -> dict:
    """Predicted totals next to measured ones: the tier ratios' errors and the worst absolute factor."""
    row = {"predicted_ms": predicted}
    for label, (a, b) in RATIOS.items():
        want, got = measured[a] / measured[b], predicted[a] / predicted[b]
        row[label] = {"predicted": got, "measured": want, "error_pct": (got / want - 1) * 100}
    row["worst_factor"] = max(max(p / measured[t], measured[t] / p) for t, p in predicted.items())
    row["worst_cpu_factor"] = max(max(p / measured[t], measured[t] / p) for t, p in predicted.items()
                                  if TARGETS[t].kind == "cpu")
    return row


def _head(*columns: str) -> list[str]:
    """A Markdown table's header: the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def _scission_check(rows: list[dict], key: str) -> list[str]:
    """One prediction kind (``described`` or ``fitted``) against Scission's times, as a table and a tally."""
    names = list(next(iter(SCISSION_MS.values())))
    lines = _head("model", *names, *(f"{k} pred / meas (err)" for k in RATIOS), "worst factor, all / CPU")
    for r in rows:
        x = r[key]
        cells = [f"{x['predicted_ms'][t]:.1f} / {r['measured_ms'][t]}" for t in names]
        ratios = [f"{x[k]['predicted']:.2f} / {x[k]['measured']:.2f} ({x[k]['error_pct']:+.0f}%)" for k in RATIOS]
        lines.append(f"| {r['model']} | " + " | ".join(cells + ratios)
                     + f" | {x['worst_factor']:.2f}x / {x['worst_cpu_factor']:.2f}x |")
    errors = [abs(r[key][k]["error_pct"]) for r in rows for k in ("device:edge", "edge:cloud-cpu")]
    factors = [(t, max(p / r["measured_ms"][t], r["measured_ms"][t] / p))
               for r in rows for t, p in r[key]["predicted_ms"].items()]
    cpu = [f for t, f in factors if TARGETS[t].kind == "cpu"]
    return lines + [
        "",
        f"Ratios within 25%: {sum(e <= RATIO_BOUND * 100 for e in errors)} of {len(errors)} (worst "
        f"{max(errors):.0f}%); totals "
        f"within 2x: {sum(f <= ABSOLUTE_BOUND for _, f in factors)} of {len(factors)} (on the CPU targets: "
        f"{sum(f <= ABSOLUTE_BOUND for f in cpu)} of {len(cpu)}, worst {max(cpu):.2f}x).",
    ]


def scission_markdown(rows: list[dict], fitted: dict[str, TargetDesc]) -> list[str]:
    """The Scission check as Markdown lines; ``fitted``: each machine fitted to all five models."""
    names = list(next(iter(SCISSION_MS.values())))
    lines = [
        "",
        "## Against Scission's measured times (PRIOR_ART.md section 3)",
        "",
        "Scission's measured whole-model ms (Keras on TensorFlow 2.1) on its four machines; inception_v3 at "
        "299x299, the others at 224x224. Targets: rpi4 = Raspberry Pi 4, edge-x86 = i5-2500, cloud-cpu = "
        "i7-6700K, cloud-gpu = the 6700K's GPU (Scission does not name it; described as a T4). Aim: the "
        "device : edge and edge : cloud-cpu ratios within 25%, totals within 2x.",
        "",
        "### Scission's workflow: each machine fitted to the other four models' times",
        "",
        "Scission benchmarks each resource once and plans from what it measured. Here each machine's three "
        "rates (peak GFLOP/s, bandwidth, per-node dispatch; GPU: launch) are fitted "
        "(`partc.costmodel.fit_target_to_totals`, the target description as prior) to Scission's times of "
        "the four *other* models on it, then predict the fifth: the model in each row is never fitted on.",
        "",
        *_scission_check(rows, "fitted"),
        "",
        "Fitted to all five models (what a user fitting these machines gets), against the descriptions:",
        "",
        *_head("target", "peak GFLOP/s", "bandwidth GB/s", "dispatch us", "launch us"),
    ]
    for t in names:
        d, f = TARGETS[t], fitted[t]
        lines.append(f"| {t} | {f.peak_gflops:.0f} ({d.peak_gflops:.0f}) | {f.memory_bandwidth_gbs:.1f} "
                     f"({d.memory_bandwidth_gbs:.1f}) | {f.dispatch_us:.1f} ({d.dispatch_us:.1f}) | "
                     f"{f.launch_overhead_us:.0f} ({d.launch_overhead_us:.0f}) |")
    lines += [
        "",
        "The fitted machines are slower than their sgemm and STREAM figures: they describe what Keras reached "
        f"on them (the i5 at {fitted['edge-x86'].peak_gflops / TARGETS['edge-x86'].peak_gflops:.0%} of its "
        f"described rate, the Pi's per-layer call {fitted['rpi4'].dispatch_us / TARGETS['rpi4'].dispatch_us:.1f}x "
        "its described dispatch), which is what a plan for that software needs.",
        "",
        "### The shipped target descriptions (datasheet rates, no measurement on the machine)",
        "",
        *_scission_check(rows, "described"),
        "",
        "The descriptions miss the aim for the compute-heavy models: the GFLOP/s Scission's Keras reached "
        "(model GFLOP / measured seconds) as a fraction of each target's sustained sgemm rate (`peak_gflops`):",
        "",
        *_head("model", "GFLOP", *names),
    ]
    for r in rows:
        rates = [r["gflop"] / (r["measured_ms"][t] / 1e3) for t in names]
        cells = [f"{rate:.0f} ({rate / TARGETS[t].peak_gflops:.0%})" for rate, t in zip(rates, names, strict=True)]
        lines.append(f"| {r['model']} | {r['gflop']:.1f} | " + " | ".join(cells) + " |")
    gpu = [(r["measured_ms"]["cloud-gpu"] - r["described"]["predicted_ms"]["cloud-gpu"]) / r["nodes"] * 1e3
           for r in rows]
    lines += [
        "",
        "- The i5 ran VGG16 at 44% of its sustained sgemm rate, the i7 at 61%, the Pi at 73%; VGG16's measured "
        "edge : cloud ratio (3.42) is above the machines' peak ratio (512 / 211 GFLOP/s = 2.43) and bandwidth "
        "ratio (1.6). From datasheets partc predicts its own PyTorch stages, whose convolutions run at about "
        "the sgemm rate on the calibration host; the i5's Keras times sit apart from its rates, so ratios "
        "through the edge miss while device : cloud-cpu, which leaves it out, is within "
        f"{max(abs(r['described']['device:cloud-cpu']['error_pct']) for r in rows):.0f}% for every model.",
        "- cloud-gpu describes a T4 running PyTorch (20 us launch and dispatch per node); Scission measured "
        "Keras layer by layer: the difference between its totals and the description's prediction is "
        + ", ".join(f"{r['model']} {g:.0f}" for r, g in zip(rows, gpu, strict=True))
        + " us per node, Keras' per-layer call, not the GPU's work; the fitted GPU's launch takes it up.",
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
    lines += scission_markdown(meta["scission"], {t: TargetDesc(**d) for t, d in meta["scission_fitted"].items()})
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remeasure", action="store_true",
                        help="profile every model and time the codec stages again (overwrites benchmarks/results/"
                        "profiles/, host_peak.json and codec_rates.json)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    args = parser.parse_args()
    profiles, peaks = load_or_measure(args.remeasure, args.threads)
    host = host_fingerprint()
    reference = reference_target(host, peaks)
    cal = fit_calibration(list(profiles.values()), reference, host)
    cal = dataclasses.replace(cal, codecs=load_or_measure_codecs(args.remeasure))
    write_calibration(cal, CALIBRATION)
    rows = leave_one_out(profiles, reference)
    graphs = scission_graphs()
    targets = target_table(cal, profiles)
    meta = {"host": host, "threads": peaks["threads"], "load_before": peaks["load_before"],
            "load_after": peaks["load_after"], "scission": scission_table(cal, graphs),
            "scission_fitted": {t: dataclasses.asdict(d) for t, d in scission_fitted_targets(cal, graphs).items()}}
    (RESULTS / "cost_model.md").write_text(markdown(rows, targets, cal, meta))
    (RESULTS / "cost_model.json").write_text(json.dumps(
        {**meta, "rounds": ROUNDS, "warmup": WARMUP, "repeats": REPEATS, "leave_one_out": rows,
         "targets": targets}, indent=1) + "\n")
    print((RESULTS / "cost_model.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
