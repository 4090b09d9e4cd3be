"""``partc ping``: from any machine, is every stage a deployment needs up, ours, and serving this build?

Every worker serves, besides the routes of the build's plans, the *identity route*: plan
number ``IDENTITY_PLAN`` (the largest the wire format's u16 holds, never a plan's index).
It reads no tensor and answers one, ``BUILD_TENSOR``: the sha256 of the ``manifest.json``
the worker serves, 32 bytes of uint8. ``ping`` calls each stage's ``Health`` (reachable,
accepts our token, serves the stage we expect) and then the identity route (the same
build as ours), through the ordinary transport, with its token and TLS.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from partc.errors import PartcError, RunError
from partc.manifest import MANIFEST, Manifest, read_manifest
from partc.runtime.routes import Route
from partc.runtime.transport import (
    HEALTH,
    NO_SECURITY,
    GrpcChannel,
    RetryPolicy,
    Security,
    call_stage,
    read_health,
)
from partc.runtime.wire import Frame, decode, encode

if TYPE_CHECKING:
    from partc.plan import StageFn

IDENTITY_PLAN = 0xFFFF
BUILD_TENSOR = "partc.build"
PING_RETRY = RetryPolicy(attempts=2)


def build_id(build: Path | str) -> str:
    """The sha256 (hex) of the ``manifest.json`` of ``build`` (a folder, or the manifest itself)."""
    path = Path(build)
    return hashlib.sha256((path / MANIFEST if path.is_dir() else path).read_bytes()).hexdigest()


def identity_route(stage: str, build: Path | str) -> tuple[Route, StageFn]:
    """The identity route of the worker serving ``stage`` of ``build``, and its stage function."""
    answer = {BUILD_TENSOR: np.frombuffer(bytes.fromhex(build_id(build)), dtype=np.uint8)}
    return Route(stage, (), (BUILD_TENSOR,), results=(BUILD_TENSOR,)), lambda _: answer


def needed_stages(manifest: Manifest, stage: str | None = None) -> list[str]:
    """The stages a machine calls: the driver every stage of the chain; ``stage``'s worker its next
    stage and the nodes that run its tiles.

    Raises:
        PartcError: for an unknown ``stage``.
    """
    names = [s.name for s in manifest.stages]
    chain = [s.name for s in manifest.stages if s.index == 0]
    if stage is None:
        return chain
    if stage not in names:
        raise PartcError(f"no stage {stage!r} in this build; stages are: {', '.join(names)}")
    (entry,) = [s for s in manifest.stages if s.name == stage]
    following = chain[chain.index(stage) + 1:][:1] if stage in chain else []
    peers = [s.name for s in manifest.stages if entry.schedules and s.tier == entry.tier and s.index > 0]
    return following + peers


@dataclass(frozen=True)
class Answer:
    """What one stage answered ``ping``: ``ok`` when it is up, accepts us and serves our build."""

    stage: str
    address: str
    ok: bool
    detail: str
    seconds: float


def ping(build: Path | str, addresses: Mapping[str, str], security: Security = NO_SECURITY,
         timeout: float = 5.0) -> list[Answer]:
    """Python twin of ``partc ping``: check the worker at each address against ``build``.

    Args:
        build: the build folder (or its manifest) the workers should serve.
        addresses: stage -> host:port of its worker.
        security: the token and TLS root to call them with.
        timeout: seconds for each stage's two calls.

    Raises:
        ManifestError: for a bad manifest.
        PartcError: if ``addresses`` names a stage the build does not have.
    """
    manifest = read_manifest(build)
    names = [s.name for s in manifest.stages]
    unknown = sorted(set(addresses) - set(names))
    if unknown:
        raise PartcError(f"no stage {unknown[0]!r} in this build; stages are: {', '.join(names)}")
    want = build_id(build)
    answers = []
    for stage, address in addresses.items():
        channel = GrpcChannel(stage, address, security)
        start = time.monotonic()
        try:
            served, unreachable = read_health(call_stage(channel, b"", start + timeout, PING_RETRY, HEALTH))
            if served != stage:
                raise RunError(f"serves stage {served!r}, not {stage!r}: check the address")
            if unreachable:
                raise RunError(f"cannot reach {', '.join(sorted(unreachable))} of its tier: check those workers and "
                               "its --peer addresses")
            reply = decode(call_stage(channel, encode(Frame(0, {}, plan=IDENTITY_PLAN)), start + timeout, PING_RETRY))
            got = bytes(np.asarray(reply.tensors[BUILD_TENSOR])).hex()
            if got != want:
                raise RunError(f"serves another build (manifest.json sha256 {got[:16]}, this one {want[:16]}); "
                               "deploy the same build everywhere")
            answers.append(Answer(stage, address, True, f"serves this build ({want[:16]})", time.monotonic() - start))
        except (RunError, KeyError) as err:
            detail = str(err) if isinstance(err, RunError) else f"answered no {BUILD_TENSOR}: an older partc?"
            answers.append(Answer(stage, address, False, detail, time.monotonic() - start))
        finally:
            channel.close()
    return answers
