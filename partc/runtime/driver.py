"""The driver: streams requests through a chain of stage workers and returns results in order.

Topology: a chain, not a hub. The driver sends each request to the first stage only;
each worker runs its stage, forwards what later stages read straight to the next worker,
and the model outputs travel back along the replies. So the bytes of a feature map cut
between the edge and the cloud cross the edge -> cloud link, as in deployment, and never
detour through the driver's machine (with a hub, every cut tensor would cross the
driver's link twice, and the bandwidth measured would be the driver's, not the link's
that a plan is chosen for). What a worker forwards is fixed by its ``Route`` when it
starts, never by a request. A request is one nested call: stage i's call to stage i+1
returns when the rest of the chain is done, which gives robustness for free: every wait
is a gRPC call with a deadline (each hop passes on 90% of its remaining time, so the
stage nearest the fault reports first), a failure anywhere comes back to the driver on
the call it belongs to, and a request is either answered or failed, never lost.

Pipelining: the driver keeps up to ``window`` requests in flight; each worker runs its
function for one request at a time, so with three stages, three requests compute at once.

Measurements: every reply carries, per request, each stage's compute time and each hop's
(bytes sent, bytes returned, seconds on the wire: call time minus the time the callee
spent). The driver folds them into ``links`` (a ``BandwidthEstimator`` per hop,
``"driver->device.0"``, ``"device.0->edge.0"``) and ``compute`` (an ``Ewma`` of seconds per
stage).

Plans: a build may hold several plans over the same chain of workers
(``partc.runtime.plans``). Each request carries the index of its plan; the driver picks it
when the request is submitted (``PlanSelector``), so a switch never touches a request in
flight, and results still come back in order.

Faults: a hop whose stage is unreachable is tried ``retry.attempts`` times with back-off
(requests are idempotent); a stage that does not answer in time, refuses the token, or
fails is reported at once. When a request fails, the driver asks every stage whether it
is up; if some are down and a plan avoids them (a fallback that stops on an
earlier tier), it switches to that plan, says so, and resubmits the failed request and
every later one in flight, in order. Otherwise the failure ends ``Driver.run`` with a
``RunError`` naming the stage, its address, the request, and how many requests in flight
were abandoned.

Slow nodes: while the plan runs tiles or branches on further nodes of a tier, the driver asks
the tier's stage every ``CHECK_INTERVAL`` which of them it cannot reach or finds slow
(``partc.runtime.watch``: measured against predicted, relative to the stage's own node), and
moves to the best plan without those, as after a failure; requests in flight keep their plan.
With ``margin`` infinite the driver never moves for speed: not for bandwidth, not for slow nodes.

Recovery: while some stages are down, the driver asks them again whether they are up
before it submits a request, with back-off (``PROBE_BACKOFF`` seconds after they were found
down, doubling up to ``PROBE_MAX_BACKOFF``). When all answer, it returns to the plan it ran
before the fault (when some do, to the plan predicted fastest of those usable again). They
are trusted once a request through them has been answered: if one fails first while every
stage answers the driver (a hop to them still reconnecting), they count as down again.

Inputs are checked against the model's input shapes and dtypes (``specs``) before they are
sent, as the in-process run checks them (``check_inputs``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from partc.codec import parse_codec
from partc.errors import ManifestError, PartcError, RunError
from partc.partition.price import LinkPrice
from partc.runtime.bandwidth import BandwidthEstimator, Ewma
from partc.runtime.plans import Hop, PlanSelector, RuntimePlan, Switch
from partc.runtime.routes import Route, plan_routes
from partc.runtime.transport import (
    DEFAULT_RETRY,
    HEALTH,
    MAX_MESSAGE,
    NO_SECURITY,
    Channel,
    GrpcChannel,
    InProcessChannel,
    RetryPolicy,
    Security,
    call_stage,
    read_health,
)
from partc.runtime.wire import Frame, Measurement, decode, encode
from partc.runtime.worker import Worker

if TYPE_CHECKING:
    from partc.plan import StageFn, TensorSpec

log = logging.getLogger(__name__)

_SLACK = 5.0  # seconds a request may run past its deadline (encoding, decoding) before the driver gives up
PROBE_BACKOFF = 0.5  # seconds after a stage is found down before it is asked again whether it is up
CHECK_INTERVAL = 1.0  # seconds between questions to the stages that run a plan's tiles about their nodes
PROBE_MAX_BACKOFF = 10.0  # the longest wait between two such questions
_PROBE = RetryPolicy(attempts=1)  # a probe is one question, with a deadline of PROBE_BACKOFF


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Check that ``inputs`` hold every model input of ``specs`` with its shape and dtype (little-endian).

    Raises:
        ManifestError: naming the first input that is missing or does not match, and what to do.
    """
    for spec in specs:
        if spec.name not in inputs:
            described = ", ".join(f"{s.name} ({_shape(s.shape)} {s.dtype})" for s in specs)
            raise ManifestError(f"input {spec.name!r} missing; the model takes {described}")
        value = np.asarray(inputs[spec.name])
        if value.dtype.byteorder == ">" and value.dtype.newbyteorder("<") == np.dtype(spec.dtype):
            raise ManifestError(f"input {spec.name!r}: big-endian {spec.dtype}; convert it to little-endian "
                                f"(array.astype('<{value.dtype.str[1:]}'))")
        if tuple(value.shape) != tuple(spec.shape) or value.dtype != np.dtype(spec.dtype):
            raise ManifestError(
                f"input {spec.name!r}: got {_shape(value.shape)} {value.dtype}, but the build was compiled "
                f"for {_shape(spec.shape)} {spec.dtype}; recompile with --input-shape "
                f"{','.join(map(str, value.shape))}" + (f":{value.dtype}" if value.dtype.kind in "iu" else "")
            )


