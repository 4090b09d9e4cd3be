"""The runtime side of the ``partc`` command line: ``run``, ``serve``, ``bundle``, ``unpack``, ``ping``, ``testbed``.

Each command is a ``_add_<command>(subparsers)`` function that declares its flags and sets
``func`` to the ``_run_<command>(args) -> int`` that does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from partc.cli.model import add_qemu_sysroot_arg
from partc.errors import PartcError, RunError
from partc.output import document, with_units
from partc.progress import Progress

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
        "already serving on other machines (--connect). --requests N runs N requests and reports latency and "
        "throughput: one after another in this process, or streamed through the workers with several in flight "
        "(--window), then also the measured links.",
        epilog="examples:\n  partc run build/resnet50 --input x.npy --output y.npy\n"
        "  partc run build/resnet50 --distributed --requests 50\n"
        "  partc run build/resnet50 --distributed --connect device.0=10.0.0.2:50051 "
        "--connect edge.0=10.0.0.3:50051 --connect cloud.0=10.0.0.4:50051\n"
        "  partc run build/resnet50 --distributed --engine ray --replicas 2 --max-batch 4 --devices 16 --rate 5 "
        "--requests 20 --verify\n",
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
    p.add_argument("--requests", type=int, default=1, metavar="N", help="requests to run")
    p.add_argument("--window", type=int, metavar="N", help="with --distributed: requests in flight (default: 4)")
    p.add_argument("--json", action="store_true", help="print the outputs' summary and the timings as JSON")
    p.add_argument("--devices", type=int, metavar="N",
                   help="with --distributed: N simulated devices (threads of this process), each running the first "
                        "stage and sending frames over gRPC to the later stages; --requests is then per device")
    p.add_argument("--rate", type=float, default=5.0, metavar="R", help="with --devices: requests/s of each device")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                   help="with --devices: Poisson arrivals (default) or evenly spaced")
    p.add_argument("--verify", action="store_true",
                   help="with --distributed: check every result against the in-process pipeline (1e-5 relative)")
    p.add_argument("--timeline", type=Path, metavar="PNG", help="with --distributed: draw a request through the "
                   "stages, predicted next to measured (the median of the requests after the first)")
    _add_engine_args(p, "the tiers after the first, each started here (or reached with --connect)")
    add_qemu_sysroot_arg(p, "run")
    _add_security_args(p)
    p.set_defaults(func=_run_run)


def _add_engine_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--engine", choices=("grpc", "ray"), default="grpc",
                        help=f"grpc: one partc worker per stage (default); ray: {what} on Ray Serve")
    parser.add_argument("--replicas", type=int, metavar="N", help="with --engine ray: replicas of each program "
                        "(default 1)")
    parser.add_argument("--min-replicas", type=int, metavar="N", help="with --engine ray: autoscale from N replicas")
    parser.add_argument("--max-replicas", type=int, metavar="N", help="with --engine ray: autoscale up to N replicas")
    parser.add_argument("--max-batch", type=int, metavar="B",
                        help="with --engine ray: most requests a replica runs as one batch (default 1)")


def _refuse_ray_flags(args) -> None:
    """Refuse the Ray Serve scaling flags without ``--engine ray``."""
    given = [f"--{n.replace('_', '-')}" for n in ("replicas", "min_replicas", "max_replicas", "max_batch")
             if getattr(args, n) is not None]
    if given and args.engine != "ray":
        raise PartcError(f"{given[0]} needs --engine ray")


def _tier_serving(args, manifest, tier: str):
    """The ``TierServing`` of ``tier`` on Ray Serve: the manifest's scaling, overridden by the flags."""
    from partc.runtime.rayserve import tier_serving

    return tier_serving(manifest, tier, args.replicas, args.min_replicas, args.max_replicas, args.max_batch)


