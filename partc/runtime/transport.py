"""Moving frames (``partc.runtime.wire``) to a stage: over gRPC between machines, or in-process.

Both transports carry the same bytes through the same interface, ``Channel.call(method,
payload, timeout) -> bytes``, and fail the same way, so a driver or a worker does not know
which one it talks to. ``call_stage`` adds what every caller needs on top: one deadline for
the whole call, retries with exponential back-off while the stage is unreachable, and a
``RunError`` naming the stage and its address.

gRPC without generated code: one service ``partc.Stage`` with two unary methods whose
requests and replies are raw bytes (no serializers), registered through a generic handler.
``Run`` takes a request frame and answers a reply frame; ``Health`` takes nothing and
answers the UTF-8 name of the stage served.

What a server holds before it knows who calls is bounded. A shared token travels as the
``partc-token`` metadata entry (without TLS it crosses the network in clear) and is checked
by a server interceptor when a call arrives, from its metadata alone: a call without the
token is refused before its message is read, so it costs the server no more than gRPC's
flow-control window. The message limits are per method: ``Run`` accepts frames of up to
``max_message`` bytes (what the build's largest frame can take, ``wire.frame_limit``;
default gRPC's own ceiling, 2 GiB), ``Health`` never reads its request. A worker's own
refusals carry the ``partc-error`` trailing metadata entry, so a caller tells "the stage
said no" from "the stage could not be reached".

grpc is imported only by the gRPC classes, so the in-process transport works without it.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from partc.errors import PartcError, RunError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

SERVICE = "partc.Stage"
RUN = f"/{SERVICE}/Run"
HEALTH = f"/{SERVICE}/Health"
TOKEN_KEY = "partc-token"
ERROR_KEY = "partc-error"
MAX_MESSAGE = 2**31 - 1  # gRPC's ceiling on one message
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _message_options(max_message: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", min(max_message, MAX_MESSAGE))]


@dataclass(frozen=True)
class Security:
    """Who may talk to a stage, and how channels are protected.

    Attributes:
        token: shared secret every peer of the pipeline sends; a worker with a token
            refuses calls without it (UNAUTHENTICATED). None: no check.
        cert: PEM certificate chain a worker serves TLS with (needs ``key``).
        key: PEM private key of ``cert``.
        root: PEM certificate a caller trusts; when set, channels use TLS.
    """

    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    root: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise PartcError("TLS needs both a certificate and its private key; give both or neither")

    @classmethod
    def from_files(
        cls, token_file: Path | None = None, cert: Path | None = None, key: Path | None = None, root: Path | None = None
    ) -> Security:
        """Read a token (first line of ``token_file``) and PEM files.

        Raises:
            PartcError: if a file cannot be read, or the token file is empty.
        """

        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise PartcError(f"{path}: cannot read: {err.strerror}") from err

        token = None
        if token_file is not None:
            lines = read(token_file).decode("utf-8", "replace").splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise PartcError(f"{token_file}: empty token file; write the shared token on its first line")
        security = cls(token=token, cert=read(cert), key=read(key), root=read(root))
        _check_pem(cert, key, root)
        return security

    def accepts(self, token: str | None) -> bool:
        """Whether a call presenting ``token`` may be served (constant-time comparison)."""
        if self.token is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self.token.encode())

    def refusal(self, stage: str, token: str | None) -> Rejected:
        """The refusal of a call to ``stage`` that presented ``token``, which ``accepts`` refused."""
        state = "no" if token is None else "a wrong"
        return Rejected(
            "unauthenticated",
            f"stage {stage!r} refused a call with {state} token (gRPC metadata {TOKEN_KEY!r}); "
            "give every stage and the driver the same token",
        )


def _check_pem(cert: Path | None, key: Path | None, root: Path | None) -> None:
    """Raise PartcError naming the file unless ``cert`` and ``key`` are a PEM chain and its key, ``root`` a PEM
    certificate (checked here: gRPC would only say that it cannot listen or connect)."""
    import ssl

    try:
        if cert is not None:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        raise PartcError(f"--cert {cert} --key {key}: not a PEM certificate chain and its unencrypted private key "
                         f"({err.reason or err}); give the files the certificate authority issued") from None
    try:
        if root is not None:
            ssl.create_default_context(cafile=root)
    except ssl.SSLError as err:
        raise PartcError(f"--root {root}: not a PEM certificate ({err.reason or err})") from None


@dataclass(frozen=True)
class RetryPolicy:
    """How often a call to an unreachable stage is tried, and how long to wait in between.

    Attributes:
        attempts: tries in all (1: no retry).
        backoff: seconds before the second try; doubled after each further try.
        max_backoff: longest wait between two tries.
    """

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 1.0


NO_SECURITY = Security()
DEFAULT_RETRY = RetryPolicy()


class Rejected(Exception):  # a refusal travelling to the caller, not a partc error
    """A worker's refusal of a call; the caller gets ``message`` verbatim.

    Attributes:
        status: gRPC status name: "unauthenticated", "invalid_argument", "internal" or
            "deadline_exceeded".
        message: the whole message, naming the stage.
    """

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CallFailed(Exception):  # internal: call_stage turns it into a RunError
    """One failed try of a call. ``kind``: unreachable, timeout, refused or error."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Handler(Protocol):
    """The server side of a stage, as both transports call it (``Worker``)."""

    stage: str

    def run(self, payload: bytes, token: str | None, deadline: float) -> bytes:
        """Answer a request frame with a reply frame before ``deadline`` (time.monotonic).

        Raises:
            Rejected: if the call is refused or fails.
        """

    def health(self, token: str | None) -> bytes:
        """Answer ``health_answer``: the stage's name and the tier's nodes it cannot reach.

        Raises:
            Rejected: if the token is refused.
        """


