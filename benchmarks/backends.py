"""Benchmark the backends on a torchvision model split into three stages (topological thirds).

For every backend and stage: emit (compile) time, artifact size, load time, median
latency; end to end: max abs diff of the chained artifacts vs the eager model. Then TVM
tuned (a small MetaSchedule budget on the stages named by --tune-stages) vs untuned vs
ONNX Runtime vs eager PyTorch on the same stages. The backends: TorchScript, ONNX Runtime,
torch.export (ExportedProgram run by PyTorch; with --aoti also compiled by AOTInductor,
which takes minutes per stage), TVM.

    python benchmarks/backends.py                      # writes benchmarks/results/backends.md
    python benchmarks/backends.py --model resnet18 --aoti
    python benchmarks/backends.py --trials 8 --tune-stages device.0,edge.0,cloud.0 --database build/tvm-db

Writes ``benchmarks/results/backends.md`` (``-o``). Needs the onnx and tvm extras. With the
defaults it takes about two minutes on 2 cores (untuned TVM stages run ~1.7 s each). Tuning
is slow on a small machine (19 tasks per stage; 8 trials per task take ~5 min per
stage on 2 cores), hence the defaults tune one stage with 4 trials per task. --aoti adds
about 2-3 minutes per stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from partc.context import BackendOptions, CompileContext, Tier
from partc.ir import META_TIER, compute_nodes
from partc.plan import Plan, build_plan, eager_stage_fn, run_plan
from partc.targets import target
from partc.targets.export import ExportBackend
from partc.targets.onnx import OnnxBackend
from partc.targets.torchscript import TorchScriptBackend
from partc.targets.tvm import TvmBackend
from partc.trace import InputSpec, load_model, trace

TIERS = ("device", "edge", "cloud")


def split_in_thirds(gm) -> Plan:
    nodes = compute_nodes(gm)
    for i, node in enumerate(nodes):
        node.meta[META_TIER] = TIERS[3 * i // len(nodes)]
    return build_plan(gm, CompileContext(tiers=tuple(Tier(t, "edge-x86", "onnx") for t in TIERS)))


def median_latency(fn, inputs, runs: int) -> float:
    fn(inputs)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_inputs(plan: Plan, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The exact tensors each stage reads, from one eager run."""
    env = {"x": x}
    per_stage = {}
    for stage in plan.stages:
        per_stage[stage.name] = {t.name: env[t.name] for t in stage.inputs}
        env.update(eager_stage_fn(stage)(per_stage[stage.name]))
    return per_stage