def _run_run(args) -> int:
    import numpy as np

    from partc.manifest import read_manifest
    from partc.runtime.driver import check_inputs
    from partc.trace import parse_input_spec

    manifest = read_manifest(args.build)
    specs = manifest.inputs
    if args.input and len(args.input) != len(specs):
        raise PartcError(f"--input: the model takes {len(specs)} input(s), {len(args.input)} given")
    for flag, given in (("--connect", args.connect), ("--window", args.window), ("--devices", args.devices),
                        ("--verify", args.verify), ("--engine ray", args.engine == "ray"),
                        ("--timeline", args.timeline)):
        if given and not args.distributed:
            raise PartcError(f"{flag} needs --distributed")
    _refuse_ray_flags(args)
    serving = _tier_serving(args, manifest, manifest.chain[-1].tier) if args.engine == "ray" else None
    if args.distributed and (args.devices is not None or serving is not None):
        return _run_fleet(args, manifest, serving)
    for flag, value in (("--requests", args.requests), ("--window", args.window or 4)):
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
    with Progress(args.quiet) as progress:
        if args.distributed:
            outputs, latencies, elapsed, network = _run_distributed(args, inputs, progress)
        else:
            outputs, latencies, elapsed, network = *_run_local(args, inputs, progress), {}
    if args.output:
        try:
            if len(outputs) == 1 and args.output.suffix == ".npy":
                np.save(args.output, next(iter(outputs.values())))
            else:
                np.savez(args.output, **outputs)
        except OSError as err:
            raise PartcError(f"--output {args.output}: cannot write: {err.strerror}") from err
    summary = {
        "outputs": [{"name": name, "shape": list(value.shape), "dtype": str(value.dtype), "min": float(value.min()),
                     "max": float(value.max()), "mean": float(value.mean())} for name, value in outputs.items()],
        "requests": args.requests, "elapsed_s": elapsed, "requests_per_s": args.requests / elapsed,
        "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies), **network,
    }
    if args.json:
        print(document("run", with_units(summary)))
        return 0
    for o in summary["outputs"]:
        print(f"{o['name']}: {'x'.join(map(str, o['shape']))} {o['dtype']}, "
              f"min {o['min']:.4g} max {o['max']:.4g} mean {o['mean']:.4g}")
    if args.requests > 1 or args.distributed:
        print(f"{args.requests} requests in {elapsed:.2f} s: {args.requests / elapsed:.1f} requests/s, latency "
              f"median {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
    for link in network.get("links", ()):
        rate = link["measured_bandwidth_mbit_s"]
        print(f"link {link['link']}: " + (f"{rate:.1f} Mbit/s measured" if rate else "no transfers"))
    for stage in network.get("stages", ()):
        print(f"stage {stage['stage']}: compute {stage['compute_ms']:.2f} ms (smoothed)")
    for switch in network.get("switches", ()):
        print(f"request {switch['request']}: switched from plan {switch['from']} to {switch['to']}: "
              f"{switch['reason']}")
    return 0


def _run_local(args, inputs, progress):
    """Run ``args.requests`` requests one after another in this process: outputs, latencies, seconds."""
    import time

    from partc.runtime.local import load

    progress.step(f"loading {args.build}")
    pipeline = load(args.build, args.qemu_sysroot)
    progress.step(f"running {args.requests} request(s) in this process")
    started, latencies = time.perf_counter(), []
    for i in range(args.requests):
        latencies.append(-time.perf_counter())
        outputs = pipeline(inputs)
        latencies[-1] += time.perf_counter()
        progress.count("requests", i + 1, args.requests)
    return outputs, latencies, time.perf_counter() - started


def _run_distributed(args, inputs, progress):
    """Stream ``args.requests`` requests through workers: outputs, latencies, seconds, what the driver measured."""
    import contextlib
    import time

    from partc.runtime.deploy import LocalWorkers, connect_build
    from partc.runtime.local import load
    from partc.runtime.worker import parse_pair

    addresses = dict(parse_pair(text, "--connect", "STAGE=HOST:PORT") for text in args.connect)
    with contextlib.ExitStack() as stack:
        if not addresses:
            progress.step("starting one worker process per stage on 127.0.0.1")
            addresses = stack.enter_context(LocalWorkers(args.build, args.token_file, args.qemu_sysroot)).addresses
        progress.step(f"connecting to {len(addresses)} worker(s)")
        driver = stack.enter_context(connect_build(args.build, addresses, _security(args), window=args.window or 4))
        driver.check()
        progress.step(f"streaming {args.requests} request(s), {args.window or 4} in flight")
        expected = load(args.build, args.qemu_sysroot)(inputs) if args.verify else None
        started, latencies, outputs = time.perf_counter(), [], None
        sent = []
        measured = []  # each request's measurements, for --timeline
        for result in driver.run(_stamped(inputs, args.requests, sent)):
            latencies.append(time.perf_counter() - sent[len(latencies)])
            measured.append(driver.last)
            progress.count("requests", len(latencies), args.requests)
            outputs = outputs or result
            if expected is not None:
                _verify(result, expected, len(latencies) - 1)
        elapsed = time.perf_counter() - started
        if args.timeline:
            from partc.draw import measured_steps
            from partc.manifest import read_manifest
            from partc.runtime.layout import hops

            manifest = read_manifest(args.build)
            _draw_timeline(args.timeline, measured_steps(manifest, hops(manifest), measured), manifest)
        network = {
            "links": [{"link": link, "measured_bandwidth": e.bytes_per_second or None}
                      for link, e in driver.links.items()],
            "stages": [{"stage": stage, "compute_s": ewma.value} for stage, ewma in driver.compute.items()],
            "switches": [{"request": w.request, "from": w.old, "to": w.new, "reason": w.reason}
                         for w in driver.switches],
        }
    return outputs, latencies, elapsed, with_units(network, {"measured_bandwidth": "measured_bandwidth_mbit_s"})


def _verify(result, expected, request: int) -> None:
    """Check ``result`` against ``expected``, the in-process pipeline's outputs."""
    from partc.runtime.fleet import RTOL, relative_error

    for name, want in expected.items():
        error = relative_error(result[name], want)
        if error > RTOL:
            raise RunError(f"request {request}: output {name!r} differs from the in-process pipeline by "
                           f"{error:.3g} of its scale (more than {RTOL:g})")


def _run_fleet(args, manifest, serving) -> int:
    """Drive ``--devices`` simulated devices against the later tiers: started here, or at ``--connect``."""
    import contextlib

    from partc.runtime.deploy import LocalWorkers
    from partc.runtime.fleet import RTOL, run_fleet
    from partc.runtime.worker import parse_pair

    if args.input or args.output:
        raise PartcError("--input and --output: not with --devices or --engine ray (each device sends seeded inputs)")
    if args.timeline:
        raise PartcError("--timeline: not with --devices or --engine ray (it draws one chain of workers)")
    for flag, value in (("--devices", args.devices or 1), ("--rate", args.rate)):
        if not value > 0:
            raise PartcError(f"{flag} {value}: must be positive")
    addresses = dict(parse_pair(text, "--connect", "STAGE=HOST:PORT") for text in args.connect)
    with contextlib.ExitStack() as stack:
        if not addresses and serving is not None:
            from partc.runtime.rayserve import RayTiers

            log.warning("starting each tier after the first on its own local Ray cluster")
            addresses = stack.enter_context(RayTiers(args.build, serving, args.token_file)).addresses
        elif not addresses:
            log.warning("starting one worker process per stage on 127.0.0.1")
            addresses = stack.enter_context(LocalWorkers(args.build, args.token_file, args.qemu_sysroot)).addresses
        report = run_fleet(args.build, addresses, devices=args.devices or 1, rate=args.rate, requests=args.requests,
                           poisson=args.arrivals == "poisson", verify=args.verify, security=_security(args),
                           window=args.window or 4)
    if args.json:
        print(document("run", with_units({
            "devices": report.devices, "requests": report.requests, "delivered": report.delivered,
            "lost": report.lost, "elapsed_s": report.seconds, "requests_per_s": report.throughput,
            "latency_p50_s": report.percentile(50), "latency_p99_s": report.percentile(99),
            "worst_relative_error": report.worst_error, "failures": list(report.failures)})))
    else:
        print(report.summary())
        for failure in report.failures:
            print(failure)
    if report.lost:
        raise RunError(f"{report.lost} of {report.requests} requests lost")
    if report.worst_error is not None and report.worst_error > RTOL:
        raise RunError(f"a result differs from the in-process pipeline by {report.worst_error:.3g} of its scale "
                       f"(more than {RTOL:g})")
    return 0


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
        "--token-file token\n"
        "a shared tier on Ray Serve (a running cluster whose nodes have the custom resource 'cloud'):\n"
        "  partc serve build/m --engine ray --tier cloud --address 10.0.0.4:6379 --replicas 4 --max-batch 8 "
        "--listen 0.0.0.0:50051 --token-file token\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD",
                   help="folder written by 'partc compile', or a bundle (.tar.gz) written by 'partc bundle'")
    p.add_argument("--stage", metavar="STAGE", help="stage to serve, e.g. edge.0")
    p.add_argument("--tier", metavar="TIER", help="with --engine ray: the tier to serve, e.g. cloud")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="with --engine ray: the running Ray cluster to deploy on (default: start a local one)")
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
    p.add_argument("--json", action="store_true", help="print {stage, address} as JSON on stdout once serving")
    _add_engine_args(p, "the tier's programs as deployments behind a gRPC ingress,")
    add_qemu_sysroot_arg(p, "run")
    _add_security_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    import contextlib
    import os

    from partc.runtime.deploy import serve
    from partc.runtime.worker import parse_pair

    with contextlib.ExitStack() as stack:
        if args.engine == "ray":
            server = _serve_on_ray(args, stack)
        else:
            for flag, given in (("--tier", args.tier), ("--address", args.address)):
                if given:
                    raise PartcError(f"{flag} needs --engine ray")
            if not args.stage:
                raise PartcError("--stage is required (with --engine ray: --tier)")
            _refuse_ray_flags(args)
            peers = dict(parse_pair(text, "--peer", "STAGE=HOST:PORT") for text in args.peer)
            server = serve(args.build, args.stage, listen=args.listen, next_address=args.next, peers=peers,
                           security=_security(args), threads=args.threads, qemu_sysroot=args.qemu_sysroot)
        log.warning("serving stage %s on %s", server.stage, server.address)
        if args.json:
            print(document("serve", {"stage": server.stage, "address": server.address}), flush=True)
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"stage": server.stage, "address": server.address}))
            os.replace(tmp, args.ready_file)
        try:
            server.wait()
        except KeyboardInterrupt as stop:  # SIGTERM or SIGINT (partc.cli.Interrupted) is how a server is told to stop
            log.warning("stage %s stopped by %s", server.stage, stop or "SIGINT")
        finally:
            server.stop()
    return 0


