"""A build's plans as the runtime sees them, and the choice among them as bandwidth changes.

A build holds several plans (manifest ``plans``): the primary one, compiled for the
cluster file's bandwidths; the other plans of the plan family, each optimal for some other
bandwidths (``partc.partition.family``); and fallbacks that stop before a tier, for when that
tier's worker dies. Every plan runs over the same chain of workers, one per stage; a plan
gives each stage a program or none (the stage then relays tensors to the next one), and
its chain ends at its last stage with a program.

A plan's predicted latency is affine in the inverse bandwidth of each hop::

    latency(p) = base(p) + sum over hops h of bytes(p, h) / effective(h)

where ``base`` is compute plus link latency, ``bytes`` the raw tensor bytes the plan sends
over the hop, and ``effective`` the raw bytes per second the hop moves with its codec
(compressed size, encode and decode time included). ``PlanSelector`` evaluates every plan
at the bandwidths measured so far (the cluster file's until a hop has ``min_samples``
transfers) and switches when another plan is predicted faster by more than ``margin``. A
switch takes effect for the next request submitted: requests in flight finish on the plan
they started with, so nothing is dropped or reordered. A hop that the current plan does
not use is not measured; its last estimate stands.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from partc.codec import NO_CODEC, effective_bandwidth
from partc.errors import PartcError
from partc.runtime.bandwidth import BandwidthEstimator
from partc.runtime.worker import StageSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    """The link between two consecutive stages of the chain, as the plans price it.

    Attributes:
        src, dst: stage names.
        links: the cluster's links on the way (``"edge->cloud"``), more than one where the
            stages' tiers are not consecutive.
        bandwidth: the cluster file's bandwidth, bytes per second (the narrowest link's).
        latency: one-way latency, seconds (summed over the links).
        compression: the codec entry of its first link (``partc.ir.META_LINK_CODECS``: codec,
            ratio, encode and decode speeds, measured at compile time).
    """

    src: str
    dst: str
    links: tuple[str, ...]
    bandwidth: float
    latency: float
    compression: Mapping = field(default_factory=lambda: dict(NO_CODEC))

    @property
    def name(self) -> str:
        """``"src->dst"``, as the driver keys its bandwidth estimates."""
        return f"{self.src}->{self.dst}"

    @property
    def codec(self) -> str:
        """The codec tensors cross this hop with."""
        return self.compression["codec"]

    def effective(self, bandwidth: float) -> float:
        """Raw tensor bytes per second this hop moves at link ``bandwidth``, codec included."""
        return effective_bandwidth(bandwidth, self.compression)


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
        base: predicted seconds at infinite bandwidth (compute plus link latencies).
        hop_bytes: raw tensor bytes sent over each hop of the chain.
    """

    name: str
    kind: str
    stages: tuple[StageSpec, ...]
    programs: Mapping[str, str]
    base: float = 0.0
    hop_bytes: tuple[int, ...] = ()

    @classmethod
    def single(cls, stages: Sequence[StageSpec]) -> RuntimePlan:
        """A build of one plan whose stages each run the program named after the stage."""
        return cls("p0", "primary", tuple(stages), {s.name: s.name for s in stages if s.outputs},
                   0.0, (0,) * (len(stages) - 1))

    def latency(self, hops: Sequence[Hop], bandwidth: Mapping[str, float]) -> float:
        """Predicted seconds at ``bandwidth`` (hop name -> bytes per second)."""
        used = zip(self.hop_bytes, hops, strict=False)  # the chain may stop before the last hop
        return self.base + sum(nbytes / hop.effective(bandwidth[hop.name]) for nbytes, hop in used if nbytes)


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
        margin: a plan must be predicted this much faster (a fraction) to be switched to.
        min_samples: transfers a hop needs before its measured bandwidth is trusted.
        current: index of the plan new requests run.
        down: stages found dead; plans that reach them are not chosen again.
        switches: every switch so far.
    """

    plans: Sequence[RuntimePlan]
    hops: Sequence[Hop]
    margin: float = 0.1
    min_samples: int = 3
    current: int = 0
    down: set[str] = field(default_factory=set)
    switches: list[Switch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.plans:
            raise PartcError("a build needs at least one plan")

    def bandwidths(self, links: Mapping[str, BandwidthEstimator]) -> dict[str, float]:
        """Bandwidth of each hop: measured once it has ``min_samples`` transfers, else the cluster file's."""
        out = {}
        for hop in self.hops:
            est = links.get(hop.name)
            measured = est.bytes_per_second if est is not None and est.count >= self.min_samples else None
            out[hop.name] = measured or hop.bandwidth
        return out

    def usable(self, index: int) -> bool:
        """Whether plan ``index`` reaches no dead stage."""
        return not any(s.name in self.down for s in self.plans[index].stages)

    def select(self, request: int, links: Mapping[str, BandwidthEstimator]) -> int:
        """Return the plan for ``request``, switching (and logging why) when another is clearly faster."""
        if len(self.plans) == 1:
            return self.current
        bandwidth = self.bandwidths(links)
        predicted = {i: p.latency(self.hops, bandwidth) for i, p in enumerate(self.plans) if self.usable(i)}
        best = min(predicted, key=predicted.get)
        now = predicted.get(self.current)
        if best != self.current and now is not None and predicted[best] < (1 - self.margin) * now:
            measured = ", ".join(
                f"{h.name} {bandwidth[h.name] * 8 / 1e6:.3g} Mbit/s (planned {h.bandwidth * 8 / 1e6:.3g})"
                for h in self.hops
            )
            self._switch(request, best, f"measured {measured}: predicted {predicted[best] * 1e3:.1f} ms "
                                        f"vs {now * 1e3:.1f} ms")
        return self.current

    def degrade(self, request: int, down: Collection[str], reason: str,
                links: Mapping[str, BandwidthEstimator]) -> bool:
        """Mark ``down`` dead and switch to the best plan avoiding them; False if there is none."""
        self.down.update(down)
        usable = [i for i in range(len(self.plans)) if self.usable(i)]
        if not usable:
            return False
        bandwidth = self.bandwidths(links)
        best = min(usable, key=lambda i: self.plans[i].latency(self.hops, bandwidth))
        self._switch(request, best, f"{reason}; degrading to a plan without {', '.join(sorted(self.down))}")
        return True

    def _switch(self, request: int, new: int, reason: str) -> None:
        old = self.plans[self.current]
        switch = Switch(request, old.name, self.plans[new].name, reason)
        self.switches.append(switch)
        self.current = new
        log.warning("request %d on: plan %s -> %s (%s): %s", request, old.name, self.plans[new].name,
                    self.plans[new].kind, reason)