def health_answer(stage: str, unreachable: Collection[str] = ()) -> bytes:
    """A worker's answer to HEALTH: its stage name, then one line per node of its tier that it
    calls (``edge.1``, running its tiles or branches) and cannot reach."""
    return "\n".join([stage, *sorted(unreachable)]).encode()


def read_health(answer: bytes) -> tuple[str, frozenset[str]]:
    """The stage and the unreachable nodes of a ``health_answer``."""
    stage, *unreachable = answer.decode(errors="replace").split("\n")
    return stage, frozenset(unreachable)


class Channel(Protocol):
    """A caller's end of the link to one stage."""

    stage: str
    address: str

    def call(self, method: str, payload: bytes, timeout: float) -> bytes:
        """Send ``payload`` to ``method`` (RUN or HEALTH) and return the reply.

        Raises:
            CallFailed: if this try failed.
        """

    def close(self) -> None:
        """Release the connection."""


class InProcessChannel:
    """Calls a ``Handler`` in this process, with the same bytes and failures as gRPC.

    A running stage function cannot be interrupted: a timeout is reported when it returns.
    """

    def __init__(self, handler: Handler, token: str | None = None) -> None:
        self.stage = handler.stage
        self.address = "in-process"
        self._handler: Handler | None = handler
        self._token = token

    def call(self, method: str, payload: bytes, timeout: float) -> bytes:
        """Call the handler directly; see ``Channel.call``."""
        if self._handler is None:
            raise CallFailed("unreachable", "the channel is closed")
        try:
            if method == HEALTH:
                return self._handler.health(self._token)
            return self._handler.run(bytes(payload), self._token, time.monotonic() + timeout)
        except Rejected as err:
            raise CallFailed("refused", err.message) from None

    def close(self) -> None:
        """Forget the handler: later calls find the stage unreachable."""
        self._handler = None


class GrpcChannel:
    """A gRPC channel to the worker serving ``stage`` at ``address`` (host:port)."""

    def __init__(
        self, stage: str, address: str, security: Security = NO_SECURITY, max_message: int = MAX_MESSAGE
    ) -> None:
        """Open a channel; replies larger than ``max_message`` bytes are refused."""
        import grpc

        self.stage = stage
        self.address = address
        options = _message_options(max_message) + _RECONNECT_OPTIONS
        if security.root is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=security.root)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._methods = {m: self._channel.unary_unary(m) for m in (RUN, HEALTH)}
        self._metadata = ((TOKEN_KEY, security.token),) if security.token is not None else ()
        self._grpc = grpc

    def call(self, method: str, payload: bytes, timeout: float) -> bytes:
        """One unary call with raw bytes; see ``Channel.call``."""
        if len(payload) > MAX_MESSAGE:
            raise CallFailed("error", f"a {len(payload)}-byte frame exceeds gRPC's 2 GiB message limit")
        try:
            return self._methods[method](payload, timeout=timeout, metadata=self._metadata)
        except self._grpc.RpcError as err:
            raise _failure(err, self._grpc) from None

    def close(self) -> None:
        """Close the gRPC channel."""
        self._channel.close()


def _failure(err: grpc.RpcError, grpc_module) -> CallFailed:
    code, details = err.code(), err.details() or ""
    if any(key == ERROR_KEY for key, _ in err.trailing_metadata() or ()):
        return CallFailed("refused", details)
    kinds = {
        grpc_module.StatusCode.UNAVAILABLE: "unreachable",
        grpc_module.StatusCode.DEADLINE_EXCEEDED: "timeout",
    }
    return CallFailed(kinds.get(code, "error"), f"{code.name}: {details}")