def bench_backend(label, backend, plan, feeds, x, expected, tgt, outdir, runs, options=None) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    rows, fns = [], {}
    for stage in plan.stages:
        start = time.perf_counter()
        artifact = backend.emit(stage, tgt, outdir, options or BackendOptions())
        emit_s = time.perf_counter() - start
        start = time.perf_counter()
        fn = backend.load(artifact)
        load_s = time.perf_counter() - start
        fns[stage.name] = fn
        latency = median_latency(fn, feeds[stage.name], runs)
        rows.append(
            {
                "stage": stage.name,
                "emit_s": emit_s,
                "bytes": artifact.bytes,
                "load_s": load_s,
                "latency_ms": latency * 1e3,
                "info": dict(artifact.info),
            }
        )
        logging.info(
            "%s %s: emit %.2f s, %.1f MB, latency %.1f ms",
            label,
            stage.name,
            emit_s,
            artifact.bytes / 1e6,
            latency * 1e3,
        )
    out = run_plan(plan, fns, {"x": x})["output"]
    return {"label": label, "rows": rows, "max_abs_diff": float(np.abs(out - expected).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="torchvision model (default resnet50)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--aoti", action="store_true", help="also compile the export stages with AOTInductor")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per stage (TVM untuned: 3)")
    parser.add_argument("--trials", type=int, default=4, help="MetaSchedule trials per task")
    parser.add_argument("--tune-stages", default="device.0", help="comma-separated stages to tune")
    parser.add_argument("--database", type=Path, help="tuning database dir (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op / torch threads")
    parser.add_argument("-o", type=Path, default=Path(__file__).parent / "results" / "backends.md",
                        help="report to write (default benchmarks/results/backends.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    model = load_model(f"torchvision:{args.model}")
    spec = InputSpec((1, 3, args.size, args.size))
    gm = trace(model, [spec])
    plan = split_in_thirds(gm)
    x = spec.example()
    with torch.no_grad():
        expected = model(x).numpy()
        eager_full = median_latency(lambda _: model(x), None, args.runs)
    x = x.numpy()
    feeds = stage_inputs(plan, x)
    eager = {s.name: median_latency(eager_stage_fn(s), feeds[s.name], args.runs) * 1e3 for s in plan.stages}
    tgt = target("edge-x86")

    with tempfile.TemporaryDirectory(prefix="partc-bench-") as tmp:
        tmp = Path(tmp)
        database = args.database or tmp / "tuning"
        results = [
            bench_backend("torchscript", TorchScriptBackend(), plan, feeds, x, expected, tgt, tmp / "ts", args.runs),
            bench_backend(
                "onnx (ORT)", OnnxBackend(threads=args.threads), plan, feeds, x, expected, tgt, tmp / "onnx", args.runs
            ),
            bench_backend("export", ExportBackend(threads=args.threads), plan, feeds, x, expected, tgt,
                          tmp / "export", args.runs),
            bench_backend("tvm untuned", TvmBackend(), plan, feeds, x, expected, tgt, tmp / "tvm", 3),
        ]
        if args.aoti:
            results.insert(3, bench_backend("export + AOTInductor", ExportBackend(threads=args.threads), plan, feeds,
                                            x, expected, tgt, tmp / "aoti", args.runs, BackendOptions(aoti=True)))
        tune_stages = [s for s in plan.stages if s.name in args.tune_stages.split(",")]
        tuned = []
        tuner = TvmBackend()
        tuning = BackendOptions(tvm_trials=args.trials, tuning_db=database)
        (tmp / "tvm-tuned").mkdir()
        for stage in tune_stages:
            start = time.perf_counter()
            artifact = tuner.emit(stage, tgt, tmp / "tvm-tuned", tuning)
            tune_s = time.perf_counter() - start
            fn = tuner.load(artifact)
            diff = float(
                max(
                    np.abs(fn(feeds[stage.name])[t.name] - eager_stage_fn(stage)(feeds[stage.name])[t.name]).max()
                    for t in stage.outputs
                )
            )
            tuned.append(
                {
                    "stage": stage.name,
                    "tune_s": tune_s,
                    "latency_ms": median_latency(fn, feeds[stage.name], 5) * 1e3,
                    "info": dict(artifact.info),
                    "diff": diff,
                }
            )
    load = (load_before, os.getloadavg()[0])
    write_report(args, results, tuned, eager, eager_full * 1e3, float(np.abs(expected).max()), load)


def write_report(args, results, tuned, eager, eager_full_ms, scale, load) -> None:
    lines = [
        f"# Backends on {args.model} (three stages by topological thirds)",
        "",
        f"Host: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads (torch and ORT); "
        f"torch {torch.__version__}. Input 1x3x{args.size}x{args.size}, random weights (output scale {scale:.3g}). "
        f"Latency: median of {args.runs} runs (TVM untuned: 3). 1-minute load average {load[0]:.1f} at the "
        f"start and {load[1]:.1f} at the end: on a shared host, compare rows of one run, not absolute values.",
        f"Written by `{' '.join(['python benchmarks/backends.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| backend | emit s (d/e/c) | size MB (d/e/c) | load s (d/e/c) | latency ms (d/e/c) | total ms | "
        "max abs diff vs torch |",
        "|---|---|---|---|---|---|---|",
        f"| eager torch | - | - | - | {' / '.join(f'{v:.1f}' for v in eager.values())} | "
        f"{sum(eager.values()):.1f} (whole model {eager_full_ms:.1f}) | - |",
    ]
    for r in results:
        rows = r["rows"]

        def column(key, fmt, rows=rows):
            return " / ".join(format(x[key], fmt) for x in rows)

        sizes = " / ".join(f"{x['bytes'] / 1e6:.1f}" for x in rows)
        total = sum(x["latency_ms"] for x in rows)
        lines.append(
            f"| {r['label']} | {column('emit_s', '.2f')} | {sizes} | {column('load_s', '.2f')} | "
            f"{column('latency_ms', '.1f')} | {total:.1f} | {r['max_abs_diff']:.2g} |"
        )
    lines += [
        "",
        f"## TVM tuned vs untuned vs ONNX Runtime ({args.trials} MetaSchedule trials per task)",
        "",
        "Tasks tuned counts the tasks with a record in the database after the build; with a database kept "
        "from an earlier run (--database) nothing is tuned again and the time is the compile time only.",
        "",
    ]
    lines += [
        "| stage | tasks tuned | tuning + compile s | tvm tuned ms | tvm untuned ms | ORT ms | eager ms | "
        "max abs diff (tuned) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_label = {r["label"]: {x["stage"]: x for x in r["rows"]} for r in results}
    for t in tuned:
        s = t["stage"]
        lines.append(
            f"| {s} | {t['info']['tuned_tasks']}/{t['info']['tasks']} | {t['tune_s']:.0f} | {t['latency_ms']:.1f} | "
            f"{by_label['tvm untuned'][s]['latency_ms']:.1f} | {by_label['onnx (ORT)'][s]['latency_ms']:.1f} | "
            f"{eager[s]:.1f} | {t['diff']:.2g} |"
        )
    args.o.parent.mkdir(parents=True, exist_ok=True)
    args.o.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
