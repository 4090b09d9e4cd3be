"""What the testbed (``partc.runtime.testbed``) runs in a node's cgroup to calibrate it.

``python -m partc.runtime.calibrate BUILD STAGE [PROGRAM...]`` prints, as JSON, the median
seconds of each program of the stage run here (``--threads``), of each called through the
stage's worker from its tier's first node (``--at PEERS``), or of the stage's identity route
(``--identity ADDRESS``): ``CALIBRATION_WARMUP`` untimed calls, then the median of
``CALIBRATION_REPEATS``, each followed by ``CALIBRATION_REST`` and a share of ``PERIOD`` that
spreads the calls' phases over the quota's period (``partc.profile.time_call``), on
seeded inputs of the programs' compiled shapes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from partc.manifest import manifest_stages, read_manifest
from partc.plan import TensorSpec
from partc.profile import time_call
from partc.runtime.deploy import START_TIMEOUT, tile_call
from partc.runtime.local import load_programs
from partc.runtime.netns import CFS_PERIOD_US
from partc.runtime.ping import IDENTITY_PLAN
from partc.runtime.transport import GrpcChannel, RetryPolicy, Security, call_stage
from partc.runtime.wire import Frame, decode, encode

CALIBRATION_WARMUP = 2  # untimed calls of each program before the timed ones
CALIBRATION_REPEATS = 9  # timed calls; the median counts
PERIOD = CFS_PERIOD_US * 1e-6  # a node's CPU quota period: calls start at phases spread over it
# Untimed seconds after each calibration call (and a share of PERIOD): two CFS periods refill a
# node's quota, as the waits between requests sent one at a time (``measure``) do; back to back,
# calls would drain it.
CALIBRATION_REST = 2 * PERIOD


def time_programs(build: Path, stage: str, threads: int, pids: Sequence[str]) -> dict[str, float]:
    """Median seconds of each program ``pids`` of ``stage`` in ``build``, run here with ``threads``
    threads on seeded inputs of its compiled shapes (``Testbed.calibrate`` runs this in a node's cgroup)."""
    manifest = read_manifest(build)
    (entry,) = [s for s in manifest_stages(manifest, build, verify=[stage]) if s.name == stage]
    entry = replace(entry, programs={pid: entry.programs[pid] for pid in pids}, schedules={})
    with ThreadPoolExecutor(1) as pool:
        fns = load_programs([entry], [stage], None, pool, threads)
        return {pid: time_call(lambda fn=fns[pid], x=tensors: fn(x), CALIBRATION_WARMUP, CALIBRATION_REPEATS,
                               CALIBRATION_REST, PERIOD)[0]
                for pid, tensors in _seeded_inputs({pid: entry.programs[pid].inputs for pid in pids}).items()}


def _seeded_inputs(specs: Mapping[str, Sequence[TensorSpec]]) -> dict[str, dict[str, np.ndarray]]:
    """Program id -> seeded tensors of its inputs' compiled shapes (``specs``: program id -> inputs)."""
    rng = np.random.default_rng(0)
    return {pid: {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in inputs}
            for pid, inputs in specs.items()}


def time_calls(build: Path, stage: str, pids: Sequence[str], peers: Mapping[str, str],
               token_file: Path | None) -> dict[str, float]:
    """Median round-trip seconds of each program ``pids`` of ``stage`` called from here through its
    worker, as its tier's first node calls it (``peers``: that node's ``--peer`` addresses;
    ``Testbed.calibrate_calls`` runs this in the first node's namespace and cgroup)."""
    manifest = read_manifest(build)
    stages = manifest_stages(manifest, build, verify=())
    node = manifest.stage(stage)
    first = next(s for s in stages if s.tier == node.tier and s.index == 0)
    call, _ = tile_call(stages, first, peers, Security.from_files(token_file))
    return {pid: time_call(lambda p=pid, x=tensors: call(node.index, p, x),
                           CALIBRATION_WARMUP, CALIBRATION_REPEATS, CALIBRATION_REST, PERIOD)[0]
            for pid, tensors in _seeded_inputs({pid: node.program(pid).inputs for pid in pids}).items()}


def time_identity(build: Path, stage: str, address: str, token_file: Path | None) -> dict[str, float]:
    """Median round-trip seconds of ``stage``'s identity route at ``address``, called from here
    (``Testbed.calibrate_overheads`` runs this in the stage's namespace and cgroup)."""
    channel = GrpcChannel(stage, address, Security.from_files(token_file))
    payload = encode(Frame(0, {}, plan=IDENTITY_PLAN))

    def ask() -> Frame:
        return decode(call_stage(channel, payload, time.monotonic() + START_TIMEOUT, RetryPolicy(attempts=1)))

    return {stage: time_call(ask, CALIBRATION_WARMUP, CALIBRATION_REPEATS, CALIBRATION_REST, PERIOD)[0]}


if __name__ == "__main__":  # what the testbed runs in a node's cgroup
    import argparse

    parser = argparse.ArgumentParser(prog="python -m partc.runtime.calibrate")
    parser.add_argument("build", type=Path)
    parser.add_argument("stage")
    parser.add_argument("programs", nargs="*")
    parser.add_argument("--threads", type=int, default=1, help="time the programs here with this many threads")
    parser.add_argument("--at", type=json.loads, help="time calls to the stage's worker instead: JSON peers map")
    parser.add_argument("--identity", metavar="ADDRESS", help="time the stage's identity route at ADDRESS instead")
    parser.add_argument("--token-file", type=Path)
    args = parser.parse_args()
    if args.identity:
        times = time_identity(args.build, args.stage, args.identity, args.token_file)
    elif args.at is None:
        times = time_programs(args.build, args.stage, args.threads, args.programs)
    else:
        times = time_calls(args.build, args.stage, args.programs, args.at, args.token_file)
    sys.stdout.write(json.dumps(times))
