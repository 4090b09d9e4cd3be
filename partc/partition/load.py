"""Prices under load: many instances of the first tier feeding shared tiers (the cluster file's
``instances``, ``rate``, ``replicas``, ``max_batch``; ``partc.context.Scaling``).

The model, stated once (the planner, ``partc plan`` and the manifest use these functions):

- Machines: an instance of a tier is ``nodes`` machines of the tier's target, each of
  ``cores`` cores (each camera is an instance of one machine). A plan tiled over the nodes
  uses them together for one request (its stage's seconds are the tiled ones; under load the
  nodes still count as slots: not modelled); otherwise they host the instance's replicas.
  A replica runs its program on ``threads`` cores; the target's profile prices a stage on all
  its cores, so partc's replica takes a whole machine (``threads = cores``). At most
  ``slots = nodes * max(1, cores // threads)`` batches of an instance run at once
  (``slots``): replicas beyond that wait for cores and add nothing.
- Arrivals: the first tier's ``instances`` each send ``rate`` requests per second, Poisson;
  a tier with ``instances`` n receives the total rate spread evenly, ``total / n`` per
  instance. A link carries the rate of one instance of the tier it leaves (each camera has
  its own uplink; an edge's uplink carries all its requests).
- Service: a tier's stage costs ``S(1)`` seconds for one request (``Prediction.compute``).
  A batch of b costs ``S(b) = F + b * (S(1) - F + I)``: ``F``, the part paid once per batch, is
  each node's call overhead (``Load.fixed``: per-node dispatch on a CPU, kernel launch on a
  GPU, at most the node's seconds); the rest scales with the batch. ``I = call / threads``
  (``TierLoad.call_share``) is what a shared tier's machine pays per request besides the
  stage. ``call`` is the CPU seconds of the calls into the tier: its ingress receiving,
  decoding, encoding and answering the request, and on Ray Serve also the handle call to a
  replica and its batch queue; ``WORKER_CALLS`` or ``SERVE_CALLS`` times
  ``partc.partition.model.call_seconds`` of the tier's target, the figure a tile call costs
  too. That CPU time is taken from the cores the replicas run on: spread over a replica's
  ``threads`` cores, it lengthens its service, so that an instance's capacity is its cores'
  (``slots * threads`` cores do ``rate * (threads * S(b) / b + call)`` core-seconds a second).
  The first tier serves its own requests one at a time (one replica, batch 1, no ingress);
  a link is one server moving one request's tensors in its streaming time.
- A tier instance running batches of b on c servers (``min(replicas, slots)``) is an M/D/c
  queue of batches (arrivals ``rate / b``, service ``S(b)``), whose mean wait is the
  Allen-Cunneen approximation ``Wq = C(c, a) / (c / S(b) - rate / b) * (1 + 0) / 2`` (Poisson
  arrivals, deterministic service: half the M/M/c wait; exact for c = 1), ``C`` the Erlang C
  probability and ``a = rate * S(b) / b`` the offered load. Utilisation
  ``rho = rate * S(b) / (c * b)``.
- Replicas: the fewest c within [min_replicas, max_replicas] that keep ``rho`` at most
  ``TARGET_UTILISATION`` with full batches (``max_batch``); if none does, the most that
  still add servers (``max(min_replicas, min(max_replicas, slots))``).
- Batch: dynamic batching runs the b in 1..max_batch that gives the least latency at those
  replicas: ``(b - 1) / (2 * rate)`` waiting for the batch to fill, plus ``Wq``, plus ``S(b)``.
- A plan is infeasible under load when some tier or link has ``rho >= 1`` at its most servers
  (``min(max_replicas, slots)``) with full batches (``peak``): its queue grows without bound.
- Latency of a request = the unloaded latency (``Prediction.latency``) + what the load adds at
  each tier and link (``wait_s``: the call into the tier, filling the batch, queueing, the
  batch's longer service). Throughput: the fleet's capacity, the fewest requests per second
  any tier (instances x min(max_replicas, slots) x max_batch / S(max_batch)) or link
  (instances / streaming time) sustains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partc.partition.price import LinkPrice, Prediction

TARGET_UTILISATION = 0.8  # the utilisation replicas are sized for: below it, queues stay short
# CPU a request costs a tier besides its stage, in calls (``partc.partition.model.call_seconds``):
# a gRPC worker's ingress is one call (measured 2.6 ms against 2 ms); Ray Serve's ingress, handle
# call to a replica and the replica's batch queue cost about ten (measured 21-30 ms, median 26,
# on the same core; benchmarks/results/fanin.md).
WORKER_CALLS, SERVE_CALLS = 1, 10


@dataclass(frozen=True)
class TierLoad:
    """How one tier (or link) is loaded and may scale.

    Attributes:
        name: the tier (or link, ``src->dst``).
        instances: its independent instances (a link: those of the tier it leaves).
        rate: requests per second reaching each instance.
        min_replicas, max_replicas: replicas bounds of each instance.
        max_batch: most requests in one batch.
        call: CPU seconds each request costs the instance's machine besides its stage (the calls
            into the tier); 0 for the first tier and links.
        threads: cores a replica's batch runs on.
        slots: most batches an instance runs at once (``slots``); None: one per replica.
    """

    name: str
    instances: int
    rate: float
    min_replicas: int = 1
    max_replicas: int = 1
    max_batch: int = 1
    call: float = 0.0
    threads: int = 1
    slots: int | None = None

    @property
    def servers(self) -> int:
        """Most replicas that run batches at once: those beyond the machines' slots add nothing."""
        return self.max_replicas if self.slots is None else min(self.max_replicas, self.slots)

    @property
    def call_share(self) -> float:
        """Seconds of a replica's service each request's calls take: their CPU seconds, taken
        from the ``threads`` cores its batch runs on."""
        return self.call / self.threads


