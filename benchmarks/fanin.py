"""Fan-in: many simulated devices sharing one cloud tier, on Ray Serve vs the single gRPC worker.

resnet18 at 64x64 is compiled for a device (TorchScript, conv1 + maxpool) -> cloud (ONNX, the
rest) cluster. Devices are threads of this process (``partc.runtime.fleet``), each running
the device stage itself and sending Poisson arrivals at ``--rate`` requests/s over gRPC to
the cloud tier, served either by one ``partc serve`` worker (the gRPC engine) or by a
``partc serve --engine ray`` process with its own local Ray cluster, 1 or 2 replicas (one
CPU each) batching up to 1, 4 or 8 requests. Every configuration runs 1, 4 and 16 devices;
rows give throughput and p50/p99 latency (from each request's scheduled arrival).

Predicted saturation throughput of the cloud tier = replicas x b / S(b) at the largest
batch b (the gRPC worker: 1 / S(1)), with S(b) = F + b (S(1) - F), the planner's batch model
(``partc.partition.load.batch_seconds``); S(1) and F come from timing the cloud artifact
alone at batch 1 and 8 on this machine before the runs. The measured saturation throughput
is the 16-device row's. The planner's figures for 100 and 1,000 devices on a cloud of
several machines (``partc.partition.load.serve``) are on paper: nothing here runs them.

Usage: ``python benchmarks/fanin.py [--quick] [-o benchmarks/results/fanin.md]``. CPU heavy
(the machine's cores serve devices, ingress and replicas at once); compare ratios.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: cloud, bandwidth: 1Gbit/s, latency: 1ms}
constraints:
  pin: {device: [conv1], cloud: [layer1.0.conv1]}
"""


def batch_timing(build: Path, sizes: tuple[int, ...], repeat: int) -> dict[int, float]:
    """Median seconds of the cloud artifact alone on a batch of each size (ONNX Runtime, 1 thread)."""
    from partc.manifest import manifest_stages, read_manifest
    from partc.targets.onnx import OnnxBackend

    (cloud,) = [s for s in manifest_stages(read_manifest(build), build) if s.tier == "cloud"]
    artifact = cloud.programs[cloud.name]
    fn = OnnxBackend(threads=1).load(artifact)
    rng = np.random.default_rng(0)
    seconds = {}
    for b in sizes:
        feed = {t.name: rng.standard_normal((b, *t.shape[1:])).astype(t.dtype) for t in artifact.inputs}
        fn(feed)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(feed)
            times.append(time.perf_counter() - start)
        seconds[b] = float(np.median(times))
    return seconds