def call_stage(
    channel: Channel, payload: bytes, deadline: float, retry: RetryPolicy = DEFAULT_RETRY, method: str = RUN
) -> bytes:
    """Call ``method`` on ``channel`` before ``deadline`` (time.monotonic), retrying while unreachable.

    Only an unreachable stage is tried again (a request is idempotent: a stage function
    is pure), after ``retry.backoff`` seconds, doubling, and never past the deadline.

    Raises:
        RunError: naming the stage and its address, if the stage stays unreachable, does
            not answer before the deadline, refuses the call (wrong token, bad frame) or
            fails; a failure reported by a later stage is passed on verbatim.
    """
    where = f"stage {channel.stage!r} at {channel.address}"
    start = time.monotonic()
    delay = retry.backoff
    for attempt in range(1, max(1, retry.attempts) + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return channel.call(method, payload, remaining)
        except CallFailed as err:
            failure = err
        if failure.kind == "refused":
            raise RunError(failure.detail)
        if failure.kind == "timeout":
            break
        if failure.kind == "error":
            raise RunError(f"{where} failed: {failure.detail}")
        if attempt == retry.attempts or deadline - time.monotonic() <= delay:
            raise RunError(f"{where} is unreachable: {failure.detail} (after {attempt} attempts)")
        log.warning("%s is unreachable (attempt %d of %d): %s", where, attempt, retry.attempts, failure.detail)
        time.sleep(delay)
        delay = min(2 * delay, retry.max_backoff)
    raise RunError(f"{where} did not answer within {deadline - start:.2f} s (deadline exceeded)")


class StageServer:
    """A gRPC server serving one ``Handler``; ``address`` is where it listens (port resolved)."""

    def __init__(
        self,
        handler: Handler,
        listen: str = "127.0.0.1:0",
        security: Security = NO_SECURITY,
        threads: int = 16,
        on_stop: Callable[[], None] | None = None,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        """Start serving ``handler`` on ``listen`` (host:port; port 0 picks a free port).

        ``on_stop`` runs after the server stopped (e.g. to close the handler's own channels);
        ``max_message`` bounds a ``Run`` request, in bytes (see the module docstring).

        Raises:
            RunError: if the address cannot be bound.
        """
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        def run(request: bytes, context: grpc.ServicerContext) -> bytes:
            remaining = context.time_remaining()
            deadline = time.monotonic() + (remaining if remaining is not None else 3600.0)
            return _answer(context, lambda: handler.run(request, _token(context), deadline), grpc)

        def health(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:  # the request is never read
            return _answer(context, lambda: handler.health(_token(context)), grpc)

        # Without SO_REUSEPORT (gRPC's default is on), a second worker on a taken port fails instead of sharing it.
        options = [*_message_options(max_message), ("grpc.so_reuseport", 0)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=options,
                                   interceptors=[_Authenticator(handler.stage, security, grpc)])
        methods = {"Run": grpc.unary_unary_rpc_method_handler(run),
                   "Health": grpc.stream_unary_rpc_method_handler(health)}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        host = listen.rpartition(":")[0]
        try:
            if security.cert is not None:
                credentials = grpc.ssl_server_credentials([(security.key, security.cert)])
                bound = self._server.add_secure_port(listen, credentials)
            else:
                bound = self._server.add_insecure_port(listen)
        except RuntimeError as err:
            raise RunError(f"stage {handler.stage!r}: cannot listen on {listen}: {err}") from err
        if not bound:
            raise RunError(f"stage {handler.stage!r}: cannot listen on {listen} (address in use or invalid)")
        self.address = f"{host}:{bound}"
        self.stage = handler.stage
        self._on_stop = on_stop
        self._server.start()
        log.info("serving stage %r on %s%s", handler.stage, self.address, " (TLS)" if security.cert else "")

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; calls still running get ``grace`` seconds to finish."""
        self._server.stop(grace).wait(grace + 5.0)
        if self._on_stop is not None:
            self._on_stop()

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()


class _Authenticator:  # a grpc.ServerInterceptor
    """Refuses a call without the token when it arrives, from its metadata: its message is never read."""

    def __init__(self, stage: str, security: Security, grpc_module) -> None:
        self._stage = stage
        self._security = security
        self._grpc = grpc_module

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        token = next((value for key, value in details.invocation_metadata if key == TOKEN_KEY), None)
        if self._security.accepts(token):
            return continuation(details)
        refusal = self._security.refusal(self._stage, token)

        def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:  # a stream: nothing read
            _abort(context, refusal, self._grpc)

        return self._grpc.stream_unary_rpc_method_handler(refuse)


def _token(context: grpc.ServicerContext) -> str | None:
    return next((value for key, value in context.invocation_metadata() if key == TOKEN_KEY), None)


def _answer(context: grpc.ServicerContext, fn: Callable[[], bytes], grpc_module) -> bytes:
    try:
        return fn()
    except Rejected as err:
        _abort(context, err, grpc_module)


def _abort(context: grpc.ServicerContext, err: Rejected, grpc_module) -> None:
    context.set_trailing_metadata(((ERROR_KEY, err.status),))
    context.abort(getattr(grpc_module.StatusCode, err.status.upper()), err.message)