@dataclass(frozen=True)
class Load:
    """The fleet's load on a cluster's tiers, in data-flow order.

    Attributes:
        tiers: per tier, its load and scaling.
        fixed: (n, K) seconds of each node on each tier paid once per batch (its call
            overhead, at most its seconds); row order is the cost graph's.
    """

    tiers: tuple[TierLoad, ...]
    fixed: np.ndarray

    def link(self, b: int, name: str) -> TierLoad:
        """Link ``b`` (from tier b to b + 1) as a server: one per instance of tier b."""
        return TierLoad(name, self.tiers[b].instances, self.tiers[b].rate)


@dataclass(frozen=True)
class Use:
    """A tier or link under load, at the replicas and batch partc plans for it.

    Attributes:
        name: the tier or link.
        instances: its instances (a link: those of the tier it leaves).
        arrival_per_s: requests per second reaching each instance.
        replicas: replicas each instance needs (``TARGET_UTILISATION``, within its bounds).
        batch: the batch size dynamic batching runs at that load.
        utilisation: rho at ``replicas`` and ``batch``.
        peak_utilisation: rho at max replicas with full batches (>= 1: overloaded).
        wait_s: seconds the load adds to a request here (batch filling, queueing, longer
            batch service); None when overloaded (the queue grows without bound).
    """

    name: str
    instances: int
    arrival_per_s: float
    replicas: int
    batch: int
    utilisation: float
    peak_utilisation: float
    wait_s: float | None


@dataclass(frozen=True)
class LoadCost:
    """A plan priced under load (module docstring).

    Attributes:
        tiers, links: each tier's and link's use, in data-flow order.
        latency_s: seconds per request, queueing included; None when infeasible.
        capacity_per_s: most requests per second the fleet sustains (all instances together).
        feasible: whether every tier and link keeps up (peak utilisation below 1).
    """

    tiers: tuple[Use, ...]
    links: tuple[Use, ...]
    latency_s: float | None
    capacity_per_s: float
    feasible: bool

    def value(self, objective: str) -> float:
        """The figure ``objective`` minimises: latency, or seconds per request of the fleet's
        capacity; inf when infeasible."""
        if self.latency_s is None:
            return float("inf")
        return self.latency_s if objective == "latency" else 1 / self.capacity_per_s

    @property
    def overloaded(self) -> tuple[Use, ...]:
        """The tiers and links that cannot keep up, the worst first."""
        return tuple(sorted((u for u in (*self.tiers, *self.links) if u.peak_utilisation >= 1),
                            key=lambda u: -u.peak_utilisation))