def fleet_rows(build: Path, addresses: dict, devices: tuple[int, ...], rate: float, requests: int) -> list:
    from partc.runtime.fleet import run_fleet

    rows = []
    for n in devices:
        report = run_fleet(build, addresses, devices=n, rate=rate, requests=requests, timeout=120.0)
        print(f"  {report.summary()}", flush=True)
        rows.append(report)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 devices, 1 replica, batch 1 and 4")
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per device (default 5)")
    parser.add_argument("--requests", type=int, default=0, help="requests per device (default 30, quick 8)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "fanin.md")
    args = parser.parse_args()

    from partc.build import compile_model
    from partc.partition.load import TARGET_UTILISATION, TierLoad, batch_seconds, serve
    from partc.runtime.deploy import LocalWorkers
    from partc.runtime.rayserve import RayTiers, TierServing

    devices = (1, 4) if args.quick else (1, 4, 16)
    replicas = (1,) if args.quick else (1, 2)
    batches = (1, 4) if args.quick else (1, 4, 8)
    requests = args.requests or (8 if args.quick else 30)
    with tempfile.TemporaryDirectory(prefix="partc-fanin-") as tmp:
        (Path(tmp) / "cluster.yaml").write_text(CLUSTER)
        build = compile_model("torchvision:resnet18", ["1,3,64,64"], Path(tmp) / "cluster.yaml", Path(tmp) / "b").path
        timing = batch_timing(build, (1, max(batches)), 5 if args.quick else 20)
        top = max(batches)
        s1 = timing[1]
        fixed = min(s1, max(0.0, (top * s1 - timing[top]) / (top - 1)))
        print(f"cloud stage alone: S(1) {s1 * 1e3:.1f} ms, S({top}) {timing[top] * 1e3:.1f} ms, "
              f"fitted F {fixed * 1e3:.1f} ms", flush=True)
        results = []
        print("gRPC engine: one cloud worker", flush=True)
        with LocalWorkers(build) as workers:
            later = {k: v for k, v in workers.addresses.items() if k != "device.0"}
            results.append(("gRPC worker", 1 / s1, fleet_rows(build, later, devices, args.rate, requests)))
        for r in replicas:
            for b in batches:
                print(f"Ray Serve: {r} replica(s), max batch {b}", flush=True)
                with RayTiers(build, TierServing(r, r, b)) as tiers:
                    predicted = r * b / float(batch_seconds(np.array(s1), np.array(fixed), b))
                    results.append((f"Ray Serve, {r} replica(s), batch <= {b}", predicted,
                                    fleet_rows(build, tiers.addresses, devices, args.rate, requests)))
    lines = [
        "# Fan-in: simulated devices sharing one cloud tier (Ray Serve vs one gRPC worker)",
        "",
        f"Written by `benchmarks/fanin.py{' --quick' if args.quick else ''}` on {platform.node()} "
        f"({platform.processor() or platform.machine()}, a 2-core machine shared with other work: compare ratios). "
        f"resnet18 at 64x64, device (TorchScript: conv1, bn, relu, maxpool) -> cloud (ONNX: the rest). Each "
        f"device sends {requests} requests, Poisson arrivals at {args.rate:g}/s, at most 4 in flight; latency "
        "runs from each request's scheduled arrival to its result.",
        "",
        f"Cloud stage alone (ONNX Runtime, 1 thread, this machine): S(1) = {s1 * 1e3:.1f} ms, "
        f"S({top}) = {timing[top] * 1e3:.1f} ms, so F = {fixed * 1e3:.1f} ms is paid once per batch "
        "(`partc.partition.load.batch_seconds`: S(b) = F + b (S(1) - F)).",
        "",
        "| cloud tier | devices | offered req/s | throughput req/s | p50 ms | p99 ms | lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _, rows in results:
        for report in rows:
            lines.append(f"| {name} | {report.devices} | {report.devices * args.rate:g} | {report.throughput:.1f} | "
                         f"{report.percentile(50) * 1e3:.0f} | {report.percentile(99) * 1e3:.0f} | {report.lost} |")
    lines += ["", "## Saturation throughput: predicted vs measured", "",
              "Predicted: replicas x b / S(b) at the largest batch b (the planner's batch model, S(1) and F above). "
              f"Measured: the {max(devices)}-device row (offered load {max(devices) * args.rate:g} req/s; a "
              "saturation figure only where that exceeds the prediction, and runs of a few seconds count the "
              "arrivals' spread as much as the tier). The "
              "devices' own stage, the ingress and the replicas share this machine's 2 cores, which the "
              "prediction does not count.", "",
              "| cloud tier | predicted req/s | measured req/s | measured / predicted |", "|---|---|---|---|"]
    for name, predicted, rows in results:
        measured = rows[-1].throughput
        lines.append(f"| {name} | {predicted:.1f} | {measured:.1f} | {measured / predicted:.2f} |")
    lines += ["", "## On paper: 100 and 1,000 devices on a cloud of several machines", "",
              f"Extrapolated, not measured: the planner's load model (`partc.partition.load.serve`: M/D/c queue of "
              f"batches, replicas sized for {TARGET_UTILISATION:.0%} utilisation) with S(1) and F above, each "
              f"device at {args.rate:g} req/s, batches of up to {top}, up to 64 replicas of one core each.", "",
              "| devices | arrivals req/s | replicas | batch | utilisation | added latency ms |",
              "|---|---|---|---|---|---|"]
    for n in (100, 1000):
        load = TierLoad("cloud", 1, n * args.rate, 1, 64, top)
        c, b, rho, _, wait = (a.item() for a in serve(load, np.array([s1]), np.array([fixed])))
        added = f"{wait * 1e3:.1f}" if np.isfinite(wait) else "overloaded"
        lines.append(f"| {n} | {n * args.rate:g} | {c} | {b} | {rho:.2f} | {added} |")
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
