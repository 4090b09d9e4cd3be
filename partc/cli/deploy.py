"""The runtime side of the ``partc`` command line: ``run``, ``serve``, ``bundle``, ``unpack``, ``ping``, ``testbed``.

Each command is a ``_add_<command>(subparsers)`` function that declares its flags and sets
``func`` to the ``_run_<command>(args) -> int`` that does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from partc.errors import PartcError, RunError

log = logging.getLogger("partc")


def _add_security_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="shared secret (first line) every stage and the driver must present")
    parser.add_argument("--cert", type=Path, metavar="PEM", help="TLS certificate this worker serves with")
    parser.add_argument("--key", type=Path, metavar="PEM", help="private key of --cert")
    parser.add_argument("--root", type=Path, metavar="PEM", help="TLS root certificate to trust when calling a stage")


def _security(args):
    from partc.runtime.transport import Security

    return Security.from_files(args.token_file, args.cert, args.key, args.root)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run a compiled build, in this process or across worker processes",
        description="Load BUILD (checking every artifact against the manifest's sha256) and run its stages "
        "through their artifacts. Without --input, a seeded example input of the compiled shape is used. "
        "With --distributed, every stage runs in its own worker over gRPC: started here on loopback, or "
        "already serving on other machines (--connect); --requests N streams N requests through the "
        "pipeline with several in flight and reports latency, throughput and the measured links.",
        epilog="examples:\n  partc run build/resnet50 --input x.npy --output y.npy\n"
        "  partc run build/resnet50 --distributed --requests 50\n"
        "  partc run build/resnet50 --distributed --connect device.0=10.0.0.2:50051 "
        "--connect edge.0=10.0.0.3:50051 --connect cloud.0=10.0.0.4:50051\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--input", action="append", default=[], type=Path, metavar="FILE",
                   help=".npy file of one model input, in the model's input order; repeatable")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="where to write the output: .npy for one output, .npz for several")
    p.add_argument("--distributed", action="store_true", help="run every stage in its own gRPC worker")
    p.add_argument("--connect", action="append", default=[], metavar="STAGE=HOST:PORT",
                   help="with --distributed: a worker already serving STAGE ('partc serve'); repeat for every stage")
    p.add_argument("--requests", type=int, default=1, metavar="N", help="with --distributed: requests to stream")
    p.add_argument("--window", type=int, default=4, metavar="N", help="with --distributed: requests in flight")
    _add_security_args(p)
    p.set_defaults(func=_run_run)


def _run_run(args) -> int:
    import numpy as np

    from partc.manifest import read_manifest
    from partc.runtime.driver import check_inputs
    from partc.trace import parse_input_spec

    manifest = read_manifest(args.build)
    specs = manifest.inputs
    if args.input and len(args.input) != len(specs):
        raise PartcError(f"--input: the model takes {len(specs)} input(s), {len(args.input)} given")
    if args.connect and not args.distributed:
        raise PartcError("--connect needs --distributed")
    for flag, value in (("--requests", args.requests), ("--window", args.window)):
        if value < 1:
            raise PartcError(f"{flag} {value}: must be at least 1")
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        problem = "is a folder" if args.output.is_dir() else f"folder {str(args.output.parent)!r} does not exist"
        raise PartcError(f"--output {args.output}: {problem}; give a file (.npy for one output, .npz for several) "
                         "in an existing folder")
    if args.input:
        inputs = {spec.name: _read_npy(path) for spec, path in zip(specs, args.input, strict=True)}
        check_inputs(specs, inputs)  # before anything is read into memory or any worker started
        inputs = {name: np.array(value) for name, value in inputs.items()}
    else:
        inputs = {s.name: parse_input_spec(",".join(map(str, s.shape)) + f":{s.dtype}").example().numpy()
                  for s in specs}
    if args.distributed:
        outputs = _run_distributed(args, inputs)
    else:
        from partc.runtime.local import load

        outputs = load(args.build)(inputs)
    if args.output:
        try:
            if len(outputs) == 1 and args.output.suffix == ".npy":
                np.save(args.output, next(iter(outputs.values())))
            else:
                np.savez(args.output, **outputs)
        except OSError as err:
            raise PartcError(f"--output {args.output}: cannot write: {err.strerror}") from err
    for name, value in outputs.items():
        print(f"{name}: {'x'.join(map(str, value.shape))} {value.dtype}, "
              f"min {value.min():.4g} max {value.max():.4g} mean {value.mean():.4g}")
    return 0


def _run_distributed(args, inputs):
    import contextlib
    import statistics
    import time

    from partc.runtime.deploy import LocalWorkers, connect_build
    from partc.runtime.worker import parse_pair

    addresses = dict(parse_pair(text, "--connect", "STAGE=HOST:PORT") for text in args.connect)
    with contextlib.ExitStack() as stack:
        if not addresses:
            print("partc: starting one worker process per stage on 127.0.0.1", file=sys.stderr)
            addresses = stack.enter_context(LocalWorkers(args.build, args.token_file)).addresses
        driver = stack.enter_context(connect_build(args.build, addresses, _security(args), window=args.window))
        driver.check()
        started, latencies, outputs = time.perf_counter(), [], None
        sent = []
        for result in driver.run(_stamped(inputs, args.requests, sent)):
            latencies.append(time.perf_counter() - sent[len(latencies)])
            outputs = outputs or result
        elapsed = time.perf_counter() - started
        print(f"{args.requests} requests in {elapsed:.2f} s: {args.requests / elapsed:.1f} requests/s, latency "
              f"median {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
        for link, estimate in driver.links.items():
            rate = estimate.bytes_per_second
            print(f"link {link}: " + (f"{rate * 8 / 1e6:.1f} Mbit/s measured" if rate else "no transfers"))
        for stage, ewma in driver.compute.items():
            print(f"stage {stage}: compute {ewma.value * 1e3:.2f} ms (smoothed)")
        for switch in driver.switches:
            print(f"request {switch.request}: switched from plan {switch.old} to {switch.new}: {switch.reason}")
    return outputs


def _stamped(inputs, count: int, sent: list):
    """Yield ``inputs`` ``count`` times, recording when each request is handed to the driver."""
    import time

    for _ in range(count):
        sent.append(time.perf_counter())
        yield inputs


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve one stage of a build as a gRPC worker",
        description="Serve STAGE of BUILD over gRPC until SIGTERM or Ctrl-C. The worker checks its artifacts "
        "(one per program: the stage's share of each of the build's plans) against the manifest's sha256, "
        "loads them, runs the one of each request's plan and forwards what later stages read to the next "
        "stage's worker (--next). Only the manifest and this stage's artifacts are needed on the machine: "
        "BUILD may be the tier's bundle ('partc bundle'), checked and unpacked beside it first ('partc unpack'). "
        "Listening beyond 127.0.0.1 without --token-file logs a warning.",
        epilog="example (three machines, last stage first):\n"
        "  partc serve cloud.tar.gz --stage cloud.0 --listen 0.0.0.0:50051 --token-file token\n"
        "  partc serve edge.tar.gz --stage edge.0 --listen 0.0.0.0:50051 --next 10.0.0.4:50051 --token-file token\n"
        "  partc serve device.tar.gz --stage device.0 --listen 0.0.0.0:50051 --next 10.0.0.3:50051 "
        "--token-file token\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD",
                   help="folder written by 'partc compile', or a bundle (.tar.gz) written by 'partc bundle'")
    p.add_argument("--stage", required=True, metavar="STAGE", help="stage to serve, e.g. edge.0")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:0, any free port)")
    p.add_argument("--next", metavar="HOST:PORT", help="address of the next stage's worker")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="compute threads of the stage's programs (TorchScript, ONNX); default: every core")
    p.add_argument("--peer", action="append", default=[], metavar="STAGE=HOST:PORT",
                   help="a node of this tier that runs tiles for STAGE's tiled programs (edge.1=10.0.0.5:50051); "
                        "repeat for each")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="write {stage, address} as JSON here once serving (for scripts)")
    _add_security_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    import os

    from partc.cli import Interrupted
    from partc.runtime.deploy import serve
    from partc.runtime.worker import parse_pair

    peers = dict(parse_pair(text, "--peer", "STAGE=HOST:PORT") for text in args.peer)
    server = serve(args.build, args.stage, listen=args.listen, next_address=args.next, peers=peers,
                   security=_security(args), threads=args.threads)
    log.warning("serving stage %s on %s", args.stage, server.address)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"stage": args.stage, "address": server.address}))
        os.replace(tmp, args.ready_file)
    try:
        server.wait()
    except Interrupted as stop:  # SIGTERM or SIGINT is how a server is told to stop: a clean exit
        log.warning("stage %s stopped by %s", args.stage, stop)
    finally:
        server.stop()
    return 0


def _add_bundle(sub) -> None:
    p = sub.add_parser(
        "bundle", help="pack what one tier's machines need from a build",
        description="Write a .tar.gz with SHA256SUMS (every file's sha256), the manifest, a README for the tier, "
        "and for every stage of TIER its artifacts (checked against the manifest's sha256), start script, "
        "settings file and systemd unit. The same build gives the same bytes. 'partc unpack' (or 'partc serve "
        "FILE.tar.gz') checks it on the machine.",
        epilog="example:\n  partc bundle build/resnet50 --tier edge -o edge.tar.gz\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--tier", required=True, help="tier name from the cluster file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="archive to write (.tar.gz)")
    p.set_defaults(func=_run_bundle)


def _run_bundle(args) -> int:
    from partc.runtime.bundle import bundle

    members = bundle(args.build, args.tier, args.output)
    print(f"wrote {args.output}: {', '.join(members)}")
    return 0


def _add_unpack(sub) -> None:
    p = sub.add_parser(
        "unpack", help="check a bundle and unpack it into a folder of its own",
        description="Check ARCHIVE, a bundle written by 'partc bundle' (regular files only, each matching "
        "SHA256SUMS, each artifact matching the manifest), and unpack it into DIR. A truncated, tampered or "
        "hostile archive is refused and nothing is written. An older bundle in DIR is replaced, keeping its "
        "*.env settings files; each settings file's PARTC is set to this partc.",
        epilog="example:\n  partc unpack edge.tar.gz -o /opt/partc/resnet50\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("archive", type=Path, metavar="ARCHIVE", help="bundle written by 'partc bundle' (.tar.gz)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="folder to unpack into (default: ARCHIVE without .tar.gz)")
    p.set_defaults(func=_run_unpack)


def _run_unpack(args) -> int:
    from partc.runtime.bundle import unpack

    print(f"unpacked {args.archive} into {unpack(args.archive, args.output)}")
    return 0


def _add_ping(sub) -> None:
    p = sub.add_parser(
        "ping", help="check that the workers of a deployment are up, accept us and serve this build",
        description="Call the worker of each --connect STAGE=HOST:PORT: is it reachable, does it accept the token "
        "(and TLS), does it serve STAGE of this very build (the sha256 of BUILD's manifest.json)? Without "
        "--stage, every stage of the chain must be given (what the driver calls); with --stage S, the stages "
        "S's worker calls (its next stage, the nodes running its tiles). Prints one line per stage; exits 1 "
        "if any fails.",
        epilog="example:\n  partc ping build/resnet50 --connect device.0=10.0.0.2:50051 "
        "--connect edge.0=10.0.0.3:50051 --connect cloud.0=10.0.0.4:50051 --token-file token --root ca.pem\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile' or 'partc unpack'")
    p.add_argument("--connect", action="append", default=[], metavar="STAGE=HOST:PORT",
                   help="a worker to check; repeat for every stage")
    p.add_argument("--stage", metavar="STAGE", help="check what this stage's worker calls, not what the driver calls")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per stage (default 5)")
    _add_security_args(p)
    p.set_defaults(func=_run_ping)


def _run_ping(args) -> int:
    from partc.manifest import read_manifest
    from partc.runtime.ping import needed_stages, ping
    from partc.runtime.worker import parse_pair

    addresses = dict(parse_pair(text, "--connect", "STAGE=HOST:PORT") for text in args.connect)
    missing = [s for s in needed_stages(read_manifest(args.build), args.stage) if s not in addresses]
    if missing:
        raise PartcError(f"no address for stage {missing[0]!r}; give --connect {missing[0]}=HOST:PORT")
    answers = ping(args.build, addresses, _security(args), args.timeout)
    for a in answers:
        print(f"{a.stage} at {a.address}: {'ok' if a.ok else 'FAILED'} in {a.seconds * 1e3:.1f} ms: {a.detail}")
    failed = [a.stage for a in answers if not a.ok]
    if failed:
        raise RunError(f"{len(failed)} of {len(answers)} stages failed the check: {', '.join(failed)}")
    return 0


def _add_testbed(sub) -> None:
    p = sub.add_parser(
        "testbed", help="run a build in an emulated testbed on this machine (root)",
        description="Run every stage of BUILD in its own network namespace, with each link shaped (tc tbf, "
        "plus a user-space delay proxy) to the cluster file's bandwidth and latency and each stage's CPU "
        "limited by a cgroup quota that emulates its target's speed on this host. Then run N requests one "
        "at a time and report measured against predicted latency per stage, per link and end to end. "
        "Needs root; every namespace and cgroup it makes is removed at the end.",
        epilog="example:\n  sudo partc testbed build/resnet50 --requests 20 --cpu-share device.0=0.5\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--requests", type=int, default=10, metavar="N", help="timed requests (default 10)")
    p.add_argument("--cpu-share", action="append", default=[], metavar="STAGE=FRACTION",
                   help="cores of this host for STAGE instead of its target's emulated speed; repeatable")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_testbed)


def _run_testbed(args) -> int:
    from partc.runtime.netns import check_privileges
    from partc.runtime.testbed import Testbed
    from partc.runtime.worker import parse_pair

    shares = {}
    for text in args.cpu_share:
        stage, value = parse_pair(text, "--cpu-share", "STAGE=FRACTION")
        try:
            shares[stage] = float(value)
        except ValueError:
            raise PartcError(f"--cpu-share {text!r}: {value!r} is not a number") from None
        if not 0 < shares[stage] < 1e6:
            raise PartcError(f"--cpu-share {text!r}: a share is a positive number of cores, e.g. 0.5")
    if args.requests < 1:
        raise PartcError(f"--requests {args.requests}: must be at least 1")
    check_privileges()
    with Testbed(args.build, cpu_shares=shares) as testbed:
        report = testbed.measure(args.requests)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table())
    return 0


def _read_npy(path: Path):
    """The array in ``path``, mapped, not read: its header is checked before its data takes memory."""
    import numpy as np

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise PartcError(f"--input {path}: cannot read a .npy array ({err})") from err
    if not isinstance(array, np.ndarray):
        array.close()
        raise PartcError(f"--input {path}: holds several arrays (.npz); give one .npy file per model input")
    return array


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``serve``, ``bundle``, ``unpack``, ``ping`` and ``testbed`` to the subparsers ``sub``."""
    _add_run(sub)
    _add_serve(sub)
    _add_bundle(sub)
    _add_unpack(sub)
    _add_ping(sub)
    _add_testbed(sub)
