"""Fan-in: many simulated devices sharing one cloud tier, on Ray Serve vs the single gRPC worker.

resnet18 at 64x64 is compiled for a device (TorchScript, conv1 + maxpool) -> cloud (ONNX, the
rest) cluster. Devices are threads of this process (``partc.runtime.fleet``), each running
the device stage itself and sending Poisson arrivals at ``--rate`` requests/s over gRPC to
the cloud tier, served either by one ``partc serve`` worker (the gRPC engine, 1 compute
thread) or by a ``partc serve --engine ray`` process with its own local Ray cluster, 1 or 2
replicas (one thread each) batching up to 1, 4 or 8 requests. Every configuration runs 1, 4
and 16 devices at ``--rate``, then 16 devices at ``SATURATE`` times it (the saturation row);
rows give throughput, p50/p99 latency (from each request's scheduled arrival) and how busy
each core was.

The cloud tier is a machine of known cores: its serving process (and so Ray's raylet and
replica workers, which inherit CPU affinity) is pinned to this host's last core, the
devices to the others. The prediction is the load model's (``partc.partition.load``) for
that machine, from figures measured in the same run on that core: S(1) and F (the cloud
artifact alone at batch 1 and 8), and each engine's per-request call cost C (the CPU seconds
the cloud processes spend per request, one request at a time, less S(1): the ingress's
receiving and answering; on Ray also the handle call and the replica's queue).
``tier_capacity`` with ``slots(1 machine, its cores, 1 thread)`` gives the saturation
throughput; the saturation row measures it. The planner's figures for 100 and 1,000
devices on a cloud of several such machines (``partc.partition.load.serve``) are on paper.

Usage: ``python benchmarks/fanin.py [--quick] [-o benchmarks/results/fanin.md]``. Needs 2 cores
or more; other work on the host shows in the rows' core figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

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
MACHINES = 256  # most machines of the cloud on paper
SATURATE = 4  # the saturation row's rate, in multiples of --rate
CALLS = 200  # requests, one at a time, that measure an engine's call cost
IDLE = 3.0  # seconds without requests that measure the cloud processes' background CPU
STAY = 1.0  # devices keep the primary plan: no plan is predicted 100% faster (every row, the same cut)


def pin(cores: set[int]) -> None:
    """Pin every thread of this process to ``cores``; processes started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cores)


def batch_timing(build: Path, sizes: tuple[int, ...], repeat: int) -> dict[int, float]:
    """Median CPU seconds of the cloud artifact alone on a batch of each size (ONNX Runtime, 1
    thread): the work the cloud's core does, however much of it other work on the host takes."""
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
            start = time.process_time()
            fn(feed)
            times.append(time.process_time() - start)
        seconds[b] = float(np.median(times))
    return seconds


@dataclass(frozen=True)
class Row:
    """One run of the fleet, with how busy the cores were meanwhile.

    Attributes:
        rate: requests/s of each device.
        report: the fleet's ``FleetReport``.
        ours: the cloud processes' CPU, in cores, over the run.
        cloud_busy, device_busy: the fraction of the cloud core(s) and of the devices' cores
            busy with anything (ours and other work).
    """

    @property
    def others(self) -> float:
        """The share of the cloud core(s) other work on the host took."""
        return max(0.0, self.cloud_busy - self.ours)

    rate: float
    report: object
    ours: float
    cloud_busy: float
    device_busy: float


class Cloud:
    """The cloud tier's processes (the serving process and its descendants) and their CPU."""

    def __init__(self, pid: int, cores: set[int]) -> None:
        root = psutil.Process(pid)
        self.processes = [root, *root.children(recursive=True)]
        self.cores = cores
        self.unpinned = [p.pid for p in self.processes if set(p.cpu_affinity()) != cores]

    def cpu(self) -> float:
        """CPU seconds the processes have used."""
        total = 0.0
        for p in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
        return total


