"""An emulated testbed on one Linux host: every stage of a build in its own network namespace.

``Testbed(build)`` (root only) lays a build's chain out as it would run across machines
(``partc.runtime.layout``: the nodes, their hops and CPU shares), with the host's plumbing
(``partc.runtime.netns``: namespaces, tbf shaping, delay proxies, cgroups):

- **Namespaces.** Node ``i`` of the chain runs in namespace ``partc-<pid>-<n>-<i>`` (``n``
  tells apart the testbeds of one process). Consecutive nodes are joined by a veth pair,
  ``10.231.<i>.1`` (node ``i``) -- ``10.231.<i>.2`` (node ``i+1``). Every stage is reached
  at ``PORT`` on its veth address (its delay proxy, which passes on to the worker on its
  namespace's loopback; or the worker itself on an unshaped hop), so all addresses are
  known up front and all workers start at once.
- **Driver.** The driver stays in the calling process, in the root namespace, and reaches
  the chain through a Unix socket. When the chain starts with the driver's own node
  (``DRIVER``), that namespace holds a relay (the delay proxy with no delay) from the Unix
  socket over the shaped link(s) to stage 0.
- **Tiles.** A tier's further nodes get a namespace each, joined to their coordinator's by
  a veth of their own (``t<k>`` on the coordinator's side), and a CPU quota like any stage.
- **CPU.** Each worker is moved, once it listens, into the cgroup ``partc-<pid>-<n>-<i>``
  limited to its stage's share (``cpu_shares`` overrides it per stage): the cores of this host
  that run as fast as its target, at most the host's cores shared by the tier's nodes (they
  compute at once; the stages of a chain take turns). Loading runs
  unthrottled, so start-up stays quick. Proxies run outside the cgroups. A worker computes
  with as many threads as its share rounds up to (``partc serve --threads``): threads beyond
  the quota's cores would burn it in a fraction of each period and stall the rest.

- **Calibration.** A stage's predicted time is for its target; a quota emulates the target
  only where this host's cores reach its speed (``partc.runtime.layout.target_cores``). So
  before measuring, ``measure`` times every program of the primary plan on the node that
  runs it: in that node's cgroup, with its thread count, warm, the median of a few runs
  (``partc.profile.time_call``), one node after the other. It prices the plan again with
  those times and the links as shaped (``partc.partition.price``: ``Prediction.latency``,
  ``tiled_step_seconds`` for tile and branch steps, a call to another node of a tier at what
  ``calibrate_calls`` measures it costs between those nodes' workers under their quotas), so
  the report gives, per stage, link
  and end to end, the prediction for the target (the manifest's), the prediction for the
  emulated node (calibrated) and the measurement. The calibrated figures also price what
  the testbed does beyond the plan: the reply carrying the model's outputs back over every
  hop to the driver. What they leave out is what the runtime adds: framing, gRPC, proxies.

Everything made (workers, proxies, namespaces, cgroups) is removed on exit, also when
starting fails half-way.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from partc.errors import PartcError, RunError
from partc.ir import link_name
from partc.manifest import ProgramEntry, StageEntry, read_manifest
from partc.partition.price import LinkPrice, remote_call_seconds, tiled_step_seconds
from partc.profile import phase_pause
from partc.runtime.calibrate import PERIOD
from partc.runtime.deploy import START_TIMEOUT, connect_build, spawn_worker, stop_processes, wait_ready
from partc.runtime.driver import Driver
from partc.runtime.layout import DRIVER, Hop, chain, cpu_share, hops, target_cores, tile_hops
from partc.runtime.netns import (
    add_namespace,
    add_veth,
    check_privileges,
    make_cgroup,
    move_to_cgroup,
    remove_cgroup,
    remove_namespace,
    set_delay,
    set_rate,
    start_proxy,
)

SUBNET = "10.231"  # link i: SUBNET.i.1 (sender) -- SUBNET.i.2 (receiver), inside the namespaces only
PORT = 50051  # where a stage is reached on its veth (its proxy, or its worker on an unshaped hop)
WORKER_LISTEN = "127.0.0.1:50052"  # a proxied worker, on its namespace's loopback


class Testbed:
    """A build's stages in network namespaces, with shaped links and CPU quotas.

    Use as a context manager (see the module docstring); ``driver()`` connects to the
    chain, ``shape()`` re-shapes a link while it runs, ``measure()`` compares measured with
    predicted latency.

    Attributes:
        build: the build folder.
        hops: the links between consecutive stages, in chain order.
        shares: cores of this host each stage may use.
        addresses: stage -> where it is reached (stage 0: the driver's Unix socket).
        namespaces: node of ``chain`` (a stage, or ``DRIVER``) -> network namespace.
        processes: stage -> its worker process; proxies: node -> the delay proxy (or the
            driver's relay) in its namespace.
    """

    def __init__(self, build: Path | str, *, cpu_shares: Mapping[str, float] | None = None,
                 token_file: Path | None = None) -> None:
        """Describe the testbed of ``build``; nothing is made before ``__enter__``.

        Raises:
            ManifestError: for a bad manifest.
            PartcError: if ``cpu_shares`` names an unknown stage or a share is not positive.
        """
        self.build = Path(build)
        self.manifest = read_manifest(self.build)
        stages = self.manifest.stages
        names = [s.name for s in stages]
        overrides = dict(cpu_shares or {})
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise PartcError(f"--cpu-share {unknown[0]}: no such stage; stages are: {', '.join(names)}")
        bad = sorted(s for s, v in overrides.items() if not v > 0)
        if bad:
            raise PartcError(f"--cpu-share {bad[0]}={overrides[bad[0]]}: a share must be a positive fraction of a core")
        cores = len(os.sched_getaffinity(0))
        nodes = {s.tier: sum(t.tier == s.tier for t in stages) for s in stages}
        # a tier's nodes compute at once (tiles, branches): together they get at most this host's cores
        self.shares = {s.name: overrides.get(s.name) or cpu_share(s.target, cores / nodes[s.tier]) for s in stages}
        self.hops = hops(self.manifest)
        self.tile_hops = tile_hops(self.manifest)
        self.token_file = token_file
        prefix = f"partc-{os.getpid()}-{id(self) % 10_000}"
        nodes = [name for name, _ in chain(self.manifest)] + [h.dst for h in self.tile_hops]
        self.namespaces = {name: f"{prefix}-{i}" for i, name in enumerate(nodes)}
        self.addresses: dict[str, str] = {}
        self.peers: dict[str, dict[str, str]] = {}  # a tier's first node -> its further nodes' addresses
        self.listens: dict[str, str] = {}  # a chain stage -> where its worker listens, in its namespace
        self._cgroups: list[Path] = []
        self._made_ns: list[str] = []
        self.processes: dict[str, subprocess.Popen] = {}
        self.proxies: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Testbed:
        check_privileges()
        self._scratch = tempfile.TemporaryDirectory(prefix="partc-testbed-")
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self) -> None:
        entry = self._address(0).removeprefix("unix:")
        if len(os.fsencode(entry)) >= 108:  # sun_path: 108 bytes with the final NUL
            raise PartcError(f"testbed: the driver's socket {entry} is longer than a Unix socket path may be; "
                             "give the temporary folder a shorter path (TMPDIR)")
        nodes = list(self.namespaces)[: len(self.namespaces) - len(self.tile_hops)]
        for ns in self.namespaces.values():
            add_namespace(ns)
            self._made_ns.append(ns)
        for i, hop in enumerate(self.hops + self.tile_hops):
            add_veth(*self._ends(hop), f"{SUBNET}.{i}")
            if hop.bandwidth is not None:
                set_rate(self._ends(hop), hop.bandwidth)
        for name, share in self.shares.items():
            try:
                self._cgroups.append(make_cgroup(self.namespaces[name], share))
            except OSError as err:
                raise RunError(f"testbed: cannot make the cgroup {self.namespaces[name]} for stage {name!r}: "
                               f"{err}") from err
        scratch = Path(self._scratch.name)
        self.addresses = {name: self._address(i) for i, name in enumerate(nodes) if name != DRIVER}
        if nodes[0] == DRIVER:  # a relay on the first tier carries the driver's requests over the first link
            self.addresses[nodes[1]] = self._address(0)
            self._start_proxy(DRIVER, self._address(0), self._address(1), 0.0)
        waits = {}
        for k, hop in enumerate(self.tile_hops):  # a tier's further nodes, reached from its first
            address = f"{SUBNET}.{len(self.hops) + k}.2:{PORT}"
            self.addresses[hop.dst] = address
            self.peers.setdefault(hop.src, {})[hop.dst] = address
            waits[hop.dst] = self._spawn(hop.dst, scratch, WORKER_LISTEN if hop.bandwidth else address, None, {})
            if hop.bandwidth:
                self._start_proxy(hop.dst, address, WORKER_LISTEN, hop.latency)
        for i, name in enumerate(nodes):  # every address is known up front: start them all at once
            if name == DRIVER:
                continue
            listen = self.listens[name] = WORKER_LISTEN if self._proxied(i) else self._address(i)
            next_address = self._address(i + 1) if i + 1 < len(nodes) else None
            waits[name] = self._spawn(name, scratch, listen, next_address, self.peers.get(name, {}))
            if self._proxied(i):
                self._start_proxy(name, self._address(i), WORKER_LISTEN, self.hops[i - 1].latency)
        deadline = time.monotonic() + START_TIMEOUT
        while waits:  # the first worker to fail is reported at once
            for name, (process, ready, log_path) in list(waits.items()):
                if not ready.exists() and process.poll() is None and time.monotonic() > deadline:
                    raise RunError(f"worker for stage {name!r} did not start within {START_TIMEOUT:.0f} s")
                if ready.exists() or process.poll() is not None:
                    wait_ready(process, ready, log_path, f"worker for stage {name!r}")
                    self._limit(name, process)
                    del waits[name]
            time.sleep(0.05)
        for node, proxy in self.proxies.items():
            wait_ready(proxy, *self._proxy_files(node), f"delay proxy in the namespace of {node!r}")

    def _spawn(self, name: str, scratch: Path, listen: str, next_address: str | None,
               peers: Mapping[str, str]) -> tuple[subprocess.Popen, Path, Path]:
        prefix = ("ip", "netns", "exec", self.namespaces[name])
        return spawn_worker(self.build, name, scratch, listen=listen, next_address=next_address, peers=peers,
                            threads=self._threads(name), token_file=self.token_file, prefix=prefix,
                            processes=self.processes)

    def _threads(self, stage: str) -> int:
        """Compute threads of ``stage``'s worker: its share rounded up (more only burn the quota)."""
        return max(1, math.ceil(self.shares[stage] - 1e-6))

    def _ends(self, hop: Hop) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, device) at the veth's two ends: ``out``/``in`` on the chain, ``t<k>``/``in`` to a tile node."""
        out = f"t{self.tile_hops.index(hop)}" if hop in self.tile_hops else "out"
        return (self.namespaces[hop.src], out), (self.namespaces[hop.dst], "in")

    def _cgroup(self, stage: str) -> Path:
        return next(c for c in self._cgroups if c.name == self.namespaces[stage])

    def _limit(self, stage: str, process: subprocess.Popen) -> None:
        """Move every thread of ``stage``'s worker into its cgroup."""
        cgroup = self._cgroup(stage)
        try:
            move_to_cgroup(cgroup, process.pid)
        except OSError as err:
            raise RunError(f"testbed: cannot move the worker for stage {stage!r} into {cgroup}: {err}") from err

    def _proxied(self, i: int) -> bool:
        return i > 0 and self.hops[i - 1].bandwidth is not None

    def _address(self, i: int) -> str:
        """Where node ``i`` is reached: a Unix socket for the driver, else its end of the veth from node i-1."""
        return f"unix:{Path(self._scratch.name) / 'entry.sock'}" if i == 0 else f"{SUBNET}.{i - 1}.2:{PORT}"

    def _proxy_files(self, node: str) -> tuple[Path, Path]:
        scratch = Path(self._scratch.name)
        return scratch / f"proxy-{node}.ready", scratch / f"proxy-{node}.log"

    def _start_proxy(self, node: str, listen: str, to: str, delay: float) -> None:
        self.proxies[node] = start_proxy(self.namespaces[node], listen, to, delay, *self._proxy_files(node))

    def shape(self, link: str, bandwidth: float, latency: float | None = None) -> None:
        """Re-shape ``link`` (``"device.0->edge.0"``) to ``bandwidth`` bytes/s and, if given, ``latency`` s.

        Takes effect at once, also for transfers under way.

        Raises:
            PartcError: if ``link`` is not a shaped hop of this testbed or a value is not positive.
        """
        shaped = {f"{h.src}->{h.dst}": (i, h) for i, h in enumerate(self.hops + self.tile_hops)
                  if h.bandwidth is not None}
        if link not in shaped:
            raise PartcError(f"no shaped link {link!r} in this testbed; links are: {', '.join(shaped) or 'none'}")
        if not bandwidth > 0 or (latency is not None and latency < 0):
            raise PartcError(f"link {link!r}: bandwidth must be positive and latency not negative")
        i, hop = shaped[link]
        set_rate(self._ends(hop), bandwidth)
        hop = replace(hop, bandwidth=bandwidth, latency=hop.latency if latency is None else latency)
        if latency is not None:
            set_delay(self.proxies[hop.dst], latency)
        if i < len(self.hops):
            self.hops[i] = hop
        else:
            self.tile_hops[i - len(self.hops)] = hop

    def driver(self, **options: object) -> Driver:
        """Return a driver connected to the chain; ``options`` go to ``Driver`` (window, timeout...)."""
        return connect_build(self.build, self.addresses, **options)

    def calibrate(self) -> dict[str, float]:
        """Time every program of the primary plan on the node that runs it; return program id -> seconds.

        Each node's programs run in a process of their own inside the node's cgroup, with the
        node's thread count, on seeded inputs of their compiled shapes (``partc.runtime.calibrate``:
        ``CALIBRATION_WARMUP`` untimed calls, then the median of ``CALIBRATION_REPEATS``, each call
        followed by ``CALIBRATION_REST``: the node's quota refills between requests). Nodes are timed one after
        the other, while the workers wait, so they do not share this host's cores.

        Raises:
            RunError: if timing a node's programs fails.
        """
        seconds: dict[str, float] = {}
        for node, pids in self._programs().items():
            seconds.update(self._time_in(node, [node, *pids, "--threads", str(self._threads(node))]))
        return seconds

    def calibrate_calls(self, seconds: Mapping[str, float]) -> dict[str, float]:
        """Measure what one call from a tier's first node to another of its nodes costs besides its
        bytes and the program it runs (``LinkPrice.call``); return tier link -> seconds.

        A process in the first node's namespace and cgroup calls each of the primary plan's
        programs on every further node through that node's worker, as the first node's worker
        does (``CALIBRATION_WARMUP`` untimed calls, the median of ``CALIBRATION_REPEATS``); a
        call's price is its round trip less the program's calibrated ``seconds`` and its
        tensors' transfers over the shaped link; the tier's figure is the median over its calls.

        Raises:
            RunError: if a call fails.
        """
        programs, prices, calls = self._programs(), self._prices(), {}
        for coordinator, peers in self.peers.items():
            tier = self.manifest.stage(coordinator).tier
            link = prices[link_name(tier, tier)]
            extra = []
            for peer in peers:
                stage = self.manifest.stage(peer)
                trips = self._time_in(coordinator, [peer, *programs.get(peer, ()), "--at", json.dumps(peers)])
                for pid, trip in trips.items():
                    program = stage.program(pid)
                    bare = remote_call_seconds(seconds[pid], sum(t.nbytes for t in program.inputs),
                                               sum(t.nbytes for t in program.outputs), replace(link, call=0.0))
                    extra.append(max(0.0, trip - bare))
            if extra:
                calls[link.name] = statistics.median(extra)
        return calls

    def calibrate_overheads(self) -> dict[str, float]:
        """Measure what a request costs each stage of the primary plan besides its program and its
        tensors' transfers: decoding and encoding frames, gRPC; return stage -> seconds.

        A process in the stage's namespace and cgroup calls its worker's identity route
        (``partc.runtime.ping``: no program, no tensor in, 32 bytes out) as a request would reach
        it (``CALIBRATION_WARMUP`` untimed calls, the median of ``CALIBRATION_REPEATS``): caller
        and worker both run under the node's quota.

        Raises:
            RunError: if a call fails.
        """
        stages = self.manifest.plans[0].stages
        return {name: self._time_in(name, [name, "--identity", self.listens[name]])[name] for name in stages}

    def _time_in(self, node: str, args: Sequence[str]) -> dict[str, float]:
        """Run ``python -m partc.runtime.calibrate BUILD ARGS`` in ``node``'s cgroup (and, for calls,
        its namespace); return what it prints."""
        argv = [sys.executable, "-m", "partc.runtime.calibrate", str(self.build), *args]
        if "--at" in args or "--identity" in args:
            argv = ["ip", "netns", "exec", self.namespaces[node], *argv, *self._token_args()]
        # the shell joins the cgroup, then becomes the timing process: it runs under the quota from its start
        joined = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self._cgroup(node) / "cgroup.procs"), *argv]
        done = subprocess.run(joined, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RunError(f"testbed: timing the programs of stage {args[0]!r} on {node!r} failed: {last}")
        return json.loads(done.stdout)

    def _token_args(self) -> list[str]:
        return ["--token-file", str(self.token_file)] if self.token_file else []

    def _programs(self) -> dict[str, list[str]]:
        """Node -> the program ids it runs in the primary plan (a tiled program: each step's, on its node)."""
        primary = self.manifest.plans[0]
        out: dict[str, list[str]] = {}
        for stage in self.manifest.chain:
            pid = primary.programs.get(stage.name)
            program = stage.program(pid) if pid else None
            if isinstance(program, ProgramEntry):
                out.setdefault(stage.name, []).append(pid)
            elif program is not None:
                for ids in program.steps:
                    for t, step in enumerate(ids):
                        out.setdefault(f"{stage.tier}.{t}", []).append(step)
        return out

    def _prices(self, calls: Mapping[str, float] | None = None) -> dict[str, LinkPrice]:
        """Every cluster link as priced, with the bandwidth and latency its hop is shaped to now, and the
        cost of a call over it where ``calls`` (link -> seconds, ``calibrate_calls``) measured it."""
        prices = {lk.name: replace(lk.price, call=(calls or {}).get(lk.name, lk.call)) for lk in self.manifest.links}
        for hop in self.hops + self.tile_hops:
            if hop.bandwidth is not None and hop.key in prices:
                prices[hop.key] = replace(prices[hop.key], bandwidth=hop.bandwidth, latency=hop.latency)
        return prices

    def _stage_seconds(self, stage: StageEntry, pid: str, seconds: Mapping[str, float],
                       prices: Mapping[str, LinkPrice]) -> float:
        """The calibrated seconds of ``stage`` running program ``pid``: its time, or its steps priced in turn."""
        program = stage.program(pid)
        if isinstance(program, ProgramEntry):
            return seconds[pid]
        total = 0.0
        for ids in program.steps:
            compute = [seconds[step] for step in ids]
            if len(ids) == 1:
                total += compute[0]
                continue
            specs = [self.manifest.stage(f"{stage.tier}.{t}").program(step) for t, step in enumerate(ids)]
            scatter = [sum(t.nbytes for t in p.inputs) for p in specs]
            gather = [sum(t.nbytes for t in p.outputs) for p in specs]
            total += tiled_step_seconds(compute, scatter, gather, prices[link_name(stage.tier, stage.tier)])
        return total

    def measure(self, requests: int = 10, inputs: Mapping[str, np.ndarray] | None = None,
                warmup: int = 2) -> TestbedReport:
        """Calibrate (``calibrate``), then run ``warmup`` + ``requests`` requests one after another
        (no pipelining; after each a pause of a share of the quotas' period that differs from
        request to request, so that requests start at phases spread over it as the calibration's
        calls do, not at the one phase a steady cadence locks them to) and compare.

        ``inputs`` default to the compiled shapes' seeded example. The warm-up requests run
        on a driver of their own; the timed ones on a fresh driver after one untimed request.
        A stage's measured time is the median over the timed requests of the compute seconds
        its worker reports; links report the mean of the timed transfers.

        Raises:
            PartcError: if ``requests`` < 1.
            RunError: if a request or the calibration fails.
        """
        if requests < 1:
            raise PartcError(f"--requests must be at least 1, got {requests}")
        if inputs is None:
            from partc.trace import parse_input_spec

            inputs = {t.name: parse_input_spec(",".join(map(str, t.shape)) + f":{t.dtype}").example().numpy()
                      for t in self.manifest.inputs}
        seconds = self.calibrate()
        calls = self.calibrate_calls(seconds)
        overheads = self.calibrate_overheads()
        primary = self.manifest.plans[0]
        prices = self._prices(calls)
        calibrated_compute = dict(primary.predicted.compute)
        stage_calibrated = {}
        for stage in self.manifest.chain:
            if stage.name in primary.programs:
                stage_calibrated[stage.name] = self._stage_seconds(stage, primary.programs[stage.name], seconds, prices)
                calibrated_compute[stage.tier] = stage_calibrated[stage.name]
        calibrated = replace(primary.predicted, compute=calibrated_compute)
        chain_prices = [prices[lk.name] for lk in self.manifest.prices]
        target_transfer = primary.predicted.transfer(self.manifest.prices)
        calibrated_transfer = calibrated.transfer(chain_prices)
        # The reply carries the model's outputs back over every hop the request crossed, to the driver.
        reply_bytes = sum(t.nbytes for t in self.manifest.outputs)
        crossed = {h.key: sum(calibrated_transfer.get(k, 0.0) + prices[k].transfer_seconds(reply_bytes)
                              for k in h.key.split(","))
                   for h in self.hops if h.dst in primary.stages and h.key}
        with self.driver(window=1, margin=math.inf) as driver:
            for _ in range(warmup):
                driver.run_one(inputs)
        # A fresh driver that stays on the primary plan (margin inf), the one the predictions are for; with
        # alpha 1 its stage estimates are the last request's, one sample per request.
        with self.driver(window=1, margin=math.inf, alpha=1.0) as driver:
            driver.run_one(inputs)  # opens the driver's connection
            before = {k: (e.total_bytes, e.total_seconds, e.count) for k, e in driver.links.items()}
            latencies = []
            samples: dict[str, list[float]] = {}
            for i in range(requests):
                start = time.perf_counter()
                driver.run_one(inputs)
                latencies.append(time.perf_counter() - start)
                for name, estimate in driver.compute.items():
                    samples.setdefault(name, []).append(estimate.value)
                time.sleep(phase_pause(i, PERIOD))  # requests start at phases spread over the quotas' period
            links = []
            for hop in self.hops:
                key = f"{hop.src}->{hop.dst}"
                est = driver.links.get(key)
                if est is None:  # the primary plan's chain stops before this hop
                    continue
                nbytes, wire, count = (now - then for now, then in
                                       zip((est.total_bytes, est.total_seconds, est.count),
                                           before.get(key, (0, 0.0, 0)), strict=True))
                # The driver's link seconds exclude the round trip's latency: put it back.
                links.append(LinkRow(key, hop.key or "(same tier)", hop.bandwidth, hop.latency, hop.predicted_bytes,
                                     nbytes / count,
                                     sum(target_transfer.get(k, 0.0) for k in hop.key.split(",") if k),
                                     crossed.get(hop.key, 0.0), wire / count + 2 * hop.latency, nbytes / wire))
        stages = []
        for s in self.manifest.stages:
            program = s.program(primary.programs[s.name]) if s.name in primary.programs else None
            measured = samples.get(s.name)
            stages.append(StageRow(s.name, s.target, self.shares[s.name], target_cores(s.target),
                                   program.predicted_s if program else 0.0, stage_calibrated.get(s.name, 0.0),
                                   overheads.get(s.name, 0.0), statistics.median(measured) if measured else 0.0))
        return TestbedReport(requests, os.getloadavg()[0], primary.predicted.latency(self.manifest.prices),
                             sum(calibrated.compute.values()) + sum(crossed.values()) + sum(overheads.values()),
                             statistics.median(latencies), min(latencies), stages, links,
                             [CallRow(lk.name, lk.call, calls[lk.name])
                              for lk in self.manifest.links if lk.name in calls])

    def __exit__(self, *exc: object) -> None:
        stop_processes(self.processes)
        for proxy in self.proxies.values():
            if proxy.stdin:
                proxy.stdin.close()
        stop_processes(self.proxies)
        errors = []
        for cgroup in reversed(self._cgroups):
            try:
                remove_cgroup(cgroup)
            except OSError as err:
                errors.append(f"{cgroup}: {err}")
        for ns in reversed(self._made_ns):
            try:
                remove_namespace(ns)
            except RunError as err:
                errors.append(str(err))
        self._cgroups, self._made_ns = [], []
        self._scratch.cleanup()
        if errors and exc[0] is None:
            raise RunError("testbed: could not clean up: " + "; ".join(errors))


@dataclass(frozen=True)
class StageRow:
    """One stage in a ``TestbedReport``: ``share`` cores of this host, of the ``target_cores`` that
    would run at its target's speed; compute seconds predicted for the target (the manifest's),
    for the emulated node (calibrated) and measured (median per request); ``overhead_s``: what a
    request costs the stage besides its program and transfers, measured under its quota
    (``Testbed.calibrate_overheads``; the calibrated end to end counts it)."""

    stage: str
    target: str
    share: float
    target_cores: float
    predicted_s: float
    calibrated_s: float
    overhead_s: float
    measured_s: float

    @property
    def emulates_target(self) -> bool:
        """Whether the stage's quota runs it at its target's speed (it may not: too fast, or overridden)."""
        return math.isclose(self.share, self.target_cores, rel_tol=0.01)


@dataclass(frozen=True)
class LinkRow:
    """One hop in a ``TestbedReport``, per request; bandwidths in bytes/s.

    ``predicted_s``: the plan's forward transfer at the cluster file's links (the manifest's);
    ``calibrated_s``: the forward transfer and the reply (the model's outputs, on their way back
    to the driver) at the links as shaped now; ``measured_s``: both on the wire, latency both ways.
    """

    link: str
    plan_link: str
    bandwidth: float | None
    latency_s: float
    predicted_bytes: int
    measured_bytes: float
    predicted_s: float
    calibrated_s: float
    measured_s: float
    measured_bandwidth: float


@dataclass(frozen=True)
class CallRow:
    """A call from a tier's first node to another of its nodes, besides its bytes and program
    (``LinkPrice.call``): priced for the target (the manifest's) and measured under the quotas
    (``Testbed.calibrate_calls``: the calibrated prices use it)."""

    link: str
    predicted_s: float
    calibrated_s: float


@dataclass(frozen=True)
class TestbedReport:
    """Measured vs predicted latency of a build in the testbed: end to end, per stage, per link.

    Two predictions: for the targets (``predicted_s``, the manifest's) and for the nodes the
    testbed emulates (``calibrated_s``: the plan priced with its programs timed under their
    nodes' quotas). Predicted link bytes count what the plan sends forward; measured ones also
    count the reply travelling back. ``load_average``: this host's, after the run.
    """

    requests: int
    load_average: float
    predicted_s: float
    calibrated_s: float
    measured_s: float  # median
    measured_min_s: float
    stages: list[StageRow]
    links: list[LinkRow]
    calls: list[CallRow]

    def to_json(self) -> dict:
        """Return the report as a JSON-ready dict, its keys unit-suffixed (``partc.output.with_units``)."""
        from partc.output import with_units

        data = asdict(self)
        for row, stage in zip(data["stages"], self.stages, strict=True):
            row["emulates_target"] = stage.emulates_target
        return with_units(data, {"bandwidth": "bandwidth_mbit_s", "measured_bandwidth": "measured_bandwidth_mbit_s"})

    def notes(self) -> list[str]:
        """One line per stage whose quota does not run it at its target's speed."""
        return [f"{s.stage} ({s.target}): its target runs as fast as {s.target_cores:.2f} cores of this host, "
                f"its quota gives {s.share:.2f}: the target is not emulated; compare the measurement with the "
                "calibrated prediction" for s in self.stages if not s.emulates_target]

    def table(self) -> str:
        """Return the report as aligned text."""
        lines = [f"{self.requests} requests, one at a time (load average {self.load_average:.1f}): end to end "
                 f"predicted for the targets {self.predicted_s * 1e3:.1f} ms, for the emulated nodes (calibrated) "
                 f"{self.calibrated_s * 1e3:.1f} ms; measured {self.measured_s * 1e3:.1f} ms (median; min "
                 f"{self.measured_min_s * 1e3:.1f}), measured / calibrated "
                 f"{_ratio(self.measured_s, self.calibrated_s)}",
                 f"{'stage':<12} {'target':<12} {'cores':>5} {'needs':>6} {'target ms':>10} {'calib ms':>9} "
                 f"{'ovh ms':>7} {'meas ms':>9} {'meas/calib':>10}"]
        lines += [f"{s.stage:<12} {s.target:<12} {s.share:5.2f} {s.target_cores:6.2f} {s.predicted_s * 1e3:10.2f} "
                  f"{s.calibrated_s * 1e3:9.2f} {s.overhead_s * 1e3:7.2f} {s.measured_s * 1e3:9.2f} "
                  f"{_ratio(s.measured_s, s.calibrated_s):>10}" for s in self.stages]
        lines.append(f"{'link':<24} {'Mbit/s':>7} {'lat ms':>6} {'pred KB':>8} {'meas KB':>8} {'target ms':>9} "
                     f"{'calib ms':>8} {'meas ms':>8} {'meas Mbit/s':>11}")
        for k in self.links:
            rate = f"{k.bandwidth * 8e-6:7.1f}" if k.bandwidth else f"{'-':>7}"
            lines.append(f"{k.link:<24} {rate} {k.latency_s * 1e3:6.1f} {k.predicted_bytes / 1e3:8.1f} "
                         f"{k.measured_bytes / 1e3:8.1f} {k.predicted_s * 1e3:9.2f} {k.calibrated_s * 1e3:8.2f} "
                         f"{k.measured_s * 1e3:8.2f} {k.measured_bandwidth * 8e-6:11.2f}")
        lines += [f"a call over {c.link}: {c.predicted_s * 1e3:.2f} ms for the target, {c.calibrated_s * 1e3:.2f} ms "
                  "measured under the quotas (calibrated)" for c in self.calls]
        return "\n".join([*lines, *(f"note: {n}" for n in self.notes())])


def _ratio(measured: float, predicted: float) -> str:
    return f"{measured / predicted:.2f}" if predicted else "-"