def slots(machines: int, cores: int, threads: int) -> int:
    """Most batches ``machines`` of ``cores`` cores each run at once, a replica taking ``threads``."""
    return machines * max(1, cores // threads)


def batch_seconds(service: np.ndarray, fixed: np.ndarray, batch: int | np.ndarray,
                  call: np.ndarray | float = 0.0) -> np.ndarray:
    """Seconds of a batch of ``batch`` requests: ``fixed`` once, the rest of ``service`` and the
    call into the tier per request."""
    return fixed + batch * (service - fixed + call)


def erlang_c(servers: np.ndarray, offered: np.ndarray) -> np.ndarray:
    """The Erlang C probability that a request waits, for ``servers`` (ints) and ``offered`` load
    (Erlangs, per row); 1 where ``offered >= servers``. Erlang B by its stable recursion."""
    servers = np.asarray(servers, dtype=np.int64)
    offered = np.asarray(offered, dtype=float)
    blocking, found = np.ones_like(offered), np.zeros_like(offered)
    for k in range(1, int(servers.max(initial=1)) + 1):
        blocking = offered * blocking / (k + offered * blocking)
        found = np.where(servers == k, blocking, found)
    rho = offered / servers
    with np.errstate(divide="ignore", invalid="ignore"):
        waits = found / (1 - rho * (1 - found))
    return np.where(rho < 1, waits, 1.0)


def serve(load: TierLoad, service, fixed) -> tuple[np.ndarray, ...]:
    """How a tier (or link) serves ``load`` for each row of ``service`` (seconds of one request)
    and ``fixed`` (its part paid once per batch): replicas, batch, utilisation, peak utilisation
    and added seconds per request (module docstring), each an array over the rows.
    """
    service = np.asarray(service, dtype=float)
    fixed = np.minimum(np.asarray(fixed, dtype=float), service)
    rate, top = load.rate, load.max_batch
    call = np.where(service > 0, load.call_share, 0.0)  # a tier computing nothing is not called
    full = batch_seconds(service, fixed, top, call)
    peak = rate * full / (load.servers * top)
    needed = np.ceil(rate * full / (top * TARGET_UTILISATION) - 1e-9)
    replicas = np.clip(needed, load.min_replicas, max(load.min_replicas, load.servers)).astype(np.int64)
    servers = np.minimum(replicas, load.servers)
    best, batch = np.full(service.shape, np.inf), np.ones(service.shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(1, top + 1):
            seconds = batch_seconds(service, fixed, b, call)
            offered = rate * seconds / b
            queue = np.where(offered > 0, 0.5 * erlang_c(servers, offered) / (servers / seconds - rate / b), 0.0)
            added = (b - 1) / (2 * rate) + queue + seconds - service
            better = (offered < servers) & (added < best)
            best, batch = np.where(better, added, best), np.where(better, b, batch)
    idle = service <= 0
    best, batch = np.where(idle, 0.0, best), np.where(idle, 1, batch)
    utilisation = rate * batch_seconds(service, fixed, batch, call) / (servers * batch)
    return replicas, batch, utilisation, peak, best


def load_values(
    load: Load, compute: np.ndarray, fixed: np.ndarray, stream: np.ndarray, latency: np.ndarray, objective: str
) -> np.ndarray:
    """The objective under load of many plans at once: rows of per-tier ``compute`` and ``fixed``
    seconds (M, K), per-link ``stream`` seconds (M, K-1) and unloaded ``latency`` (M,).

    The same figures as ``price_load``, for ranking many cuts (``partc.partition.baselines``).
    """
    added = np.zeros(len(latency))
    capacity = np.full(len(latency), np.inf)
    peaks = []
    for k, tier in enumerate(load.tiers):
        *_, peak, wait = serve(tier, compute[:, k], fixed[:, k])
        added, peaks = added + wait, [*peaks, peak]
        capacity = np.minimum(capacity, tier_capacity(tier, compute[:, k], fixed[:, k]))
    for b in range(stream.shape[1]):
        link = load.link(b, "")
        *_, peak, wait = serve(link, stream[:, b], 0.0)
        added, peaks = added + wait, [*peaks, peak]
        capacity = np.minimum(capacity, tier_capacity(link, stream[:, b], 0.0))
    feasible = (np.max(peaks, axis=0) < 1) if peaks else np.ones(len(latency), dtype=bool)
    with np.errstate(divide="ignore"):
        value = latency + added if objective == "latency" else 1 / capacity
    return np.where(feasible, value, np.inf)


def tier_capacity(load: TierLoad, service, fixed) -> np.ndarray:
    """Requests per second all instances of a tier (or link) sustain at their most servers, full
    batches, for each row of ``service`` and ``fixed`` (a tier computing nothing: unbounded)."""
    service = np.asarray(service, dtype=float)
    full = batch_seconds(service, np.minimum(fixed, service), load.max_batch, load.call_share)
    with np.errstate(divide="ignore"):
        return np.where(service > 0, load.instances * load.servers * load.max_batch / full, np.inf)


def price_load(load: Load, tiers: np.ndarray, prediction: Prediction, links: Sequence[LinkPrice]) -> LoadCost:
    """Price a plan under ``load``: ``tiers`` (a tier index per cost-graph node) says which node's
    once-per-batch seconds each tier pays; ``prediction`` gives each stage's seconds and each
    link's bytes (module docstring)."""
    tiers = np.asarray(tiers, dtype=np.int64)
    fixed = np.bincount(tiers, weights=load.fixed[np.arange(len(tiers)), tiers], minlength=len(load.tiers))
    uses, capacity = [], np.inf
    for k, tier in enumerate(load.tiers):
        service = prediction.compute[tier.name]
        uses.append(_use(tier, service, fixed[k]))
        capacity = min(capacity, float(tier_capacity(tier, service, fixed[k])))
    link_uses = []
    for b, link in enumerate(links):
        server = load.link(b, link.name)
        stream = prediction.stream(link, {})
        link_uses.append(_use(server, stream, 0.0))
        capacity = min(capacity, float(tier_capacity(server, stream, 0.0)))
    feasible = all(u.peak_utilisation < 1 for u in (*uses, *link_uses))
    latency = prediction.latency(links) + sum(u.wait_s or 0.0 for u in (*uses, *link_uses)) if feasible else None
    return LoadCost(tuple(uses), tuple(link_uses), latency, capacity, feasible)


def _use(load: TierLoad, service: float, fixed: float) -> Use:
    replicas, batch, utilisation, peak, wait = (a.item() for a in serve(load, np.array([service]), np.array([fixed])))
    return Use(load.name, load.instances, load.rate, int(replicas), int(batch), float(utilisation), float(peak),
               float(wait) if np.isfinite(wait) else None)
