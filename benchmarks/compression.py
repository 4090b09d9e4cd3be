"""Feature-map compression at cut points: codec ratios and speeds, and the plans they buy.

For torchvision resnet50 and mobilenet_v2 (``weights=None``, seeded, 1x3x224x224) on
``--inputs`` seeded random images:

1. codecs on the tensor a cut would send at four depths: size ratio (raw / wire bytes, by
   ``partc.compression.measure_codecs``) and encode / decode MB/s of raw bytes, timed here (one
   encode and one decode per tensor and input, summed) next to the speed the cost model's
   shipped calibration gives its reference host (``partc.costmodel.codec_rates``: what
   compress-cut-tensors prices links with, scaled to their targets), so that a reader sees
   whether the model and this host agree;
2. the plan the default pipeline chooses on a device (rpi4) -> cloud (cloud-cpu) cluster at
   1, 5 and 20 Mbit/s (10 ms latency): predicted latency with the link's codecs ``[none]``
   (what select-cuts gives) and with ``[none, none+zstd-1, fp16+zstd-1, int8+zstd-1]``
   (compress-cut-tensors, budget 0.99 on the same images), and the pass's own run time.

The weights are random: ratios are those of randomly initialised activations (about half of
every ReLU output is zero), and top-1 agreement on random images of a random network says
little about a trained one (tests/passes/test_compress.py checks a trained CNN).

Writes ``benchmarks/results/compression.md`` (``-o``) and prints the tables. Takes about
five minutes on 2 cores with 8 inputs, most of it the compress-cut-tensors pass (it
measures every tensor of the model). Needs the runtime extra (zstd, lz4).

Usage: ``python benchmarks/compression.py [--inputs 8] [-o benchmarks/results/compression.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import fx

from partc.codec import decode, encode, parse_codec
from partc.compression import calibration_inputs, measure_codecs
from partc.context import CompileContext, Compression, Link, Tier
from partc.costmodel import codec_rates, load_calibration
from partc.ir import META_LINK_CODECS, link_name
from partc.partition.cost import evaluate, format_size
from partc.partition.model import assigned_cost, priced
from partc.passes import passes_named
from partc.passes.compress import compress_cut_tensors
from partc.pipeline import run_passes
from partc.report import format_table, trace_model

ROOT = Path(__file__).resolve().parent.parent
CODECS = (
    "none+zstd-1", "fp16", "fp16+zstd-1", "int8", "int8+zstd-1", "int8+zstd-3", "int8c+zstd-1", "int8+lz4",
)
# The tensor a cut sends after each stage: the input of the named node.
DEPTHS = {
    "resnet50": {
        "stem": "layer1_0_conv1", "layer1": "layer2_0_conv1", "layer2": "layer3_0_conv1", "layer3": "layer4_0_conv1",
    },
    "mobilenet_v2": {
        "features.1": "features_2_conv_0_0", "features.3": "features_4_conv_0_0",
        "features.6": "features_7_conv_0_0", "features.13": "features_14_conv_0_0",
    },
}
PLAN_CODECS = ("none", "none+zstd-1", "fp16+zstd-1", "int8+zstd-1")
MBITS = (1, 5, 20)
PLAN_HEADER = [
    "Mbit/s", "cut, none", "bytes", "latency ms, none", "cut, compressed", "codec", "ratio", "top-1 agreement",
    "latency ms, compressed", "speed-up", "pass s",
]
SPEED_HEADER = ["codec", "encode MB/s here", "encode MB/s, model", "decode MB/s here", "decode MB/s, model"]
BUDGET = 0.99


def codec_rows(gm, inputs, depths: dict[str, str]) -> tuple[list[list[str]], dict[str, list[float]]]:
    """Ratio per depth and codec; and per codec the summed raw bytes and encode / decode seconds (``timed``)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    tensors = {label: by_name[node].all_input_nodes[0].name for label, node in depths.items()}
    measured = measure_codecs(gm, inputs, CODECS, only=set(tensors.values()))
    rows = []
    for label, name in tensors.items():
        i = measured.names.index(name)
        shape = "x".join(map(str, by_name[name].meta["partc.shape"][1:]))
        row = [f"after {label} (`{name}`)", shape, format_size(measured.raw[i] / measured.samples)]
        rows.append(row + [f"{measured.raw[i] / measured.wire[codec][i]:.2f}" for codec in CODECS])
    return rows, timed(gm, inputs, set(tensors.values()))


def timed(gm, inputs, names: set[str]) -> dict[str, list[float]]:
    """Per codec: raw bytes and encode / decode seconds, summed over the tensors ``names`` on every call of
    ``inputs`` (one encode and one decode each, one thread), timed on this host."""
    parsed = [parse_codec(c) for c in CODECS]
    warm = np.zeros((1, 8), np.float32)
    for codec in parsed:  # the first call imports zstd / lz4: keep that out of the timings
        decode(encode(warm, codec), codec, warm.shape, warm.dtype)
    speed = {c: [0.0, 0.0, 0.0] for c in CODECS}
    for call in inputs:
        interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interpreter.run(*call)
        for array in (interpreter.env[n].numpy() for n in gm.graph.nodes if n.name in names):
            for codec in parsed:
                start = time.perf_counter()
                payload = encode(array, codec)
                middle = time.perf_counter()
                decode(payload, codec, array.shape, array.dtype)
                speed[codec.name][0] += array.nbytes
                speed[codec.name][1] += middle - start
                speed[codec.name][2] += time.perf_counter() - middle
    return speed


