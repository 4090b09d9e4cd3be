"""Runtime overhead: the distributed pipeline on loopback vs the same model in one process.

resnet50 (seeded, 1x3x224x224) is compiled for ``examples/cluster.yaml`` (device: torchscript,
edge: onnx, cloud: onnx). Four ways to run it:

- ``eager``: the PyTorch model in this process;
- ``local``: the build's primary plan through its artifacts in this process (``partc run``);
- ``distributed``: one worker process per stage on 127.0.0.1, requests one at a time
  (``partc run --distributed``), the primary plan pinned (no switching on loopback, whose
  "bandwidth" is gRPC's per-call cost);
- ``distributed, 4 in flight``: the same workers with four requests in flight; its row
  gives the time per request at steady state (throughput), not the latency.

The overhead that matters is distributed / local: the same artifacts, plus frames, gRPC,
the hops of the chain and one process per stage. Rows run one after the other.

Writes ``benchmarks/results/overhead.md`` (``-o``). Takes about two minutes on 2 cores
(compiling resnet50, then the rounds). Needs the onnx and runtime extras.

Usage: ``python benchmarks/overhead.py [--rounds 15] [-o benchmarks/results/overhead.md]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from partc.build import compile_model
from partc.runtime.deploy import LocalWorkers, connect_build
from partc.runtime.local import load
from partc.trace import load_model, parse_input_spec

ROOT = Path(__file__).resolve().parent.parent
MODEL, SHAPE = "torchvision:resnet50", "1,3,224,224"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="timed runs per row (default 15)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "overhead.md",
                        help="report to write (default benchmarks/results/overhead.md)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = parse_input_spec(SHAPE).example()
    inputs = {"x": x.numpy()}
    model = load_model(MODEL)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="partc-overhead-") as tmp:
        build = compile_model(MODEL, [SHAPE], ROOT / "examples" / "cluster.yaml", Path(tmp) / "b").path
        local = load(build)
        with LocalWorkers(build) as workers, connect_build(build, workers.addresses, window=4,
                                                           margin=math.inf) as driver:
            driver.check()

            def eager():
                with torch.no_grad():
                    model(x)

            def pipelined():
                list(driver.run([inputs] * 8))

            rows = {"eager (PyTorch, one process)": (eager, 1), "local (artifacts, one process)":
                    (lambda: local(inputs), 1), "distributed (worker processes, 1 in flight)":
                    (lambda: driver.run_one(inputs), 1), "distributed, 4 in flight (per request)": (pipelined, 8)}
            samples = {name: [] for name in rows}
            for name, (fn, per) in rows.items():  # one row at a time: a row's threads still spinning would
                fn(), fn()  # slow the next row's processes down (two cores)
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - start) / per)
    text = table(samples, args.rounds, (load_before, os.getloadavg()[0]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


def table(samples: dict[str, list[float]], rounds: int, load: tuple[float, float]) -> str:
    medians = {name: statistics.median(s) for name, s in samples.items()}
    local = medians["local (artifacts, one process)"]
    lines = [
        "# Runtime overhead: distributed on loopback vs one process (resnet50)",
        "",
        f"`python benchmarks/overhead.py --rounds {rounds}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} before and {load[1]:.1f} after "
        "(shared machine: compare the ratios). Build: examples/cluster.yaml, primary plan (device: conv1 block on "
        "torchscript, edge: the rest on onnx). One row after the other (interleaved, the threads a row leaves "
        f"spinning slow the next row's processes down on two cores), medians of {rounds} runs after two warm-up runs.",
        "",
        "| run | median ms | min ms | / local |",
        "|---|---|---|---|",
    ]
    for name, s in samples.items():
        lines.append(f"| {name} | {medians[name] * 1e3:.1f} | {min(s) * 1e3:.1f} | {medians[name] / local:.3f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
