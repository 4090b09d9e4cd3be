"""A shared tier on Ray Serve: its stage's programs as deployments with replicas, dynamic
batching and autoscaling, behind partc's own gRPC ingress (``partc serve --engine ray``).

What runs where:

- The ingress is a partc worker (``partc.runtime.worker.Worker``) in the process that runs
  ``serve_tier``, on a machine of the tier's Ray cluster. Between tiers the wire stays partc's
  frame over gRPC with its token and TLS: the ingress checks the token, decodes the frame
  (nothing from the network is unpickled), computes the route of the frame's plan and
  forwards to the next stage. Its stage function for a plan is a call to the deployment of
  that plan's program, with numpy arrays (inside the tier's Ray cluster, Ray moves them).
  Requests run at once, not one at a time: the deployment queues and batches them.
- Each program of the tier's stage is one Serve application (``partc:<stage>:<program>``)
  of one deployment, whose replicas reserve ``cpus`` CPUs and a little of the Ray custom
  resource named after the tier: they run only on the tier's machines (start those with
  ``ray start --resources '{"cloud": 1}'``). A replica checks its artifact against the
  manifest's sha256 before loading it: the build (or the tier's bundle, ``partc unpack``)
  must be at the same path on every machine of the tier.
- Batching: a replica takes up to ``max_batch`` requests at once (``@serve.batch``). At start
  it checks that its program gives two requests concatenated on axis 0 the numbers it gives
  each alone (within ``partc.runtime.fleet.RTOL``); then it runs each batch as one call,
  else the batch's requests one by one. ONNX artifacts pass (exported with a symbolic batch
  axis), and TorchScript ones do unless fx baked a size into the code; TVM artifacts have
  fixed shapes and run one by one.
- Faults: a request whose replica dies is sent again (requests are idempotent), up to
  ``RETRIES`` times; Serve routes it to a live replica and replaces the dead one.

A tier with several nodes (tiled programs) is refused: Ray's replicas replace the tier's nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from partc.errors import PartcError
from partc.manifest import Manifest, StageEntry, manifest_stages, read_manifest
from partc.runtime.bundle import is_bundle, unpack
from partc.runtime.deploy import message_limit, stop_processes, wait_ready
from partc.runtime.driver import stage_routes
from partc.runtime.fleet import RTOL, relative_error
from partc.runtime.local import load_programs
from partc.runtime.ping import IDENTITY_PLAN, identity_route
from partc.runtime.plans import from_manifest
from partc.runtime.transport import NO_SECURITY, Security, StageServer
from partc.runtime.worker import serve_stage

if TYPE_CHECKING:
    import subprocess

    from partc.plan import Artifact, StageFn

log = logging.getLogger(__name__)

RETRIES = 5  # tries of a request whose replica died
CALL_TIMEOUT = 300.0  # seconds a request may wait for its replica, queueing included
INGRESS_THREADS = 64  # requests the ingress holds at once (each waits for its replica)
RAY_START_TIMEOUT = 600.0  # seconds for a tier's process to start Ray, its replicas and its ingress
TIER_RESOURCE = 0.001  # of the tier's custom resource, per replica: any machine of the tier takes many


@dataclass(frozen=True)
class TierServing:
    """How a shared tier serves its requests.

    Attributes:
        min_replicas, max_replicas: replicas of each program; equal: that many, else
            autoscaling between them.
        max_batch: most requests a replica runs as one batch.
        batch_wait: seconds a replica waits for a batch to fill.
        cpus: CPUs each replica reserves; its program runs that many compute threads.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    max_batch: int = 1
    batch_wait: float = 0.005
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1 or self.max_batch < 1:
            raise PartcError(f"replicas {self.min_replicas}, max batch {self.max_batch}: each must be at least 1")
        if self.max_replicas < self.min_replicas:
            raise PartcError(f"max replicas {self.max_replicas} is below min replicas {self.min_replicas}")
        if not self.cpus > 0 or self.batch_wait < 0:
            raise PartcError(f"cpus {self.cpus} must be positive and batch wait {self.batch_wait} s not negative")

    def options(self, tier: str) -> dict:
        """The deployment's options: replicas or autoscaling, the tier's resource, queue length."""
        replicas = ({"num_replicas": self.min_replicas} if self.min_replicas == self.max_replicas else
                    {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                            "target_ongoing_requests": self.max_batch}})
        # a replica takes every request the ingress holds: it queues them into batches itself (when
        # a full replica turns requests away, Serve's router retries each one, costing CPU per request)
        return {**replicas, "max_ongoing_requests": INGRESS_THREADS,
                "ray_actor_options": {"num_cpus": self.cpus, "resources": {tier: TIER_RESOURCE}}}