def run_row(build: Path, addresses: dict, cloud: Cloud, devices: int, rate: float, requests: int, **options) -> Row:
    """Run ``devices`` devices against ``addresses``, timing the cores meanwhile."""
    from partc.runtime.fleet import run_fleet

    cpu, busy = cloud.cpu(), psutil.cpu_times(percpu=True)
    report = run_fleet(build, addresses, devices=devices, rate=rate, requests=requests, timeout=120.0, margin=STAY,
                       **options)
    spent = cloud.cpu() - cpu
    after = psutil.cpu_times(percpu=True)

    def busy_share(cores: set[int]) -> float:
        total = sum(sum(after[c]) - sum(busy[c]) for c in cores)
        idle = sum(after[c].idle + after[c].iowait - busy[c].idle - busy[c].iowait for c in cores)
        return 1 - idle / total if total > 0 else 0.0

    others = set(range(len(after))) - cloud.cores
    return Row(rate, report, spent / report.seconds if report.seconds > 0 else 0.0, busy_share(cloud.cores),
               busy_share(others))


def call_cost(build: Path, addresses: dict, cloud: Cloud, s1: float) -> tuple[float, float]:
    """The cloud processes' background CPU (cores, ``IDLE`` seconds without requests) and the CPU
    seconds they spend per request besides the stage and the background (``CALLS`` requests, one
    at a time, after a few to warm up)."""
    from partc.runtime.fleet import run_fleet

    run_fleet(build, addresses, devices=1, rate=1000.0, requests=10, window=1, timeout=120.0, margin=STAY)
    cpu = cloud.cpu()
    time.sleep(IDLE)
    background = (cloud.cpu() - cpu) / IDLE
    cpu, start = cloud.cpu(), time.perf_counter()
    run_fleet(build, addresses, devices=1, rate=1000.0, requests=CALLS, window=1, timeout=120.0, margin=STAY)
    spent = cloud.cpu() - cpu - background * (time.perf_counter() - start)
    return background, max(0.0, spent / CALLS - s1)


@contextlib.contextmanager
def served(build: Path, engine: tuple[int, int] | None, cloud_cores: set[int], device_cores: set[int]
           ) -> Iterator[tuple[dict, Cloud]]:
    """The cloud tier on ``cloud_cores``: the gRPC worker (``engine`` None) or Ray Serve with
    (replicas, max batch); this process's threads on ``device_cores`` meanwhile."""
    from partc.manifest import read_manifest
    from partc.runtime.deploy import spawn_worker, stop_processes, wait_ready
    from partc.runtime.rayserve import RayTiers, TierServing

    pin(cloud_cores)
    with contextlib.ExitStack() as stack:
        if engine is None:
            stage = read_manifest(build).chain[1].name
            scratch, processes = Path(stack.enter_context(tempfile.TemporaryDirectory())), {}
            stack.callback(stop_processes, processes)
            process, ready, log_path = spawn_worker(build, stage, scratch, threads=1, processes=processes)
            addresses = {stage: wait_ready(process, ready, log_path, "the cloud worker")["address"]}
        else:
            tiers = stack.enter_context(RayTiers(build, TierServing(engine[0], engine[0], engine[1])))
            (process,), addresses = tiers.processes.values(), tiers.addresses
        pin(device_cores)
        yield addresses, Cloud(process.pid, cloud_cores)


