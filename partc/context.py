"""``CompileContext``: the one way configuration reaches a pass or a backend.

It is built from the cluster file (``partc.cluster.load_cluster``, which documents the
file's syntax) and the command line, and is frozen: passes and backends read it, never
change it. This module holds only the types, so that any module may import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from partc.errors import PartcError

OBJECTIVES = ("latency", "throughput")  # what a plan minimises: end-to-end latency, or the pipeline's bottleneck


@dataclass(frozen=True)
class Scaling:
    """How many requests reach a tier and how it serves them (``partc.partition.load`` prices it).

    Distinct from ``Tier.nodes``, the machines of each instance: a tiled plan serves one request
    on them together (tiles, branches), otherwise they host its replicas (a replica takes a
    machine: ``partc.partition.load``); instances and replicas are copies that serve different
    requests.

    Attributes:
        instances: independent copies of the tier, each feeding the next tier (50 cameras);
            the requests reaching a tier are spread evenly over its instances.
        rate: requests per second each instance of the first tier makes; None: no load
            given, plans are priced for one request at a time (latency only).
        min_replicas, max_replicas: replicas of each instance serving its requests
            (equal: a fixed count; else autoscaling bounds).
        max_batch: most requests one replica runs as one batch.
    """

    instances: int = 1
    rate: float | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    max_batch: int = 1


@dataclass(frozen=True)
class Tier:
    """One tier of the deployment, in data-flow order.

    Attributes:
        name: the tier's name in the cluster file ("device", "edge", "cloud", ...).
        target: hardware description, a key of ``partc.targets.TARGETS``.
        backend: artifact format, a key of ``partc.targets.BACKENDS``.
        nodes: how many machines of this kind the tier has (edge tiling uses them).
        scaling: its instances, request rate, replicas and batch limit.
    """

    name: str
    target: str
    backend: str
    nodes: int = 1
    scaling: Scaling = Scaling()


@dataclass(frozen=True)
class Link:
    """A network link between two tiers (data moves only from ``src`` to ``dst``), or, when
    ``src == dst``, between the nodes of one tier.

    Attributes:
        bandwidth: bytes per second.
        latency: one-way latency in seconds.
        codecs: canonical codec names (``partc.codec``) allowed on this link.
    """

    src: str
    dst: str
    bandwidth: float
    latency: float
    codecs: tuple[str, ...] = ("none",)


@dataclass(frozen=True)
class Constraints:
    """User constraints on the plan.

    Attributes:
        pin: tier name -> node names or glob patterns that must run on that tier.
        forbid: tiers that must run no node.
        max_link_bytes: (src, dst) -> most bytes that may cross that link per inference.
        max_memory: tier name -> most bytes of parameters + activations on that tier.
    """

    pin: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forbid: tuple[str, ...] = ()
    max_link_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    max_memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Compression:
    """How lossy feature-map codecs are checked (the cluster file's ``compression``).

    Attributes:
        budget: least top-1 agreement, in (0, 1], between the compressed and the
            uncompressed pipeline; None if not given.
        calibration: an absolute ``.npy`` path, or ``MODULE:FUNCTION``; None if not given.
    """

    budget: float | None = None
    calibration: str | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Settings for the backends that come from the command line, not the cluster file.

    Each backend reads the fields that concern it in ``emit``; compile's check
    (``partc.build``) reads ``qemu_sysroot``.

    Attributes:
        tvm_trials: MetaSchedule trials per untuned task of a TVM stage; 0 tunes nothing.
        tuning_db: TVM tuning database folder (created if missing), reused across builds;
            None uses no database.
        aoti: compile ``export`` stages with AOTInductor (native code for this machine;
            minutes per stage) instead of saving the portable ExportedProgram.
        qemu_sysroot: the target's Python made by ``examples/qemu/make-sysroot.sh``, in which
            the check runs TVM stages compiled for another architecture under qemu-user
            (``partc.runtime.emulate``); None checks their PyTorch graph instead.

    Raises:
        PartcError: for negative ``tvm_trials``, or ``tvm_trials`` > 0 without ``tuning_db``.
    """

    tvm_trials: int = 0
    tuning_db: Path | None = None
    aoti: bool = False
    qemu_sysroot: Path | None = None

    def __post_init__(self) -> None:
        if self.tvm_trials < 0:
            raise PartcError(f"tvm: trials must be >= 0, not {self.tvm_trials}")
        if self.tvm_trials and self.tuning_db is None:
            raise PartcError("tvm: tuning (trials > 0) needs a tuning database directory to keep its records")


@dataclass(frozen=True)
class CompileContext:
    """Everything a pass or backend may know about the deployment.

    Attributes:
        tiers: tiers in data-flow order (data only moves down this tuple).
        links: links between tiers.
        objective: "latency" or "throughput".
        constraints: user constraints.
        profiles: target name -> measured profile file (``partc profile`` output).
        source: where the configuration came from, for error messages.
        compression: the lossy-codec budget and calibration inputs; None if not given.
        options: backend settings from the command line (TVM tuning).
    """

    tiers: tuple[Tier, ...]
    links: tuple[Link, ...] = ()
    objective: str = "latency"
    constraints: Constraints = field(default_factory=Constraints)
    profiles: dict[str, Path] = field(default_factory=dict)
    source: str = "<cluster>"
    compression: Compression | None = None
    options: BackendOptions = BackendOptions()

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Tier names in data-flow order."""
        return tuple(t.name for t in self.tiers)

    @property
    def loaded(self) -> bool:
        """Whether the cluster file gives a request rate: plans are then priced under that load."""
        return self.tiers[0].scaling.rate is not None

    def tier(self, name: str) -> Tier:
        """Return the tier called ``name``."""
        return next(t for t in self.tiers if t.name == name)

    def link(self, src: str, dst: str) -> Link | None:
        """Return the link from ``src`` to ``dst``, or None if the cluster has none."""
        return next((lk for lk in self.links if (lk.src, lk.dst) == (src, dst)), None)