def _tier(node: str) -> str:
    """The tier of a stage or node name (``edge`` of ``edge.1``)."""
    return node.rpartition(".")[0]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


class Driver:
    """Runs requests through the chain of stages reached through ``channels`` (first: the entry).

    One ``run`` at a time per driver (the estimators are updated by the thread consuming it).

    Attributes:
        links: bandwidth estimate per hop, keyed ``"src->dst"``.
        compute: smoothed compute seconds per stage.
        last: the measurements of the last request answered (its stages' compute, its hops).
        selector: the plan choice; ``selector.switches`` lists every switch.
    """

    def __init__(
        self,
        channels: Sequence[Channel],
        plans: Sequence[RuntimePlan],
        model_inputs: Sequence[str],
        model_outputs: Sequence[str],
        *,
        hops: Sequence[Hop] = (),
        prices: Sequence[LinkPrice] = (),
        window: int = 4,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        alpha: float = 0.3,
        margin: float = 0.1,
        codecs: Mapping[str, str] | None = None,
        specs: Sequence[TensorSpec] = (),
        max_message: int = MAX_MESSAGE,
    ) -> None:
        """Drive ``plans`` over the chain whose stages are reached through ``channels``, in order.

        ``hops`` are the hops between consecutive channels and ``prices`` the cluster's links
        as the plans are priced on them (``Manifest.prices``); both are needed to switch plans,
        and a hop's latency is taken off the round trips measured on it. ``timeout`` bounds
        each request end to end; ``window`` requests are in flight at once; ``codecs`` maps
        model inputs to the codec they are sent to the first stage with. ``specs`` are the
        model inputs' shapes and dtypes, checked before a request is sent (none: not checked);
        a reply whose tensors take more than ``max_message`` bytes is refused.

        Raises:
            PartcError: if there is no channel, ``window`` < 1, or a plan's chain is not a
                prefix of the channels.
        """
        if not channels:
            raise PartcError("a driver needs at least one stage")
        if window < 1:
            raise PartcError(f"window must be at least 1, got {window}")
        names = [c.stage for c in channels]
        for plan in plans:
            chain = [s.name for s in plan.stages]
            if chain != names[: len(chain)]:
                raise PartcError(f"plan {plan.name}: its stages {chain} are not the first of {names}")
        self._channels = tuple(channels)
        self._inputs = tuple(model_inputs)
        self._outputs = tuple(model_outputs)
        self.window = window
        self.timeout = timeout
        self._retry = retry
        self._alpha = alpha
        self._codecs = {n: c for n, c in (codecs or {}).items() if n in self._inputs}
        self._latency = {h.name: h.latency for h in hops}
        self._specs = tuple(specs)
        self._max_message = max_message
        self.selector = PlanSelector(plans, hops, prices, margin=margin)
        self.links: dict[str, BandwidthEstimator] = {}
        self.compute: dict[str, Ewma] = {}
        self.last: tuple[Measurement, ...] = ()
        self._probe_at = 0.0  # when the stages found down are next asked whether they are up
        self._probe_delay = PROBE_BACKOFF
        self._recovered: set[str] = set()  # stages back up, not yet through an answered request
        self._trial = 0  # the first request that may run through them
        self._unfaulted = 0  # the plan run before stages were found down
        self._check_at = 0.0  # when the stages running the plan's tiles are next asked about their nodes

    @property
    def switches(self) -> list[Switch]:
        """Every plan switch so far, in order."""
        return self.selector.switches

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            channel.close()

    def check(self, timeout: float = 5.0) -> None:
        """Ask every stage whether it is up and serves the stage it should.

        Raises:
            RunError: listing every stage that is unreachable, refuses us, or serves
                another stage.
        """
        problems = [p for c in self._channels if (p := self._problem(c, timeout, self._retry)[0]) is not None]
        if problems:
            raise RunError(
                f"{len(problems)} of {len(self._channels)} stages failed the health check: " + "; ".join(problems)
            )

    def _problem(self, channel: Channel, timeout: float, retry: RetryPolicy) -> tuple[str | None, frozenset[str]]:
        """Why the stage behind ``channel`` fails its health check (None if it answers as itself),
        and the nodes of its tier that it calls and cannot reach."""
        try:
            served, unreachable = read_health(call_stage(channel, b"", time.monotonic() + timeout, retry, HEALTH))
        except RunError as err:
            return str(err), frozenset()
        if served != channel.stage:
            return f"{channel.address} serves stage {served!r}, expected {channel.stage!r}", frozenset()
        return None, unreachable

    def _down(self, channels: Sequence[Channel], timeout: float, retry: RetryPolicy) -> set[str]:
        """The stages behind ``channels`` that fail their health check, and the nodes the others cannot reach."""
        down = set()
        for channel in channels:
            problem, unreachable = self._problem(channel, timeout, retry)
            down |= {channel.stage} if problem is not None else unreachable
        return down

    def run_one(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; see ``run``."""
        return next(self.run([inputs]))

    def run(self, inputs: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Stream ``inputs`` (model input name -> array) through the pipeline; yield outputs in order.

        Raises:
            PartcError: if an input lacks a model input, or does not match its spec.
            RunError: when a request fails and no fallback plan avoids the fault (see the
                module docstring); nothing after it is yielded.
        """
        pool = ThreadPoolExecutor(self.window, thread_name_prefix="partc-driver")
        pending: deque[tuple[int, dict[str, np.ndarray], concurrent.futures.Future]] = deque()
        source = iter(inputs)
        submitted = delivered = 0

        def submit(request_id: int, tensors: dict[str, np.ndarray]) -> tuple:
            self._check_nodes(request_id)
            self._probe(request_id)
            plan = self.selector.select(request_id, self.links)
            return request_id, tensors, pool.submit(self._request, request_id, tensors, plan)

        try:
            while True:
                while len(pending) < self.window:
                    item = next(source, None)
                    if item is None:
                        break
                    pending.append(submit(submitted, self._model_inputs(submitted, item)))
                    submitted += 1
                if not pending:
                    return
                request_id, tensors, future = pending[0]
                try:
                    reply = future.result(timeout=self.timeout + _SLACK)
                except concurrent.futures.TimeoutError:
                    reason = f"no reply within {self.timeout + _SLACK:.1f} s"
                except RunError as err:
                    reason = str(err)
                else:
                    pending.popleft()
                    if request_id >= self._trial:
                        self._recovered.clear()
                    self._record(reply.measurements)
                    delivered += 1
                    yield {n: reply.tensors[n] for n in self._outputs}
                    continue
                if not self._fall_back(request_id, reason):
                    raise self._failed(request_id, reason, list(pending)[1:], delivered)
                for _, _, later in pending:
                    later.cancel()
                pending = deque(submit(i, t) for i, t, _ in pending)
        finally:
            for _, _, future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _fall_back(self, request_id: int, reason: str) -> bool:
        """After a failed request: switch to a plan avoiding the stages (and tier nodes) that are down, if any."""
        down = self._down(self._channels, 2.0, self._retry)
        if down:
            self._probe_delay = PROBE_BACKOFF
        elif self._recovered:  # they answer the driver, not yet the stage before them: ask again later
            down = sorted(self._recovered)
            self._probe_delay = min(2 * self._probe_delay, PROBE_MAX_BACKOFF)
        self._recovered.clear()
        if not down:
            return False
        self._probe_at = time.monotonic() + self._probe_delay
        if not self.selector.down:
            self._unfaulted = self.selector.current
        return self.selector.degrade(request_id, down, f"request {request_id} failed: {reason}", self.links)

    def _check_nodes(self, request_id: int) -> None:
        """While the plan runs tiles or branches on further nodes of a tier, ask the tier's stage every
        ``CHECK_INTERVAL`` which of them it cannot reach or finds slow (``partc.runtime.watch``), and
        move to the best plan without those, as after a failed request."""
        selector = self.selector
        plan = selector.plans[selector.current]
        if not plan.peers or selector.down or selector.margin == math.inf or time.monotonic() < self._check_at:
            return  # margin inf: never move for speed (a slow node), only for faults
        self._check_at = time.monotonic() + CHECK_INTERVAL
        tiers = {_tier(n) for n in plan.peers}
        asked = [c for c in self._channels if c.stage in {s.name for s in plan.stages} and _tier(c.stage) in tiers]
        down = self._down(asked, PROBE_BACKOFF, _PROBE)
        if not down:
            return
        self._probe_delay = PROBE_BACKOFF
        self._probe_at = time.monotonic() + self._probe_delay
        self._unfaulted = selector.current
        reason = f"{', '.join(c.stage for c in asked)} finds {', '.join(sorted(down))} slow or unreachable"
        if not selector.degrade(request_id, down, reason, self.links):
            selector.down.clear()  # no plan avoids them: stay

    def _probe(self, request_id: int) -> None:
        """Ask the stages (and tier nodes, through their tier's stage) found down whether they are up, with
        back-off; return to the best plan when some are."""
        selector = self.selector
        if not selector.down or time.monotonic() < self._probe_at:
            return
        tiers = {_tier(n) for n in selector.down}
        still = self._down([c for c in self._channels if _tier(c.stage) in tiers], PROBE_BACKOFF, _PROBE)
        dark = {_tier(c.stage) for c in self._channels if c.stage in still}  # their other nodes cannot be asked
        up = {n for n in selector.down - still if _tier(n) not in dark}
        if not up:
            self._probe_delay = min(2 * self._probe_delay, PROBE_MAX_BACKOFF)
            self._probe_at = time.monotonic() + self._probe_delay
            return
        selector.down -= up
        self._recovered |= up
        self._trial = request_id
        self._probe_at = time.monotonic() + self._probe_delay
        if selector.usable(self._unfaulted):
            best, why = self._unfaulted, "the plan run before the fault"
        else:
            predicted = selector.predicted(selector.measured(self.links))
            best, why = min(predicted, key=predicted.get), "the plan predicted fastest without the others"
        if best != selector.current:
            old, new = selector.plans[selector.current], selector.plans[best]
            reason = f"{', '.join(sorted(up))} answer again; returning to {why}"
            selector.switches.append(Switch(request_id, old.name, new.name, reason))
            selector.current = best
            log.info("request %d on: plan %s -> %s (%s): %s", request_id, old.name, new.name, new.kind, reason)

    def _model_inputs(self, index: int, item: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in item]
        if missing:
            raise PartcError(f"input {index} lacks model input {', '.join(map(repr, missing))}; it has {sorted(item)}")
        check_inputs(self._specs, item)
        return {n: np.asarray(item[n]) for n in self._inputs}

    def _request(self, request_id: int, tensors: dict[str, np.ndarray], plan: int) -> Frame:
        entry = self._channels[0]
        payload = encode(Frame(request_id, tensors, plan=plan), self._codecs)
        sent = time.monotonic()
        answer = call_stage(entry, payload, sent + self.timeout, self._retry)
        seconds = time.monotonic() - sent
        try:
            reply = decode(answer, max_bytes=self._max_message)
        except RunError as err:
            raise RunError(f"reply from stage {entry.stage!r} at {entry.address}: {err}") from None
        if reply.request_id != request_id:
            raise RunError(f"stage {entry.stage!r} at {entry.address} answered request {reply.request_id}")
        missing = [n for n in self._outputs if n not in reply.tensors]
        if missing:
            raise RunError(f"the pipeline's reply lacks model outputs {', '.join(map(repr, missing))}")
        link = Measurement("link", "driver", entry.stage, seconds - reply.elapsed, len(payload), len(answer))
        return Frame(reply.request_id, reply.tensors, (link, *reply.measurements), reply.elapsed)

    def _record(self, measurements: Sequence[Measurement]) -> None:
        self.last = tuple(measurements)
        for m in measurements:
            if m.kind == "link":
                key = f"{m.src}->{m.dst}"
                self.links.setdefault(key, BandwidthEstimator(self._alpha)).add(
                    m.bytes_sent + m.bytes_received, m.seconds - 2 * self._latency.get(key, 0.0)
                )
            else:
                self.compute.setdefault(m.src, Ewma(self._alpha)).add(m.seconds)

    @staticmethod
    def _failed(request_id: int, reason: str, pending: Sequence[object], delivered: int) -> RunError:
        return RunError(
            f"request {request_id} failed: {reason}; {delivered} results were delivered before it, "
            f"{len(pending)} later requests in flight were abandoned"
        )


def connect(
    plans: Sequence[RuntimePlan],
    model_inputs: Sequence[str],
    model_outputs: Sequence[str],
    security: Security = NO_SECURITY,
    **options: object,
) -> Driver:
    """Return a driver for workers already serving ``plans`` over gRPC.

    The stages of the longest chain must carry their addresses; the workers must serve
    ``plan_routes`` of each plan's chain. ``options`` go to ``Driver`` (hops, prices, window,
    timeout, retry, alpha, margin, codecs, specs, max_message).

    Raises:
        PartcError: if a plan's stages do not form a valid chain.
    """
    for plan in plans:
        plan_routes(plan.stages, model_inputs, model_outputs)
    longest = max(plans, key=lambda p: len(p.stages)).stages
    max_message = options.get("max_message", MAX_MESSAGE)
    channels = [GrpcChannel(s.name, s.address, security, max_message) for s in longest]
    return Driver(channels, plans, model_inputs, model_outputs, **options)


def stage_routes(
    plans: Sequence[RuntimePlan], model_inputs: Sequence[str], model_outputs: Sequence[str],
    hop_codecs: Sequence[str] | None = None,
) -> dict[str, dict[int, Route]]:
    """Return, per stage, its route in every plan whose chain reaches it (plan index -> route).

    ``hop_codecs`` gives the codec of each hop of the longest chain.

    Raises:
        PartcError: if a plan's stages do not form a valid chain.
    """
    routes: dict[str, dict[int, Route]] = {}
    for index, plan in enumerate(plans):
        codecs = None if hop_codecs is None else list(hop_codecs)[: len(plan.stages) - 1]
        for route in plan_routes(plan.stages, model_inputs, model_outputs, codecs):
            routes.setdefault(route.stage, {})[index] = route
    return routes


def in_process(
    plans: Sequence[RuntimePlan],
    fns: Mapping[str, StageFn],
    model_inputs: Sequence[str],
    model_outputs: Sequence[str],
    token: str | None = None,
    hop_codecs: Sequence[str] | None = None,
    **options: object,
) -> Driver:
    """Return a driver for ``plans`` run in this process by ``fns`` (program -> function).

    Frames are encoded, checked and decoded exactly as over gRPC, hop codecs (``hop_codecs``:
    one per hop of the longest chain) included; only the sockets are missing. ``options``
    go to ``Driver``.

    Raises:
        PartcError: if the stages do not form a valid chain, a function is missing or a
            codec is unknown.
    """
    missing = sorted({p for plan in plans for p in plan.programs.values() if p not in fns})
    if missing:
        raise PartcError(f"no stage function for {', '.join(map(repr, missing))}")
    routes = stage_routes(plans, model_inputs, model_outputs, hop_codecs)
    retry = options.get("retry", DEFAULT_RETRY)
    longest = max(plans, key=lambda p: len(p.stages)).stages
    sent = tuple(parse_codec(c).name for c in dict(options.get("codecs") or {}).values())  # the driver's codecs
    first = longest[0].name
    routes[first] = {i: replace(r, receive_codecs=r.receive_codecs + sent) for i, r in routes[first].items()}
    channels: list[Channel] = []
    downstream = None
    for stage in reversed(longest):
        stage_fns = {i: fns[plan.programs[stage.name]] for i, plan in enumerate(plans) if stage.name in plan.programs}
        worker = Worker(routes[stage.name], stage_fns, downstream, token=token, retry=retry)
        downstream = InProcessChannel(worker, token)
        channels.insert(0, downstream)
    return Driver(channels, plans, model_inputs, model_outputs, **options)