def _serve_on_ray(args, stack):
    """Serve ``--tier`` on Ray Serve (a running cluster at ``--address``, or a local one kept by ``stack``)."""
    from partc.manifest import read_manifest
    from partc.runtime.bundle import is_bundle, unpack
    from partc.runtime.rayserve import local_cpus, ray_cluster, serve_tier

    for flag, given in (("--stage", args.stage), ("--peer", args.peer), ("--threads", args.threads)):
        if given:
            raise PartcError(f"{flag}: not with --engine ray (give --tier; replicas replace a tier's nodes)")
    if not args.tier:
        raise PartcError("--engine ray needs --tier")
    build = unpack(args.build) if is_bundle(args.build) else args.build
    manifest = read_manifest(build)
    serving = _tier_serving(args, manifest, args.tier)
    stack.enter_context(ray_cluster(args.address, args.tier, None if args.address else local_cpus(manifest, args.tier,
                                                                                                   serving)))
    return serve_tier(build, args.tier, serving, listen=args.listen, next_address=args.next,
                      security=_security(args))


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
    p.add_argument("--json", action="store_true", help="print the archive and its members as JSON")
    p.set_defaults(func=_run_bundle)


def _run_bundle(args) -> int:
    from partc.runtime.bundle import bundle

    members = bundle(args.build, args.tier, args.output)
    if args.json:
        print(document("bundle", {"archive": str(args.output), "bytes": args.output.stat().st_size,
                                  "members": list(members)}))
        return 0
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
    p.add_argument("--json", action="store_true", help="print the archive and the folder as JSON")
    p.set_defaults(func=_run_unpack)


