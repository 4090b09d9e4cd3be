"""A compiled build over gRPC: serve one stage (``partc serve``), start all of them on this
machine, and connect a driver (``partc run --distributed``).

Every stage of a build is served by its own worker; the workers form the chain that
``partc.runtime.driver`` describes. A worker serves its stage in every plan of the build
(``partc.runtime.plans``): it verifies its own programs' artifacts against the manifest's
sha256 before loading them, and holds nothing but those artifacts and the manifest.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from partc.errors import PartcError, RunError
from partc.manifest import Manifest, ManifestStage, manifest_stages, read_manifest
from partc.partition.price import remote_call_seconds
from partc.runtime.bundle import bundle, is_bundle, unpack  # noqa: F401  (bundle: the API twin of partc bundle)
from partc.runtime.driver import Driver, connect, stage_routes
from partc.runtime.local import load_programs
from partc.runtime.ping import IDENTITY_PLAN, identity_route
from partc.runtime.plans import from_manifest
from partc.runtime.routes import Route
from partc.runtime.transport import (
    DEFAULT_RETRY,
    HEALTH,
    NO_SECURITY,
    GrpcChannel,
    RetryPolicy,
    Security,
    StageServer,
    call_stage,
)
from partc.runtime.watch import NodeWatch
from partc.runtime.wire import Frame, decode, encode, frame_limit
from partc.runtime.worker import serve_stage
from partc.tiling.schedule import TileCall

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds for a worker process to load its artifact and listen
TILE_TIMEOUT = 60.0  # seconds for a tier's other node to answer a tile
PEER_CHECK_TIMEOUT = 1.0  # seconds for a tier's other node to answer a health check


def _folder(build: Path | str) -> Path:
    build = Path(build)
    return build if build.is_dir() else build.parent


def serve(
    build: Path | str,
    stage: str,
    *,
    listen: str = "127.0.0.1:0",
    next_address: str | None = None,
    peers: Mapping[str, str] | None = None,
    security: Security = NO_SECURITY,
    threads: int = 0,
    qemu_sysroot: Path | None = None,
) -> StageServer:
    """Python twin of ``partc serve``: serve ``stage`` of ``build`` over gRPC.

    Besides the build's plans the worker serves the identity route that ``partc ping``
    calls (``partc.runtime.ping``). Listening beyond loopback without a token (or without
    TLS) is logged as a warning.

    Args:
        build: the build folder (only the manifest and this stage's artifacts are needed), or
            a bundle (``partc bundle``), checked and unpacked first (``partc.runtime.bundle.unpack``).
        stage: stage name (``edge.0``).
        listen: host:port to listen on (port 0: any free port; see ``StageServer.address``).
        next_address: host:port of the next stage's worker; required unless ``stage`` is last.
        peers: stage -> host:port of the tier's other nodes (``edge.1``) that run tiles for
            ``stage``; required when it has tiled programs.
        security: token and TLS files, for both this server and its calls to other stages.
        threads: compute threads of its programs (0: the backend's default, every core).
        qemu_sysroot: the target's Python (``examples/qemu/make-sysroot.sh``) in which a TVM
            program compiled for another architecture runs here under qemu-user.

    Raises:
        ManifestError: for a bad manifest or a missing or tampered artifact.
        PartcError: for an unknown stage, a missing address, or a bad bundle.
    """
    build = unpack(build) if is_bundle(build) else Path(build)
    manifest = read_manifest(build)
    names = [s.name for s in manifest.stages]
    if stage not in names:
        raise PartcError(f"no stage {stage!r} in this build; stages are: {', '.join(names)}")
    stages = manifest_stages(manifest, _folder(build), verify=[stage])
    (mine,) = [s for s in stages if s.name == stage]
    _warn_if_open(stage, listen, security)
    identity, answer = identity_route(stage, build)
    pool = ThreadPoolExecutor(8, thread_name_prefix="partc-tiles")
    if mine.index > 0:  # a further node of its tier: one route per tile program, keyed by its position
        fns = load_programs(stages, [stage], None, pool, threads, qemu_sysroot=qemu_sysroot)
        routes = {k: Route(stage, tuple(t.name for t in a.inputs), tuple(t.name for t in a.outputs),
                           results=tuple(t.name for t in a.outputs))
                  for k, (pid, a) in enumerate(mine.programs.items())}
        return serve_stage(routes | {IDENTITY_PLAN: identity},
                           {k: fns[pid] for k, pid in enumerate(mine.programs)} | {IDENTITY_PLAN: answer},
                           listen, security, max_message=message_limit(manifest))
    plans, hops = from_manifest(manifest)
    routes = stage_routes(plans, [t.name for t in manifest.inputs], [t.name for t in manifest.outputs],
                          [h.codec for h in hops])[stage]
    if any(r.next_stage for r in routes.values()):
        following = routes[next(i for i, r in routes.items() if r.next_stage)].next_stage
        if not next_address:
            raise PartcError(f"stage {stage!r} forwards to {following!r}: give its address (--next HOST:PORT)")
        routes = {i: replace(r, next_address=next_address) if r.next_stage else r for i, r in routes.items()}
    call, unreachable, watch = None, tuple, None
    if mine.schedules:
        call, unreachable = tile_call(stages, mine, dict(peers or {}), security)
        watch = node_watch(manifest, mine.tier)
    fns = load_programs(stages, [stage], call, pool, threads, watch.observe if watch else None,
                        qemu_sysroot=qemu_sysroot)
    return serve_stage(routes | {IDENTITY_PLAN: identity},
                       {i: fns[plan.programs[stage]] for i, plan in enumerate(plans) if stage in plan.programs}
                       | {IDENTITY_PLAN: answer}, listen, security, max_message=message_limit(manifest),
                       unreachable=(lambda: sorted({*unreachable(), *watch.slow()})) if watch else unreachable)


def _warn_if_open(stage: str, listen: str, security: Security) -> None:
    """Warn when ``listen`` reaches beyond loopback without a token, or with a token but no TLS."""
    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if security.token is None:
        log.warning("stage %s listens on %s without a token: anyone who reaches that port can run it; give every "
                    "stage and the driver the same --token-file (README: Deploying to real machines)", stage, listen)
    elif security.cert is None:
        log.warning("stage %s listens on %s without TLS: its token crosses the network in clear; give --cert and "
                    "--key (README: Deploying to real machines)", stage, listen)


def tile_call(stages: Sequence[ManifestStage], coordinator: ManifestStage, peers: Mapping[str, str],
               security: Security) -> tuple[TileCall, Callable[[], list[str]]]:
    """Return the ``TileCall`` of a tiled stage (program ``pid`` on node t goes to ``<tier>.<t>``'s
    worker), and a function naming those nodes that do not answer a health check now."""
    nodes = {s.index: s for s in stages if s.tier == coordinator.tier and s.index > 0}
    missing = sorted(s.name for s in nodes.values() if s.name not in peers)
    if missing:
        raise PartcError(f"stage {coordinator.name!r} runs tiles on {', '.join(missing)}: give their addresses "
                         f"(--peer {missing[0]}=HOST:PORT)")
    channels = {t: GrpcChannel(s.name, peers[s.name], security) for t, s in nodes.items()}
    keys = {t: {pid: k for k, pid in enumerate(s.programs)} for t, s in nodes.items()}

    def call(t: int, pid: str, tensors: Mapping) -> dict:
        payload = encode(Frame(0, tensors, plan=keys[t][pid]))
        reply = decode(call_stage(channels[t], payload, time.monotonic() + TILE_TIMEOUT, DEFAULT_RETRY))
        return dict(reply.tensors)

    def unreachable() -> list[str]:
        down = []
        for t, channel in channels.items():
            try:
                call_stage(channel, b"", time.monotonic() + PEER_CHECK_TIMEOUT, RetryPolicy(attempts=1), HEALTH)
            except RunError:
                down.append(nodes[t].name)
        return down

    return call, unreachable


def node_watch(manifest: Manifest, tier: str) -> NodeWatch:
    """The ``NodeWatch`` of ``tier``'s first node: each program of its nodes predicted as the manifest
    prices it, a further node's as a call over the tier's link (its tensors' transfers and the call)."""
    link = next(lk.price for lk in manifest.links if (lk.src, lk.dst) == (tier, tier))
    nodes = [s for s in manifest.stages if s.tier == tier]
    predicted = {p.id: remote_call_seconds(p.predicted_s, sum(t.nbytes for t in p.inputs),
                                           sum(t.nbytes for t in p.outputs), link) if s.index else p.predicted_s
                 for s in nodes for p in s.programs}
    return NodeWatch({s.index: s.name for s in nodes}, predicted)


def message_limit(manifest: Manifest) -> int:
    """Return the most bytes a frame of this build can take (``wire.frame_limit``): every tensor the
    manifest names (model inputs and outputs, programs' inputs and outputs), all in one frame.

    A worker refuses larger requests before reading them, and a caller larger replies.
    """
    sizes: dict[str, int] = {}
    specs = [*manifest.inputs, *manifest.outputs]
    specs += [t for s in manifest.stages for p in (*s.programs, *s.schedules) for t in (*p.inputs, *p.outputs)]
    for t in specs:
        sizes[t.name] = max(sizes.get(t.name, 0), math.prod(t.shape) * np.dtype(t.dtype).itemsize)
    return frame_limit(sizes.items())


def connect_build(
    build: Path | str, addresses: Mapping[str, str], security: Security = NO_SECURITY, **options: object
) -> Driver:
    """Return a driver for the workers serving every stage of ``build`` at ``addresses``.

    ``options`` go to ``partc.runtime.driver.Driver`` (window, timeout, retry, alpha, margin).
    The driver checks inputs against the model's input shapes and dtypes, and refuses
    replies larger than ``message_limit``.

    Raises:
        PartcError: if a stage has no address, or an address names no stage.
    """
    manifest = read_manifest(build)
    names = [s.name for s in manifest.stages]
    unknown = sorted(set(addresses) - set(names))
    if unknown:
        raise PartcError(f"no stage {unknown[0]!r} in this build; stages are: {', '.join(names)}")
    missing = [s.name for s in manifest.chain if s.name not in addresses]
    if missing:
        raise PartcError(f"no address for stage {missing[0]!r}; give every stage as --connect STAGE=HOST:PORT")
    plans, hops = from_manifest(manifest, addresses)
    return connect(plans, [t.name for t in manifest.inputs], [t.name for t in manifest.outputs], security,
                   hops=hops, prices=manifest.prices, specs=manifest.inputs, max_message=message_limit(manifest),
                   **options)


@dataclass
class LocalWorkers:
    """Every stage of a build as its own ``partc serve`` process on loopback.

    Use as a context manager: the processes are started on entry (the nodes that run
    tiles first, then the chain, last stage first, so that each knows where to forward) and
    stopped on exit, also on failure.
    """

    build: Path
    token_file: Path | None = None
    qemu_sysroot: Path | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __enter__(self) -> LocalWorkers:
        stages: Sequence[ManifestStage] = manifest_stages(read_manifest(self.build), _folder(self.build), verify=())
        self._scratch = tempfile.TemporaryDirectory(prefix="partc-workers-")
        try:
            next_address = None
            # the tier's other nodes (they run tiles) first, then the chain from its last stage
            for stage in sorted(reversed(stages), key=lambda s: s.index == 0):
                peers = {s.name: self.addresses[s.name] for s in stages
                         if s.tier == stage.tier and s.index > 0 and stage.schedules}
                process, ready, log_path = spawn_worker(self.build, stage.name, Path(self._scratch.name),
                                                        next_address=next_address if stage.index == 0 else None,
                                                        peers=peers, token_file=self.token_file,
                                                        qemu_sysroot=self.qemu_sysroot, processes=self.processes)
                address = wait_ready(process, ready, log_path, f"worker for stage {stage.name!r}")["address"]
                self.addresses[stage.name] = address
                next_address = address if stage.index == 0 else next_address
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_processes(self.processes)
        self._scratch.cleanup()


def spawn_worker(
    build: Path | str,
    stage: str,
    scratch: Path,
    *,
    listen: str = "127.0.0.1:0",
    next_address: str | None = None,
    peers: Mapping[str, str] | None = None,
    threads: int = 0,
    token_file: Path | None = None,
    qemu_sysroot: Path | None = None,
    prefix: Sequence[str] = (),
    processes: dict[str, subprocess.Popen] | None = None,
) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``partc serve`` for ``stage`` of ``build`` without waiting for it.

    The command is ``prefix`` (e.g. ``ip netns exec NS``) followed by ``python -m partc.cli
    serve``; its output goes to ``scratch/<stage>.log``. The process is put in
    ``processes[stage]`` as soon as it exists, so the caller stops it on any failure.
    Returns the process, its ready file and its log file (for ``wait_ready``).
    """
    ready, log_path = scratch / f"{stage}.ready", scratch / f"{stage}.log"
    ready.unlink(missing_ok=True)  # an earlier worker's: this one has not started yet
    argv = [*prefix, sys.executable, "-m", "partc.cli", "serve", str(build), "--stage", stage,
            "--listen", listen, "--ready-file", str(ready)]
    argv += ["--next", next_address] if next_address else []
    argv += [arg for name, address in (peers or {}).items() for arg in ("--peer", f"{name}={address}")]
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--token-file", str(token_file)] if token_file else []
    argv += ["--qemu-sysroot", str(qemu_sysroot)] if qemu_sysroot else []
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    if processes is not None:
        processes[stage] = process
    return process, ready, log_path


def wait_ready(process: subprocess.Popen, ready: Path, log_path: Path, what: str,
               timeout: float = START_TIMEOUT) -> dict:
    """Wait until ``process`` writes its JSON ``ready`` file; return what it wrote.

    Raises:
        RunError: naming ``what``, with the last line of ``log_path``, if the process exits
            first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise RunError(f"{what} did not start: {tail[0]}")
        time.sleep(0.05)
    return json.loads(ready.read_text())


def stop_processes(processes: Mapping[str, subprocess.Popen]) -> None:
    """Terminate every process of ``processes`` (name -> process); kill those still running 10 s later."""
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process %s did not stop; killing it", name)
            process.kill()
            process.wait()