def paper(s1: float, fixed: float, background: float, call: float, rate: float, top: int) -> list[str]:
    """The results' section on 100 and 1,000 devices: the load model's figures for a Ray Serve
    cloud of up to ``MACHINES`` machines like the measured core, from the Ray rows' medians."""
    from partc.partition.load import SERVE_CALLS, TARGET_UTILISATION, TierLoad, serve, slots
    from partc.partition.model import call_seconds
    from partc.targets import target

    lines = ["", "## On paper: 100 and 1,000 devices on a cloud of several machines", "",
             f"Extrapolated, not measured: the planner's load model (`partc.partition.load.serve`: M/D/c queue of "
             f"batches, replicas sized for {TARGET_UTILISATION:.0%} utilisation) on a Ray Serve cloud of up to "
             f"{MACHINES} machines like the measured core (1 core each, one 1-thread replica each: "
             f"`slots({MACHINES}, 1, 1)`), with the median S(1) ({s1 * 1e3:.1f} ms), F ({fixed * 1e3:.1f} ms) and C "
             f"({call * 1e3:.2f} ms) of the Ray rows above, each device at {rate:g} req/s, batches of up to {top}. "
             f"Not counted: Ray's background B on each machine (median above: {background:.0%} of the core). "
             "The planner itself "
             f"prices a cloud-cpu replica on its target's 4 cores with C = {SERVE_CALLS} x call_seconds(cloud-cpu) "
             f"= {SERVE_CALLS * call_seconds(target('cloud-cpu')) * 1e3:.1f} ms.", "",
             "| devices | arrivals req/s | replicas (machines) | batch | utilisation | added latency ms |",
             "|---|---|---|---|---|---|"]
    for n in (100, 1000):
        load = TierLoad("cloud", 1, n * rate, 1, MACHINES, top, call, 1, slots(MACHINES, 1, 1))
        c, b, rho, _, wait = (a.item() for a in serve(load, np.array([s1]), np.array([fixed])))
        added = f"{wait * 1e3:.1f}" if np.isfinite(wait) else "overloaded"
        lines.append(f"| {n} | {n * rate:g} | {c} | {b} | {rho:.2f} | {added} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 devices, 1 replica, batch 1 and 4")
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per device (default 5)")
    parser.add_argument("--requests", type=int, default=0, help="requests per device (default 30, quick 8)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "fanin.md")
    args = parser.parse_args()

    from partc.build import compile_model
    from partc.partition.load import SERVE_CALLS, WORKER_CALLS, TierLoad, slots, tier_capacity

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error("needs 2 cores or more: the cloud tier gets one, the devices the others")
    cloud_cores, device_cores = {cores[-1]}, set(cores[:-1])
    devices = (1, 4) if args.quick else (1, 4, 16)
    engines = [None] + [(r, b) for r in ((1,) if args.quick else (1, 2)) for b in ((1, 4) if args.quick else (1, 4, 8))]
    top = 4 if args.quick else 8
    requests = args.requests or (8 if args.quick else 30)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    results = []
    with tempfile.TemporaryDirectory(prefix="partc-fanin-") as tmp:
        (Path(tmp) / "cluster.yaml").write_text(CLUSTER)
        build = compile_model("torchvision:resnet18", ["1,3,64,64"], Path(tmp) / "cluster.yaml", Path(tmp) / "b").path
        for engine in engines:
            name = "gRPC worker" if engine is None else f"Ray Serve, {engine[0]} replica(s), batch <= {engine[1]}"
            print(name, flush=True)
            with served(build, engine, cloud_cores, device_cores) as (addresses, cloud):
                pin(cloud_cores)
                timing = batch_timing(build, (1, top), 5 if args.quick else 20)
                pin(device_cores)
                s1 = timing[1]
                fixed = min(s1, max(0.0, (top * s1 - timing[top]) / (top - 1)))
                background, call = call_cost(build, addresses, cloud, s1)
                replicas, batch = engine or (1, 1)
                load = TierLoad("cloud", 1, 1.0, replicas, replicas, batch, call, 1, slots(1, len(cloud_cores), 1))
                predicted = float(tier_capacity(load, s1, fixed))
                print(f"  S(1) {s1 * 1e3:.1f} ms, F {fixed * 1e3:.1f} ms, background {background:.1%} of a core, "
                      f"call {call * 1e3:.2f} ms/request, predicted "
                      f"saturation {predicted:.1f}/s" + (f"; not pinned: {cloud.unpinned}" if cloud.unpinned else ""),
                      flush=True)
                rows = []
                for n, rate in [*((n, args.rate) for n in devices), (max(devices), SATURATE * args.rate)]:
                    rows.append(run_row(build, addresses, cloud, n, rate, requests))
                    print(f"  {rows[-1].report.summary()}; cloud core {rows[-1].cloud_busy:.0%} busy "
                          f"({rows[-1].ours:.0%} ours)", flush=True)
            results.append((name, (s1, fixed, background, call), predicted, rows, cloud.unpinned))
    ended = time.strftime("%H:%M", time.gmtime())
    lines = [
        "# Fan-in: simulated devices sharing one cloud tier (Ray Serve vs one gRPC worker)",
        "",
        f"Written by `benchmarks/fanin.py{' --quick' if args.quick else ''}` on {platform.node()} "
        f"({platform.processor() or platform.machine()}, {len(cores)} cores shared with other work), "
        f"{started}-{ended} UTC. resnet18 at 64x64, device (TorchScript: conv1, bn, relu, maxpool) -> cloud "
        f"(ONNX: the rest). The cloud tier's serving process (and Ray's raylet and replica workers, which "
        f"inherit it) is pinned to core {cores[-1]}: the cloud is a 1-core machine; the devices (threads of "
        f"the benchmark) run on core(s) {', '.join(map(str, sorted(device_cores)))}. Each device sends "
        f"{requests} requests, Poisson arrivals, at most 4 in flight; latency runs from each request's "
        "scheduled arrival to its result. `cloud core busy` is the share of that core busy with anything "
        "during the row, `ours` the cloud processes' own share (the rest is other work on the host); "
        "`device cores busy` likewise for the devices' core(s).",
        "",
        "Measured on the cloud core in this run, for each engine just after it started: the cloud stage "
        f"alone (ONNX Runtime, 1 thread) S(1), and S({top}), whence F, the part paid once per batch (CPU "
        "time, so that other work on the core counts as little as it can); the engine's background B (CPU "
        f"of the cloud processes over {IDLE:g} s without requests, in cores) and call cost C (their CPU "
        f"seconds per request, {CALLS} requests one at a time, less S(1) and the background) are in the "
        "saturation table with S(1) and F. Devices keep the primary plan (no switch for speed), so every row "
        "runs the same cut.",
        "",
        "| cloud tier | devices | offered req/s | throughput req/s | p50 ms | p99 ms | lost "
        "| cloud core busy (ours) | device cores busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, *_, rows, _ in results:
        for row in rows:
            r = row.report
            lines.append(f"| {name} | {r.devices} | {r.devices * row.rate:g} | {r.throughput:.1f} | "
                         f"{r.percentile(50) * 1e3:.0f} | {r.percentile(99) * 1e3:.0f} | {r.lost} | "
                         f"{row.cloud_busy:.0%} ({row.ours:.0%}) | {row.device_busy:.0%} |")
    lines += ["", "## Saturation throughput: predicted vs measured", "",
              "Predicted for the core: `partc.partition.load.tier_capacity` of a 1-core machine "
              "(`slots(1, 1, 1)`: one batch at a time, whatever the replicas), S(b) = F + b (S(1) - F + C), "
              "with the S(1), F and C measured for the engine. The core's share left to requests: 1 - B - the "
              "share other work took during the saturation row (neither is in the planner's model; it would "
              "count its target's whole core). Predicted for that share: the one times the other. Measured: "
              f"the saturation row ({max(devices)} devices at {SATURATE * args.rate:g}/s each, "
              f"{max(devices) * SATURATE * args.rate:g} req/s offered). The planner prices C as `call_seconds` of "
              f"the tier's target per call (2 ms on the calibration host): {WORKER_CALLS} for the gRPC worker, "
              f"{SERVE_CALLS} on Ray Serve (ingress, handle call, replica queue).", "",
              "| cloud tier | S(1) ms | F ms | B % core | C ms/request | predicted req/s (core) | share left "
              "| predicted req/s (share) | measured req/s | measured / predicted (share) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (s1, fixed, background, call), predicted, rows, unpinned in results:
        measured, share = rows[-1].report.throughput, max(0.0, 1 - background - rows[-1].others)
        note = f" (processes {unpinned} not pinned)" if unpinned else ""
        lines.append(f"| {name}{note} | {s1 * 1e3:.1f} | {fixed * 1e3:.1f} | {background:.1%} | {call * 1e3:.2f} | "
                     f"{predicted:.1f} | {share:.2f} | {predicted * share:.1f} | {measured:.1f} | "
                     f"{measured / (predicted * share):.2f} |")
    ray = [figures for _, figures, *_ in results[1:]]
    lines += paper(*(float(np.median(f)) for f in zip(*ray, strict=True)), args.rate, top)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