def from_manifest(manifest: Mapping, addresses: Mapping[str, str] | None = None) -> tuple[list[RuntimePlan], list[Hop]]:
    """Return a build's plans and the hops of its chain, from its manifest (``partc.manifest``).

    ``addresses`` (stage -> host:port) go into the plans' stages; absent ones are "".
    """
    addresses = addresses or {}
    stages = [s for s in manifest["stages"] if s["index"] == 0]  # the chain; the others only run tiles
    programs = {(s["name"], p["id"]): p for s in stages for p in s["programs"] + s["schedules"]}
    tiers = [t["name"] for t in manifest["cluster"]["tiers"]]
    links = {(lk["from"], lk["to"]): lk for lk in manifest["cluster"]["links"]}
    hops = []
    for src, dst in zip(stages, stages[1:], strict=False):
        a, c = tiers.index(src["tier"]), tiers.index(dst["tier"])
        path = [links[(tiers[b], tiers[b + 1])] for b in range(a, c)]
        hops.append(Hop(src["name"], dst["name"], tuple(f"{lk['from']}->{lk['to']}" for lk in path),
                        min(lk["bandwidth"] for lk in path), sum(lk["latency"] for lk in path), path[0]["codec"]))
    plans = []
    for entry in manifest["plans"]:
        chain = []
        for name in entry["stages"]:
            program = programs.get((name, entry["programs"].get(name)))
            names = {key: tuple(t["name"] for t in program[key]) if program else () for key in ("inputs", "outputs")}
            chain.append(StageSpec(name, addresses.get(name, ""), names["inputs"], names["outputs"]))
        link_bytes = entry["predicted"]["link_bytes"]
        hop_bytes = tuple(link_bytes.get(hop.links[0], 0) for hop in hops[: len(chain) - 1])
        plans.append(RuntimePlan(entry["name"], entry["kind"], tuple(chain), dict(entry["programs"]),
                                 entry["predicted"]["base"], hop_bytes))
    return plans, hops
