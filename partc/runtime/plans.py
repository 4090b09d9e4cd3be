"""A build's plans as the runtime sees them, and the choice among them as bandwidth changes.

A build holds several plans (manifest ``plans``): the primary one, compiled for the
cluster file's bandwidths; the other plans of the plan family, each optimal for some other
bandwidths (``partc.partition.family``); and fallbacks that stop before a tier, for when that
tier's worker dies. Every plan runs over the same chain of workers, one per stage; a plan
gives each stage a program or none (the stage then relays tensors to the next one), and
its chain ends at its last stage with a program.

A plan's predicted latency is the compiler's price of it
(``partc.partition.price.Prediction.latency``, the figure the manifest's
``plans[].predicted.latency`` holds), taken at the bandwidths measured so far: each link a
measured hop crosses is priced at the hop's measured bandwidth, the others at the cluster
file's, codecs included (compressed size, encode and decode time). A hop's measurement
counts once it has ``min_samples`` transfers; until then, the selector ranks the plans
exactly as the manifest does. ``PlanSelector`` switches when another plan is predicted
faster by more than ``margin``. A switch takes effect for the next request submitted:
requests in flight finish on the plan they started with, so nothing is dropped or
reordered. A hop that the current plan does not use is not measured; its last estimate
stands.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from partc.codec import NO_CODEC, LinkCodec
from partc.errors import PartcError
from partc.manifest import LinkEntry, Manifest
from partc.partition.price import LinkPrice, Prediction
from partc.runtime.bandwidth import BandwidthEstimator
from partc.runtime.routes import StageSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    """The hop between two consecutive stages of the chain, as the driver measures it.

    Attributes:
        src, dst: stage names.
        links: the cluster's links on the way (``"edge->cloud"``), more than one where the
            stages' tiers are not consecutive.
        bandwidth: the cluster file's bandwidth, bytes per second (the narrowest link's).
        latency: one-way latency, seconds (summed over the links).
        compression: the codec of its first link, as ``compress-cut-tensors`` chose and
            measured it; tensors cross the hop with it.
    """

    src: str
    dst: str
    links: tuple[str, ...]
    bandwidth: float
    latency: float
    compression: LinkCodec = NO_CODEC

    @property
    def name(self) -> str:
        """``"src->dst"``, as the driver keys its bandwidth estimates."""
        return f"{self.src}->{self.dst}"

    @property
    def codec(self) -> str:
        """The name of the codec tensors cross this hop with."""
        return self.compression.codec


@dataclass(frozen=True)
class RuntimePlan:
    """One plan: the chain it runs and its predicted cost.

    Attributes:
        name: ``p0``, ``p1``... (``p0`` is the primary plan).
        kind: "primary", "adaptive" (another plan of the family) or "fallback".
        stages: the chain, from the first stage to the plan's last stage with a program;
            a stage without a program has no inputs and no outputs.
        programs: stage -> the program it runs in this plan (a key of the stage
            functions); stages that only relay are absent.
        predicted: the compiler's price of the plan (manifest ``plans[].predicted``).
        peers: the other nodes of a tier (``edge.1``) that run its tiles or branches.
    """

    name: str
    kind: str
    stages: tuple[StageSpec, ...]
    programs: Mapping[str, str]
    predicted: Prediction
    peers: frozenset[str] = frozenset()

    @classmethod
    def single(cls, stages: Sequence[StageSpec]) -> RuntimePlan:
        """A build of one plan whose stages each run the program named after the stage."""
        return cls("p0", "primary", tuple(stages), {s.name: s.name for s in stages if s.outputs}, Prediction({}, {}))


@dataclass(frozen=True)
class Switch:
    """A change of plan: from request ``request`` on, ``new`` runs instead of ``old``."""

    request: int
    old: str
    new: str
    reason: str


@dataclass
class PlanSelector:
    """Chooses the plan of each request from the measured bandwidths (see the module docstring).

    Attributes:
        plans: the build's plans; index 0 is the primary one.
        hops: the hops of the longest chain, in order.
        prices: the cluster's links as the plans are priced on them (``Manifest.prices``).
        margin: a plan must be predicted this much faster (a fraction) to be switched to.
        min_samples: transfers a hop needs before its measured bandwidth is trusted.
        current: index of the plan new requests run.
        down: stages found dead; plans that reach them are not chosen again.
        switches: every switch so far.
    """

    plans: Sequence[RuntimePlan]
    hops: Sequence[Hop]
    prices: Sequence[LinkPrice]
    margin: float = 0.1
    min_samples: int = 3
    current: int = 0
    down: set[str] = field(default_factory=set)
    switches: list[Switch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.plans:
            raise PartcError("a build needs at least one plan")

    def measured(self, estimates: Mapping[str, BandwidthEstimator]) -> dict[str, float]:
        """Bandwidth of each hop with ``min_samples`` transfers (hop name -> bytes per second)."""
        out = {}
        for hop in self.hops:
            est = estimates.get(hop.name)
            if est is not None and est.count >= self.min_samples and est.bytes_per_second:
                out[hop.name] = est.bytes_per_second
        return out

    def predicted(self, measured: Mapping[str, float]) -> dict[int, float]:
        """Predicted seconds of every usable plan (index -> s) at the ``measured`` hop bandwidths.

        Each link a measured hop crosses is priced at the hop's bandwidth; the others at the
        cluster file's.
        """
        bandwidth = {link: measured[hop.name] for hop in self.hops if hop.name in measured for link in hop.links}
        return {i: p.predicted.latency(self.prices, bandwidth) for i, p in enumerate(self.plans) if self.usable(i)}

    def usable(self, index: int) -> bool:
        """Whether plan ``index`` reaches no dead stage, and no dead node runs its tiles or branches."""
        plan = self.plans[index]
        return not any(s.name in self.down for s in plan.stages) and not plan.peers & self.down

    def select(self, request: int, estimates: Mapping[str, BandwidthEstimator]) -> int:
        """Return the plan for ``request``, switching (and logging why) when another is clearly faster.

        ``estimates`` are the driver's bandwidth estimates, by hop name.
        """
        if len(self.plans) == 1:
            return self.current
        measured = self.measured(estimates)
        predicted = self.predicted(measured)
        best = min(predicted, key=predicted.get)
        now = predicted.get(self.current)
        if best != self.current and now is not None and predicted[best] < (1 - self.margin) * now:
            rates = ", ".join(f"{h.name} {measured.get(h.name, h.bandwidth) * 8 / 1e6:.3g} Mbit/s "
                              f"(planned {h.bandwidth * 8 / 1e6:.3g})" for h in self.hops)
            self._switch(request, best, f"measured {rates}: predicted {predicted[best] * 1e3:.1f} ms "
                                        f"vs {now * 1e3:.1f} ms")
        return self.current

    def degrade(self, request: int, down: Collection[str], reason: str,
                estimates: Mapping[str, BandwidthEstimator]) -> bool:
        """Mark ``down`` dead and switch to the best plan avoiding them; False if there is none."""
        self.down.update(down)
        predicted = self.predicted(self.measured(estimates))
        if not predicted:
            return False
        best = min(predicted, key=predicted.get)
        self._switch(request, best, f"{reason}; degrading to a plan without {', '.join(sorted(self.down))}")
        return True

    def _switch(self, request: int, new: int, reason: str) -> None:
        old = self.plans[self.current]
        switch = Switch(request, old.name, self.plans[new].name, reason)
        self.switches.append(switch)
        self.current = new
        log.info("request %d on: plan %s -> %s (%s): %s", request, old.name, self.plans[new].name,
                 self.plans[new].kind, reason)


def links_between(manifest: Manifest, src_tier: str, dst_tier: str) -> tuple[LinkEntry, ...]:
    """The cluster's links from tier ``src_tier`` to tier ``dst_tier``, in order (none within a tier)."""
    tiers = [t.name for t in manifest.tiers]
    links = {(lk.src, lk.dst): lk for lk in manifest.links}
    a, c = tiers.index(src_tier), tiers.index(dst_tier)
    return tuple(links[(tiers[b], tiers[b + 1])] for b in range(a, c))