def tier_serving(manifest: Manifest, tier: str, replicas: int | None = None, min_replicas: int | None = None,
                 max_replicas: int | None = None, max_batch: int | None = None) -> TierServing:
    """The serving of ``tier``: replicas (a count, or autoscaling bounds) and batch limit, as given;
    what is not given comes from the cluster file's ``scaling`` of the tier (``replicas``,
    ``max_batch``), as the build records it.

    Raises:
        PartcError: for an unknown tier, both a count and bounds, or values below 1.
    """
    tier_stage(manifest, tier)
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise PartcError("give either a replica count or autoscaling bounds (min and max replicas), not both")
    (scaling,) = [t.scaling for t in manifest.tiers if t.name == tier]
    if replicas is None and min_replicas is None and max_replicas is None:
        min_replicas, max_replicas = scaling.min_replicas, scaling.max_replicas
    low = replicas or min_replicas or 1
    return TierServing(low, replicas or max_replicas or low, max_batch or scaling.max_batch)


def tier_stage(manifest: Manifest, tier: str) -> StageEntry:
    """The stage of ``tier`` (its one node).

    Raises:
        PartcError: for an unknown tier, or one with several nodes (tiled programs): Ray Serve
            runs one machine's program per replica; its replicas replace the tier's nodes.
    """
    tiers = [t.name for t in manifest.tiers]
    if tier not in tiers:
        raise PartcError(f"no tier {tier!r} in this build; tiers are: {', '.join(tiers)}")
    stage, *others = [s for s in manifest.stages if s.tier == tier]
    if others or stage.schedules:
        raise PartcError(f"tier {tier!r} has {1 + len(others)} nodes running tiled programs; Ray Serve runs one "
                         "machine's program per replica: compile with nodes: 1 for this tier")
    return stage


