"""Simulated devices: many plain partc clients sharing the later tiers of a build.

Each device is a thread of this process with its own copy of the build's first stage (the
device tier's programs, one compute thread) and its own ``Driver``: it computes that stage
in-process and sends partc frames over gRPC to the next stage's worker, whatever serves it
(a ``partc serve`` worker, or a tier on Ray Serve: ``partc.runtime.rayserve``). A device
never joins a Ray cluster. Its driver picks each request's plan, keeps its requests in
order and fails over exactly as one driver does (``partc.runtime.driver``).

Arrivals: each device makes ``rate`` requests per second, open loop: Poisson arrivals
(exponential gaps, seeded per device), or evenly spaced with ``poisson=False``. A request's
latency runs from its scheduled arrival to its result, so a request that waits for one of
the device's ``window`` slots counts its wait (no coordinated omission). Inputs are seeded
per device and request; ``verify`` checks every result against the in-process pipeline
(``partc.runtime.local.load``) within ``RTOL`` of each output's scale.

A request without a result is lost: the device's driver gave up on it. The device then
sends the requests after it again (the driver abandoned those in flight) and goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partc.errors import PartcError, RunError
from partc.manifest import Manifest, manifest_stages, read_manifest
from partc.runtime.driver import Driver, stage_routes
from partc.runtime.local import load, load_programs
from partc.runtime.plans import from_manifest
from partc.runtime.transport import NO_SECURITY, GrpcChannel, InProcessChannel, Security
from partc.runtime.worker import Worker

log = logging.getLogger(__name__)

RTOL = 1e-5  # a result agrees when every output is within this fraction of its scale (max |expected|)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want|`` as a fraction of ``max |want|`` (infinite if the shapes differ)."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), np.finfo(np.float32).tiny))


@dataclass(frozen=True)
class FleetReport:
    """What a run of simulated devices measured.

    Attributes:
        devices: how many devices ran.
        requests: requests all devices made.
        latencies: seconds from each answered request's arrival to its result.
        seconds: from the first arrival to the last result.
        worst_error: the largest ``relative_error`` of any output; None when not verified.
        failures: why requests were lost, one line per failure.
    """

    devices: int
    requests: int
    latencies: tuple[float, ...]
    seconds: float
    worst_error: float | None
    failures: tuple[str, ...]

    @property
    def delivered(self) -> int:
        """Requests answered."""
        return len(self.latencies)

    @property
    def lost(self) -> int:
        """Requests without a result."""
        return self.requests - self.delivered

    @property
    def throughput(self) -> float:
        """Results per second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of latency, seconds (nan without results)."""
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> str:
        """One line: devices, results, throughput, p50/p99 latency, lost, and the verification."""
        checked = "" if self.worst_error is None else f", verified: worst relative error {self.worst_error:.2g}"
        return (f"{self.devices} devices: {self.delivered} of {self.requests} requests in {self.seconds:.2f} s, "
                f"{self.throughput:.1f} requests/s, latency p50 {self.percentile(50) * 1e3:.1f} ms "
                f"p99 {self.percentile(99) * 1e3:.1f} ms, {self.lost} lost{checked}")


def device_inputs(manifest: Manifest, device: int, count: int) -> list[dict[str, np.ndarray]]:
    """The inputs device ``device`` sends: ``count`` requests of the model's inputs, seeded by device."""
    rng = np.random.default_rng([device, count])
    return [{t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in manifest.inputs} for _ in range(count)]


def device_driver(build: Path | str, addresses: Mapping[str, str], security: Security = NO_SECURITY,
                  **options: object) -> Driver:
    """Return a driver for one device: the build's first stage runs in this process (its own copy
    of the programs), the later stages at ``addresses`` (stage -> host:port).

    ``options`` go to ``Driver`` (window, timeout, retry, margin).

    Raises:
        PartcError: if a later stage of the chain has no address.
        ManifestError: for a bad manifest or a missing or tampered artifact.
    """
    from partc.runtime.deploy import message_limit

    build = Path(build)
    manifest = read_manifest(build)
    first, *later = manifest.chain
    missing = [s.name for s in later if s.name not in addresses]
    if missing:
        raise PartcError(f"no address for stage {missing[0]!r}; give every stage after {first.name!r}")
    folder = build if build.is_dir() else build.parent
    mine = [s.name for s in manifest.stages if s.tier == first.tier]  # with the nodes that run its tiles
    stages = manifest_stages(manifest, folder, verify=mine)
    fns = load_programs(stages, mine, None, ThreadPoolExecutor(2, thread_name_prefix="partc-tiles"), threads=1)
    plans, hops = from_manifest(manifest, addresses)
    routes = stage_routes(plans, [t.name for t in manifest.inputs], [t.name for t in manifest.outputs],
                          [h.codec for h in hops])[first.name]
    limit = message_limit(manifest)
    channels = [GrpcChannel(s.name, addresses[s.name], security, limit) for s in later]
    worker = Worker(routes, {i: fns[p.programs[first.name]] for i, p in enumerate(plans) if first.name in p.programs},
                    channels[0] if channels else None, token=security.token, max_message=limit)
    return Driver([InProcessChannel(worker, security.token), *channels], plans,
                  [t.name for t in manifest.inputs], [t.name for t in manifest.outputs], hops=hops,
                  prices=manifest.prices, specs=manifest.inputs, max_message=limit, **options)