def _run_unpack(args) -> int:
    from partc.runtime.bundle import unpack

    folder = unpack(args.archive, args.output)
    if args.json:
        print(document("unpack", {"archive": str(args.archive), "folder": str(folder)}))
        return 0
    print(f"unpacked {args.archive} into {folder}")
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
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per stage")
    p.add_argument("--json", action="store_true", help="print one entry per stage as JSON")
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
    if args.json:
        print(document("ping", {"stages": [{"stage": a.stage, "address": a.address, "ok": a.ok,
                                            "elapsed_ms": a.seconds * 1e3, "detail": a.detail} for a in answers]}))
    else:
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
        "limited by a cgroup quota that emulates its target's speed on this host. Then time every program "
        "under its node's quota, run N requests one at a time and report, per stage, per link and end to end, "
        "the latency predicted for the targets, predicted for the emulated nodes (calibrated) and measured. "
        "Needs root; every namespace and cgroup it makes is removed at the end.",
        epilog="example:\n  sudo partc testbed build/resnet50 --requests 20 --cpu-share device.0=0.5\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--requests", type=int, default=10, metavar="N", help="timed requests (default 10)")
    p.add_argument("--cpu-share", action="append", default=[], metavar="STAGE=FRACTION",
                   help="cores of this host for STAGE instead of its target's emulated speed; repeatable")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeline", type=Path, metavar="PNG",
                   help="draw a request through the stages, predicted next to measured (means of the timed requests)")
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
    testbed = Testbed(args.build, cpu_shares=shares)  # checks the build and the shares; makes nothing yet
    with Progress(args.quiet) as progress:
        progress.step("starting the testbed: a namespace, a CPU quota and shaped links per stage")
        with testbed:
            progress.step(f"running {args.requests} timed request(s) one at a time")
            report = testbed.measure(args.requests)
            if args.timeline:
                from partc.draw import request_steps

                _draw_timeline(args.timeline, request_steps(
                    testbed.manifest, testbed.hops, {s.stage: s.measured_s for s in report.stages},
                    {k.link: k.measured_s for k in report.links}), testbed.manifest)
            progress.step("removing the namespaces and cgroups")
    print(document("testbed", report.to_json()) if args.json else report.table())
    return 0


def _draw_timeline(path: Path, steps, manifest) -> None:
    from partc.draw import plot_timeline

    plot_timeline(steps, path, title=f"{manifest.model}: one request", tiers=[t.name for t in manifest.tiers])


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
