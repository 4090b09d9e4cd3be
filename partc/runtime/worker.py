"""A worker: one stage of the pipeline, served over a transport.

The pipeline is a chain: the driver sends each request to the first stage only; every
worker runs its stage function, forwards the tensors later stages need to the next stage,
and replies with the model outputs produced at or after its stage (its own, plus the next
stage's reply). See ``partc.runtime.driver`` for why. What a worker does is fixed when it
starts, by one ``Route`` per plan of the build (``partc.runtime.routes``); a request names
its plan and cannot make a worker send anything anywhere else.

A worker is independent of how its stage function was loaded: it takes any callable from
named numpy arrays to named numpy arrays (``partc.plan.StageFn``). Arrays it passes in are
read-only views of the received frame. The function runs under a lock, one request at a
time per stage, while other requests are received, forwarded or answered concurrently:
each stage works on its own request, as in a hardware pipeline.

Run one from a shell (the stage function comes from ``MODULE:FACTORY``, a callable taking
the stage name; nothing received from the network is unpickled)::

    python -m partc.runtime.worker --stage edge.0 --fn mypkg.stages:load --reads a \\
        --writes b --forward b --next cloud.0=10.0.0.3:50051 --listen 0.0.0.0:50051
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from partc.codec import parse_codec
from partc.errors import PartcError, RunError
from partc.runtime.routes import Route
from partc.runtime.transport import (
    DEFAULT_RETRY,
    MAX_MESSAGE,
    NO_SECURITY,
    Channel,
    GrpcChannel,
    Rejected,
    RetryPolicy,
    Security,
    StageServer,
    call_stage,
    health_answer,
)
from partc.runtime.wire import Frame, Measurement, decode, encode

if TYPE_CHECKING:
    from partc.plan import StageFn

log = logging.getLogger(__name__)


class Worker:
    """Runs one stage for requests arriving as frames; a ``transport.Handler``."""

    def __init__(
        self,
        routes: Mapping[int, Route],
        fns: Mapping[int, StageFn],
        downstream: Channel | None = None,
        *,
        token: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_message: int = MAX_MESSAGE,
        exclusive: bool = True,
        unreachable: Callable[[], Collection[str]] = tuple,
    ) -> None:
        """Serve ``routes`` (plan index -> this stage's route in that plan) with ``fns``.

        ``fns`` maps each plan whose route has outputs to the stage function that computes
        them (plans sharing a program share the function); ``downstream`` is the channel to
        the next stage, needed iff some route forwards. A frame (request, or reply from the
        next stage) whose tensors take more than ``max_message`` bytes is refused before
        anything is decoded, and so is a tensor with a codec no route receives with. With
        ``exclusive`` False the functions run for several requests at once: for functions that
        queue and batch requests themselves (``partc.runtime.rayserve``). ``unreachable`` names
        the tier's other nodes this stage calls that do not answer now (asked on each HEALTH).

        Raises:
            PartcError: if the routes name different stages or next stages, a function is
                missing, or ``downstream`` does not match the routes' next stage.
        """
        if not routes:
            raise PartcError("a worker needs a route for at least one plan")
        names = {r.stage for r in routes.values()}
        nexts = {r.next_stage for r in routes.values()} - {None}
        stage = min(names)
        if len(names) > 1 or len(nexts) > 1:
            raise PartcError(f"stage {stage!r}: routes name several stages or next stages: {sorted(names | nexts)}")
        missing = sorted(p for p, r in routes.items() if r.outputs and p not in fns)
        if missing:
            raise PartcError(f"stage {stage!r}: no stage function for plan(s) {', '.join(map(str, missing))}")
        next_stage = next(iter(nexts), None)
        if (downstream is None) != (next_stage is None):
            raise PartcError(f"stage {stage!r}: a channel to the next stage is needed iff a route has one")
        if downstream is not None and downstream.stage != next_stage:
            raise PartcError(f"stage {stage!r}: next stage is {next_stage!r}, channel is to {downstream.stage!r}")
        self.stage = stage
        self.routes = dict(routes)
        self._fns = dict(fns)
        self._downstream = downstream
        self._security = Security(token=token)
        self._retry = retry
        self._max_message = max_message
        self._codecs = frozenset(c for r in routes.values() for c in r.receive_codecs)
        self._lock = threading.Lock() if exclusive else contextlib.nullcontext()
        self._unreachable = unreachable

    def health(self, token: str | None) -> bytes:
        """Answer the stage name and the tier's nodes it cannot reach; see ``transport.Handler``."""
        self._authorise(token)
        return health_answer(self.stage, self._unreachable())

    def run(self, payload: bytes, token: str | None, deadline: float) -> bytes:
        """Run the stage on one request frame and answer the reply frame; see ``transport.Handler``."""
        start = time.monotonic()
        self._authorise(token)
        try:
            frame = decode(payload, self._codecs, self._max_message)
        except RunError as err:
            raise Rejected("invalid_argument", f"stage {self.stage!r}: {err}") from None
        where = f"stage {self.stage!r} (request {frame.request_id}, plan {frame.plan})"
        route = self.routes.get(frame.plan)
        if route is None:
            raise Rejected("invalid_argument", f"{where}: this stage serves plans {sorted(self.routes)} only")
        missing = [n for n in route.receives if n not in frame.tensors]
        if missing:
            raise Rejected(
                "invalid_argument",
                f"{where}: missing input tensors {', '.join(map(repr, missing))}; got {sorted(frame.tensors)}",
            )
        produced, measurements = self._compute(route, frame, where)
        env = {**frame.tensors, **produced}
        results = {n: env[n] for n in route.results}
        if route.next_stage is not None:
            results_down, more = self._forward(route, frame, env, deadline, where)
            results.update(results_down)
            measurements += more
        try:
            return encode(Frame(frame.request_id, results, tuple(measurements), time.monotonic() - start, frame.plan))
        except PartcError as err:
            raise Rejected("internal", f"{where}: {err}") from None

    def _compute(self, route: Route, frame: Frame, where: str) -> tuple[Mapping[str, np.ndarray], list[Measurement]]:
        """Run the plan's stage function, if the stage has one in that plan."""
        if not route.outputs:
            return {}, []
        with self._lock:
            began = time.monotonic()
            try:
                produced = self._fns[frame.plan]({n: frame.tensors[n] for n in route.inputs})
            except Exception as err:  # any failure of the stage function goes to the caller, on one line
                lines = str(err).strip().splitlines() or [""]
                more = " (...)" if len(lines) > 1 else ""
                raise Rejected("internal", f"{where} failed: {type(err).__name__}: {lines[0]}{more}") from None
            computed = time.monotonic() - began
        if not isinstance(produced, Mapping):
            raise Rejected("internal", f"{where}: the stage function returned {type(produced).__name__}, not a dict")
        absent = [n for n in route.outputs if not isinstance(produced.get(n), np.ndarray)]
        if absent:
            raise Rejected("internal", f"{where}: the stage function returned no array for {', '.join(absent)}")
        return produced, [Measurement("compute", self.stage, "", computed)]

    def _forward(
        self, route: Route, frame: Frame, env: Mapping[str, np.ndarray], deadline: float, where: str
    ) -> tuple[dict[str, np.ndarray], list[Measurement]]:
        downstream = self._downstream
        now = time.monotonic()
        if now >= deadline:
            raise Rejected(
                "deadline_exceeded", f"{where}: the deadline passed before forwarding to {downstream.stage!r}"
            )
        try:
            forwarded = Frame(frame.request_id, {n: env[n] for n in route.forward}, plan=frame.plan)
            payload = encode(forwarded, route.codecs)
        except PartcError as err:
            raise Rejected("internal", f"{where}: {err}") from None
        # Leave a tenth of the remaining time to report a failure downstream before our caller gives up.
        sent = time.monotonic()
        try:
            answer = call_stage(downstream, payload, now + 0.9 * (deadline - now), self._retry)
        except RunError as err:
            raise Rejected("internal", str(err)) from None
        seconds = time.monotonic() - sent
        try:
            reply = decode(answer, max_bytes=self._max_message)
        except RunError as err:
            raise Rejected("internal", f"{where}: reply from stage {downstream.stage!r}: {err}") from None
        link = Measurement("link", self.stage, downstream.stage, seconds - reply.elapsed, len(payload), len(answer))
        return dict(reply.tensors), [link, *reply.measurements]

    def _authorise(self, token: str | None) -> None:
        if not self._security.accepts(token):
            raise self._security.refusal(self.stage, token)

    def close(self) -> None:
        """Close the channel to the next stage."""
        if self._downstream is not None:
            self._downstream.close()


def serve_stage(
    routes: Mapping[int, Route],
    fns: Mapping[int, StageFn],
    listen: str = "127.0.0.1:0",
    security: Security = NO_SECURITY,
    retry: RetryPolicy = DEFAULT_RETRY,
    threads: int = 16,
    max_message: int = MAX_MESSAGE,
    exclusive: bool = True,
    unreachable: Callable[[], Collection[str]] = tuple,
) -> StageServer:
    """Serve ``routes`` with ``fns`` (see ``Worker``) over gRPC on ``listen``; forward over gRPC
    to the routes' ``next_address``.

    ``security`` applies to both ends: the server's certificate and the token it demands,
    and the root certificate and token it presents to the next stage. ``threads`` bounds
    the calls served at once (each request in flight holds one until its reply), and
    ``max_message`` the bytes of a frame, received or decoded (``wire.frame_limit`` of the
    build's tensors): so a worker holds at most about ``threads`` x ``max_message``.
    ``exclusive``, ``unreachable``: see ``Worker``.

    Raises:
        RunError: if the address cannot be bound.
    """
    onward = next((r for r in routes.values() if r.next_stage is not None), None)
    downstream = GrpcChannel(onward.next_stage, onward.next_address, security, max_message) if onward else None
    worker = Worker(routes, fns, downstream, token=security.token, retry=retry, max_message=max_message,
                    exclusive=exclusive, unreachable=unreachable)
    return StageServer(worker, listen, security, threads, on_stop=worker.close, max_message=max_message)


def load_factory(spec: str) -> Callable[[str], StageFn]:
    """Import ``MODULE:FACTORY`` and return the factory.

    Raises:
        PartcError: if the module or attribute cannot be found.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PartcError(f"--fn {spec!r}: expected MODULE:FACTORY")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise PartcError(f"--fn {spec!r}: {err}") from err


def parse_pair(text: str, flag: str, form: str) -> tuple[str, str]:
    """Split a command-line ``KEY=VALUE``; raise PartcError naming ``flag`` and the ``form`` expected."""
    key, _, value = text.partition("=")
    if not key or not value:
        raise PartcError(f"{flag} {text!r}: expected {form}")
    return key, value


def _names(text: str) -> tuple[str, ...]:
    return tuple(n for n in text.split(",") if n)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve one stage until SIGTERM or SIGINT; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m partc.runtime.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True)
    parser.add_argument("--fn", required=True, help="MODULE:FACTORY; FACTORY(stage) returns the stage function")
    parser.add_argument("--reads", default="", help="comma-separated tensors the function reads")
    parser.add_argument("--writes", default="", help="comma-separated tensors the function writes")
    parser.add_argument("--forward", default="", help="comma-separated tensors sent to the next stage")
    parser.add_argument("--results", default="", help="comma-separated model outputs the function writes")
    parser.add_argument("--next", default=None, help="NAME=HOST:PORT of the next stage")
    parser.add_argument("--codec", action="append", default=[], help="TENSOR=CODEC for a forwarded tensor")
    parser.add_argument("--receive-codec", action="append", default=[], metavar="CODEC",
                        help="a codec tensors may arrive with (default: none); repeatable")
    parser.add_argument("--max-message", type=int, default=MAX_MESSAGE, metavar="BYTES",
                        help="largest frame accepted, received or decoded (default: gRPC's 2 GiB)")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--ready-file", type=Path, help="written (JSON: stage, address) once serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        next_stage, next_address = parse_pair(args.next, "--next", "NAME=HOST:PORT") if args.next else (None, None)
        route = Route(
            args.stage,
            _names(args.reads),
            _names(args.writes),
            _names(args.forward),
            _names(args.results),
            next_stage,
            next_address,
            dict(parse_pair(text, "--codec", "TENSOR=CODEC") for text in args.codec),
            tuple(parse_codec(codec).name for codec in args.receive_codec or ["none"]),
        )
        for codec in route.codecs.values():
            parse_codec(codec)
        security = Security.from_files(args.token_file, args.cert, args.key, args.root)
        fn = load_factory(args.fn)(args.stage)
        server = serve_stage({0: route}, {0: fn}, args.listen, security, threads=args.threads,
                             max_message=args.max_message)
    except PartcError as err:
        print(f"partc-worker: error: {err}", file=sys.stderr)
        return err.exit_code
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"stage": args.stage, "address": server.address}))
        os.replace(tmp, args.ready_file)
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