def from_manifest(
    manifest: Manifest, addresses: Mapping[str, str] | None = None
) -> tuple[list[RuntimePlan], list[Hop]]:
    """Return a build's plans and the hops of its chain, from its manifest.

    ``addresses`` (stage -> host:port) go into the plans' stages; absent ones are "".
    The plans are priced on ``manifest.prices``.
    """
    addresses = addresses or {}
    chain = manifest.chain  # the others only run tiles
    hops = []
    for src, dst in zip(chain, chain[1:], strict=False):
        links = links_between(manifest, src.tier, dst.tier)
        hops.append(Hop(src.name, dst.name, tuple(lk.name for lk in links), min(lk.bandwidth for lk in links),
                        sum(lk.latency for lk in links), links[0].codec))
    owner = {p.id: s.name for s in manifest.stages for p in s.programs}
    plans = []
    for entry in manifest.plans:
        stages = []
        for name in entry.stages:
            program = manifest.stage(name).program(entry.programs[name]) if name in entry.programs else None
            reads, writes = (program.inputs, program.outputs) if program else ((), ())
            stages.append(StageSpec(name, addresses.get(name, ""), tuple(t.name for t in reads),
                                    tuple(t.name for t in writes)))
        steps = [step for name, pid in entry.programs.items() for schedule in manifest.stage(name).schedules
                 if schedule.id == pid for step in schedule.steps]
        peers = frozenset(owner[pid] for step in steps for pid in step[1:])
        plans.append(RuntimePlan(entry.name, entry.kind, tuple(stages), dict(entry.programs), entry.predicted, peers))
    return plans, hops