def run_fleet(
    build: Path | str,
    addresses: Mapping[str, str],
    *,
    devices: int,
    rate: float,
    requests: int,
    poisson: bool = True,
    verify: bool = False,
    security: Security = NO_SECURITY,
    **options: object,
) -> FleetReport:
    """Run ``devices`` simulated devices, each making ``requests`` requests at ``rate`` per second,
    against the later stages of ``build`` served at ``addresses``; see the module docstring.

    ``options`` go to each device's ``Driver`` (window, timeout, retry, margin).

    Raises:
        PartcError: for a count or rate below its minimum, or a stage without an address.
        ManifestError: for a bad manifest or a missing or tampered artifact.
    """
    if devices < 1 or requests < 1 or not rate > 0:
        raise PartcError(f"devices {devices}, requests {requests}, rate {rate}: each must be positive")
    manifest = read_manifest(build)
    drivers = [device_driver(build, addresses, security, **options) for _ in range(devices)]
    inputs = [device_inputs(manifest, d, requests) for d in range(devices)]
    results: list[dict[int, dict[str, np.ndarray]]] = [{} for _ in range(devices)]
    latencies: list[list[float]] = [[] for _ in range(devices)]
    failures: list[str] = []
    start = time.perf_counter() + 0.1
    threads = [threading.Thread(target=_device, name=f"partc-device-{d}", daemon=True,
                                args=(drivers[d], inputs[d], _arrivals(d, requests, rate, poisson, start),
                                      results[d], latencies[d], failures))
               for d in range(devices)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for driver in drivers:
            driver.close()
    seconds = time.perf_counter() - start
    worst = _worst_error(build, inputs, results) if verify else None
    return FleetReport(devices, devices * requests, tuple(x for d in latencies for x in d), seconds, worst,
                       tuple(failures))


def _worst_error(build: Path | str, inputs: Sequence[Sequence[Mapping[str, np.ndarray]]],
                 results: Sequence[Mapping[int, Mapping[str, np.ndarray]]]) -> float:
    """The largest ``relative_error`` of any output of any result against the in-process pipeline."""
    local = load(build)
    worst = 0.0
    for sent, answered in zip(inputs, results, strict=True):
        for i, got in answered.items():
            want = local(sent[i])
            worst = max([worst, *(relative_error(got[n], want[n]) for n in want)])
    return worst


def _arrivals(device: int, count: int, rate: float, poisson: bool, start: float) -> list[float]:
    """Scheduled arrival times (``perf_counter``) of a device's requests."""
    gaps = np.random.default_rng([device, 1]).exponential(1 / rate, count) if poisson else np.full(count, 1 / rate)
    return list(start + np.cumsum(gaps) - gaps[0])


def _device(driver: Driver, inputs: Sequence[Mapping[str, np.ndarray]], arrivals: Sequence[float],
            results: dict[int, dict[str, np.ndarray]], latencies: list[float], failures: list[str]) -> None:
    """Send ``inputs`` at their ``arrivals`` through ``driver``; record each result and its latency.

    When the driver gives up on a request, that request is lost; the device sends the ones
    after it again.
    """
    next_index = 0
    while next_index < len(inputs):
        base = next_index
        try:
            for i, result in enumerate(driver.run(_paced(inputs, arrivals, base)), start=base):
                latencies.append(time.perf_counter() - arrivals[i])
                results[i] = result
                next_index = i + 1
            return
        except RunError as err:  # the request after the last result is lost; the later ones are sent again
            failures.append(f"{threading.current_thread().name}: {err}")
            log.warning("%s: %s", threading.current_thread().name, err)
            next_index += 1


def _paced(inputs: Sequence[Mapping[str, np.ndarray]], arrivals: Sequence[float],
           base: int) -> Iterator[Mapping[str, np.ndarray]]:
    """Yield ``inputs[base:]``, each no earlier than its arrival."""
    for i in range(base, len(inputs)):
        time.sleep(max(0.0, arrivals[i] - time.perf_counter()))
        yield inputs[i]