class ProgramReplica:
    """A replica of one program's deployment: loads the verified artifact, runs batches of requests."""

    def __init__(self, build: str, stage: str, program: str, serving: TierServing) -> None:
        from ray import serve

        manifest = read_manifest(build)
        folder = Path(build) if Path(build).is_dir() else Path(build).parent
        (mine,) = [s for s in manifest_stages(manifest, folder, verify=[stage]) if s.name == stage]
        mine = replace(mine, programs={program: mine.programs[program]}, schedules={})
        threads = max(1, int(serving.cpus))
        self._fn = load_programs([mine], [stage], None, ThreadPoolExecutor(1), threads)[program]
        self._joins = accepts_batches(self._fn, mine.programs[program])
        self._queue = serve.batch(max_batch_size=serving.max_batch, batch_wait_timeout_s=serving.batch_wait)(
            self._batch)

    async def __call__(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._queue(tensors)

    async def _batch(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return await asyncio.to_thread(self._compute, requests)  # the next batch fills meanwhile

    def _compute(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(requests) == 1 or not self._joins:
            return [self._fn(r) for r in requests]
        out = self._fn({n: np.concatenate([r[n] for r in requests]) for n in requests[0]})
        return [{n: v[i:i + 1] for n, v in out.items()} for i in range(len(requests))]


def accepts_batches(fn: StageFn, artifact: Artifact) -> bool:
    """Whether ``fn`` gives two requests concatenated on axis 0 the numbers it gives each alone.

    Only a program whose every input and output leads with a batch of one is tried.
    """
    if any(t.shape[:1] != (1,) for t in (*artifact.inputs, *artifact.outputs)):
        return False
    rng = np.random.default_rng(0)
    pair = [{t.name: rng.random(t.shape).astype(t.dtype) for t in artifact.inputs} for _ in range(2)]
    try:
        joined = fn({n: np.concatenate([p[n] for p in pair]) for n in pair[0]})
        alone = [fn(p) for p in pair]
    except Exception as err:  # fixed shapes: each backend says so in its own way
        log.info("%s: runs batches one request at a time (%s)", artifact.stage, str(err).splitlines()[0][:200])
        return False
    return all(relative_error(np.asarray(joined[t.name]), np.concatenate([a[t.name] for a in alone])) <= RTOL
               for t in artifact.outputs)


def local_cpus(manifest: Manifest, tier: str, serving: TierServing) -> int:
    """Logical CPUs a local Ray cluster of ``tier`` declares: this host's cores, or as many as every
    program's replicas reserve at most, if more (so that all are placed; they then share the cores)."""
    wanted = len(tier_stage(manifest, tier).programs) * serving.max_replicas * serving.cpus
    return max(os.cpu_count() or 1, math.ceil(wanted))


@contextlib.contextmanager
def ray_cluster(address: str | None, tier: str, cpus: int | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at ``address``, or start a local one (``cpus`` CPUs, default
    all) whose node is a machine of ``tier``; Serve runs without its HTTP proxy.

    On exit a local cluster is shut down (Serve first); from another, this process disconnects.
    """
    import ray
    from ray import serve

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, resources={tier: 1}, log_to_driver=False)
    try:
        if tier not in ray.cluster_resources():
            raise PartcError(f"the Ray cluster at {address} has no machine of tier {tier!r}: start its nodes with "
                             f"ray start --resources '{{\"{tier}\": 1}}'")
        serve.start(proxy_location="Disabled")
        yield
    finally:
        if not address:
            serve.shutdown()
        ray.shutdown()


@dataclass
class TierServer:
    """A tier served on Ray Serve: the gRPC ingress and the applications of its programs."""

    stage: str
    server: StageServer
    apps: tuple[str, ...]

    @property
    def address(self) -> str:
        """Where the ingress listens (host:port)."""
        return self.server.address

    def wait(self) -> None:
        """Block until the ingress stops."""
        self.server.wait()

    def stop(self) -> None:
        """Stop the ingress, then delete the tier's applications."""
        from ray import serve

        self.server.stop()
        for app in self.apps:
            serve.delete(app)


def serve_tier(
    build: Path | str,
    tier: str,
    serving: TierServing = TierServing(),
    *,
    listen: str = "127.0.0.1:0",
    next_address: str | None = None,
    security: Security = NO_SECURITY,
) -> TierServer:
    """Python twin of ``partc serve --engine ray``: serve ``tier`` of ``build`` on the Ray cluster
    this process is connected to (``ray_cluster``), behind a gRPC ingress on ``listen``.

    Args:
        build: the build folder, or the tier's bundle (checked and unpacked first).
        tier: tier name; its stage's programs become deployments.
        serving: replicas, autoscaling and batching of every program.
        listen: host:port of the ingress (port 0: any free port).
        next_address: host:port of the next stage's worker or ingress; needed unless the
            tier's stage is the last.
        security: token and TLS, for the ingress and its calls to the next stage.

    Raises:
        PartcError: for an unknown tier, a tier with tiled programs, or a missing address.
        ManifestError: for a bad manifest or a missing or tampered artifact.
    """
    from ray import serve

    build = unpack(build) if is_bundle(build) else Path(build)
    manifest = read_manifest(build)
    stage = tier_stage(manifest, tier)
    plans, hops = from_manifest(manifest)
    routes = stage_routes(plans, [t.name for t in manifest.inputs], [t.name for t in manifest.outputs],
                          [h.codec for h in hops])[stage.name]
    following = next((r.next_stage for r in routes.values() if r.next_stage), None)
    if following and not next_address:
        raise PartcError(f"stage {stage.name!r} forwards to {following!r}: give its address (--next HOST:PORT)")
    routes = {i: replace(r, next_address=next_address) if r.next_stage else r for i, r in routes.items()}
    manifest_stages(manifest, build if build.is_dir() else build.parent, verify=[stage.name])  # before deploying
    handles, apps = {}, []
    deployment = serve.deployment(ProgramReplica)
    for program in stage.programs:
        app = f"partc:{stage.name}:{program.id}"
        bound = deployment.options(name=program.id, **serving.options(tier)).bind(
            str(build.resolve()), stage.name, program.id, serving)
        handles[program.id] = serve.run(bound, name=app, route_prefix=None)
        apps.append(app)
    identity, answer = identity_route(stage.name, build)
    fns = {i: _remote(handles[plan.programs[stage.name]]) for i, plan in enumerate(plans)
           if stage.name in plan.programs}
    server = serve_stage(routes | {IDENTITY_PLAN: identity}, fns | {IDENTITY_PLAN: answer}, listen, security,
                         threads=INGRESS_THREADS, max_message=message_limit(manifest), exclusive=False)
    return TierServer(stage.name, server, tuple(apps))


def _remote(handle: object) -> StageFn:
    """The stage function that runs a request on ``handle``'s deployment, again if its replica dies."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    def call(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for attempt in range(1, RETRIES):
            try:
                return handle.remote(dict(tensors)).result(timeout_s=CALL_TIMEOUT)
            except (RayActorError, ReplicaUnavailableError) as err:
                log.warning("a replica died (%s); sending the request again", type(err).__name__)
                time.sleep(0.1 * attempt)
        return handle.remote(dict(tensors)).result(timeout_s=CALL_TIMEOUT)  # the last try fails the request

    return call


@dataclass
class RayTiers:
    """Every tier after the first of a build on Ray Serve, on this machine: one ``partc serve
    --engine ray`` process per tier, each with its own local Ray cluster (``partc run --engine ray``).

    Use as a context manager: started on entry (last tier first, so that each knows where to
    forward), stopped on exit, also on failure.
    """

    build: Path
    serving: TierServing = TierServing()
    token_file: Path | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __enter__(self) -> RayTiers:
        import subprocess
        import sys
        import tempfile

        chain = read_manifest(self.build).chain
        self._scratch = tempfile.TemporaryDirectory(prefix="partc-ray-")
        scratch = Path(self._scratch.name)
        try:
            next_address = None
            for stage in reversed(chain[1:]):
                ready, log_path = scratch / f"{stage.tier}.ready", scratch / f"{stage.tier}.log"
                argv = [sys.executable, "-m", "partc.cli", "serve", str(self.build), "--engine", "ray",
                        "--tier", stage.tier, "--ready-file", str(ready), *_flags(self.serving)]
                argv += ["--next", next_address] if next_address else []
                argv += ["--token-file", str(self.token_file)] if self.token_file else []
                with open(log_path, "wb") as log_file:
                    self.processes[stage.name] = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
                next_address = wait_ready(self.processes[stage.name], ready, log_path,
                                          f"Ray Serve tier {stage.tier!r}", RAY_START_TIMEOUT)["address"]
                self.addresses[stage.name] = next_address
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_processes(self.processes)
        self._scratch.cleanup()


def _flags(serving: TierServing) -> list[str]:
    """``partc serve`` flags giving ``serving``'s replicas and batch limit."""
    if serving.min_replicas == serving.max_replicas:
        replicas = ["--replicas", str(serving.min_replicas)]
    else:
        replicas = ["--min-replicas", str(serving.min_replicas), "--max-replicas", str(serving.max_replicas)]
    return [*replicas, "--max-batch", str(serving.max_batch)]