def speed_rows(speed: dict[str, list[float]]) -> list[list[str]]:
    """Per codec: MB/s timed here, and as the shipped calibration prices its reference host."""
    cal = load_calibration()
    rows = []
    for codec, (raw, enc, dec) in speed.items():
        model = codec_rates(cal, codec, cal.reference, cal.reference)
        rows.append([codec, f"{raw / enc / 1e6:.0f}", f"{model[0] / 1e6:.0f}", f"{raw / dec / 1e6:.0f}",
                     f"{model[1] / 1e6:.0f}"])
    return rows


def cluster(mbits: float, codecs: tuple[str, ...], calibration: Path) -> CompileContext:
    return CompileContext(
        (Tier("device", "rpi4", "torchscript"), Tier("cloud", "cloud-cpu", "onnx")),
        (Link("device", "cloud", mbits * 1e6 / 8, 0.010, codecs),),
        compression=Compression(BUDGET, str(calibration)),
        source="benchmark cluster",
    )


def cut_of(graph, tiers: np.ndarray) -> str:
    """The tensors crossing the link, or where everything runs."""
    crossing = (tiers == 0) & (graph.last_consumer(tiers) > 0)
    names = [n for n, c in zip(graph.names, crossing, strict=True) if c]
    if not names:
        return "all on device" if tiers.max() == 0 else "-"
    return "input (all in cloud)" if names == [graph.names[0]] else ", ".join(f"`{n}`" for n in names)


def plan_rows(gm, calibration: Path) -> tuple[list[list[str]], list[str]]:
    """Per bandwidth: the plan without and with compression; and the pass's summary lines."""
    rows, summaries = [], []
    for mbits in MBITS:
        raw_ctx = cluster(mbits, ("none",), calibration)
        raw = run_passes(gm, passes_named(["annotate-profile", "select-cuts"]), raw_ctx)
        graph, raw_tiers, raw_cost = assigned_cost(raw, raw_ctx)
        ctx = cluster(mbits, PLAN_CODECS, calibration)
        start = time.perf_counter()
        result = compress_cut_tensors(raw, ctx)
        seconds = time.perf_counter() - start
        _, tiers, _ = assigned_cost(result.gm, ctx)
        codecs = result.gm.meta[META_LINK_CODECS]
        entry = codecs[link_name("device", "cloud")]
        cost = evaluate(priced(graph, codecs), tiers)
        agreement = "-" if entry.agreement is None else f"{entry.agreement:.3f}"
        rows.append([
            f"{mbits}", cut_of(graph, raw_tiers), format_size(raw_cost.link_bytes[0]), f"{raw_cost.latency * 1e3:.1f}",
            cut_of(graph, tiers), entry.codec, f"{entry.ratio:.2f}", agreement,
            f"{cost.latency * 1e3:.1f}", f"{raw_cost.latency / cost.latency:.2f}", f"{seconds:.1f}",
        ])
        summaries.append(f"{mbits} Mbit/s: {result.summary}")
    return rows, summaries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=8, help="seeded random images (calibration inputs)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "compression.md",
                        help="report to write (default benchmarks/results/compression.md)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    images = np.random.default_rng(0).standard_normal((args.inputs, 3, 224, 224)).astype(np.float32)
    lines = [
        "# Feature-map compression at cut points",
        "",
        f"`python benchmarks/compression.py --inputs {args.inputs}`, {started}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch at 2 threads. torchvision models with `weights=None` (seeded) at "
        f"1x3x224x224, on {args.inputs} seeded random images: the ratios are those of randomly initialised "
        "activations (about half of every ReLU output is zero). Speeds are MB/s of raw bytes, one thread per "
        "codec call: timed on this shared host, and the cost model's calibrated speed on its reference host.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calib.npy"
        np.save(calibration, images)
        for model, depths in DEPTHS.items():
            gm = trace_model(f"torchvision:{model}", ["1,3,224,224"])
            inputs = calibration_inputs(gm, Compression(BUDGET, str(calibration)))
            rows, speed = codec_rows(gm, inputs, depths)
            ratio_table = format_table([["cut tensor", "shape", "raw", *CODECS], *rows])
            speeds = [SPEED_HEADER, *speed_rows(speed)]
            speed_table = format_table(speeds, right=(1, 2, 3, 4))
            plans, summaries = plan_rows(gm, calibration)
            plan_table = format_table([PLAN_HEADER, *plans])
            print(f"\n{model}\n{ratio_table}\n\n{speed_table}\n\n{plan_table}")
            lines += [
                "",
                f"## {model}",
                "",
                "Size ratio (raw / wire bytes) of the tensor a cut after each stage sends:",
                "",
                *markdown([["cut tensor", "shape", "raw", *CODECS], *rows]),
                "",
                "Encode and decode speed per codec over those four tensors (raw bytes / seconds), timed here "
                "and as the cost model's shipped calibration prices its reference host (single-threaded; "
                "compress-cut-tensors scales it to each link's sending and receiving targets):",
                "",
                *markdown(speeds),
                "",
                f"Plan on device (rpi4) -> cloud (cloud-cpu), 10 ms link, predicted by the cost model: codecs `[none]` "
                f"(select-cuts) vs `[{', '.join(PLAN_CODECS)}]` (compress-cut-tensors, budget {BUDGET}); "
                "`pass s`: the compress-cut-tensors pass's run time here (it measures every tensor of the model):",
                "",
                *markdown([PLAN_HEADER, *plans]),
                "",
                "The pass's summaries (lossy plans it refused are named with their agreement):",
                "",
                *(f"- {line}" for line in summaries),
            ]
    lines += ["", f"Load average {os.getloadavg()[0]:.1f} at the end of the run.", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"\nwritten to {args.output}")
    return 0


def markdown(rows: list[list[str]]) -> list[str]:
    """A markdown table: the first row is the header."""
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]


if __name__ == "__main__":
    sys.exit(main())
