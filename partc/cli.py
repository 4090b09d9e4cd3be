"""The ``partc`` command line: a thin argparse layer over the Python API.

Each command is a ``_add_<command>(subparsers)`` function that declares its flags and sets
``func`` to the ``_run_<command>(args) -> int`` that does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from partc.errors import PartcError

log = logging.getLogger("partc")

EPILOG_MODEL = """\
MODEL is torchvision:NAME (random weights, seeded), package.module:factory, or
path/to/file.py:factory, where factory() returns a torch.nn.Module.
"""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="torchvision:NAME, package.module:factory or file.py:factory")
    parser.add_argument(
        "--input-shape", action="append", required=True, metavar="SHAPE",
        help="shape of one model input, e.g. 1,3,224,224 (append :int64 for integer inputs); "
        "repeat the flag for a model with several inputs",
    )
    parser.add_argument(
        "--dump-after", action="append", default=[], metavar="PASS",
        help="write the IR after PASS ('trace' for the traced IR) as JSON and Graphviz dot; repeatable",
    )
    parser.add_argument("--dump-dir", type=Path, default=Path("partc-dump"), help="where --dump-after writes")


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="trace a model and print a per-layer table",
        description="Trace MODEL into partc's IR and print, per layer: op, output shape, MFLOPs, "
        "activation KB and parameter KB, with totals.",
        epilog=EPILOG_MODEL + "\nexample:\n  partc inspect torchvision:resnet50 --input-shape 1,3,224,224\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from partc.pipeline import run_passes
    from partc.report import inspect, trace_model

    gm = trace_model(args.model, args.input_shape)
    if args.dump_after:
        from partc.context import CompileContext

        run_passes(gm, [], CompileContext(tiers=()), dump_after=args.dump_after, dump_dir=args.dump_dir)
    report = inspect(gm)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table())
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure every layer of a model on this host",
        description="Trace MODEL, then time every node of its IR on this host (warm-up runs, then "
        "repeated runs; median, p10 and p90 per node) and the whole model, and write a versioned JSON "
        "profile. Run it on a real target (a Raspberry Pi, a GPU server) and pass the file to later "
        "commands with --profile TARGET=FILE.",
        epilog=EPILOG_MODEL + "\nexample:\n  partc profile torchvision:resnet50 --input-shape 1,3,224,224 "
        "-o host.profile.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="profile file to write")
    p.add_argument("--repeats", type=int, default=15, metavar="N", help="timed runs (default 15)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's default, all cores)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    from partc.profile import profile_model, write_profile
    from partc.report import trace_model

    gm = trace_model(args.model, args.input_shape)

    def bar(done: int, total: int) -> None:
        filled = 30 * done // total
        print(f"\rprofiling [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)

    profile = profile_model(
        gm, model=args.model, warmup=args.warmup, repeats=args.repeats, threads=args.threads, progress=bar
    )
    write_profile(profile, args.output)
    top = sorted(profile.nodes, key=lambda n: n.median_s, reverse=True)[:5]
    summary = {
        "file": str(args.output),
        "threads": profile.threads,
        "whole_model_median_ms": profile.whole_median_s * 1e3,
        "sum_node_median_ms": profile.sum_node_median_s * 1e3,
        "top_nodes": [{"name": n.name, "op": n.op, "median_ms": n.median_s * 1e3} for n in top],
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"wrote {args.output}: {len(profile.nodes)} nodes, {profile.threads} threads, "
          f"{profile.repeats} runs after {profile.warmup} warm-up")
    print(f"whole model (median)   {profile.whole_median_s * 1e3:9.2f} ms")
    print(f"sum of node medians    {profile.sum_node_median_s * 1e3:9.2f} ms")
    for n in top:
        print(f"  {n.name:<28} {n.op:<18} {n.median_s * 1e3:9.2f} ms")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="choose where every layer runs; compare with the baseline strategies",
        description="Trace MODEL, predict every layer's time on every tier of the cluster (measured profiles "
        "where given, the cost model elsewhere) and find the exact optimal device -> edge -> cloud assignment "
        "for the cluster's objective and constraints. Prints the layers per tier, compute per tier, bytes and "
        "time per link. --compare adds every baseline (single-tier, Neurosurgeon, Scission, DADS, a D3-style "
        "greedy) priced by the same cost model; --sweep LINK lists the plans that are optimal over a "
        "bandwidth range of that link and where the optimum changes, and plots latency against bandwidth.",
        epilog=EPILOG_MODEL + "\nexamples:\n  partc plan torchvision:resnet50 --input-shape 1,3,224,224 "
        "--cluster examples/cluster.yaml --compare\n  partc plan torchvision:googlenet --input-shape 1,3,224,224 "
        "--cluster examples/cluster.yaml --sweep 'device->edge' --plot sweep.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--cluster", type=Path, required=True, help="cluster file (tiers, links, constraints)")
    p.add_argument("--profile", action="append", default=[], metavar="TARGET=FILE",
                   help="measured profile of TARGET (from 'partc profile' on that machine); repeatable")
    p.add_argument("--compare", action="store_true", help="add a table of every baseline strategy")
    p.add_argument("--sweep", metavar="LINK", help="link to sweep, e.g. 'device->edge'")
    p.add_argument("--sweep-range", default="100kbit/s:1Gbit/s", metavar="LOW:HIGH",
                   help="bandwidth range of --sweep (default 100kbit/s:1Gbit/s)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --sweep: where to write the plot (default "
                   "plan-sweep.png)")
    p.add_argument("--json", action="store_true", help="print the plan, costs and baselines as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from partc.context import parse_profile_args
    from partc.errors import PartcError
    from partc.planning import plan_model

    low, sep, high = args.sweep_range.partition(":")
    if not sep:
        raise PartcError(f"--sweep-range {args.sweep_range!r}: expected LOW:HIGH, e.g. 1Mbit/s:100Mbit/s")
    plot = (args.plot or Path("plan-sweep.png")) if args.sweep else None
    report = plan_model(args.model, args.input_shape, args.cluster, profiles=parse_profile_args(args.profile),
                        sweep=args.sweep, sweep_range=(low, high), plot=plot)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table(compare=args.compare))
    return 0


def _add_compile(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile a model for a cluster into per-stage artifacts and a manifest",
        description="Trace MODEL, choose where every layer runs on the cluster (the default pass "
        "pipeline), emit one artifact per stage with the backend its tier names, check the artifacts "
        "against the model on a seeded input, time them on this machine, and write OUTPUT/manifest.json "
        "last. OUTPUT is replaced only when everything succeeded.",
        epilog=EPILOG_MODEL + "\nexample:\n  partc compile torchvision:resnet50 --input-shape 1,3,224,224 "
        "--cluster examples/cluster.yaml -o build/resnet50\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--cluster", type=Path, required=True, help="cluster file (tiers, links, constraints)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="build folder to write")
    p.add_argument("--profile", action="append", default=[], metavar="TARGET=FILE",
                   help="measured profile of TARGET (from 'partc profile' on that machine); repeatable")
    p.add_argument("--tvm-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials per task for TVM stages (default 0: untuned, slow)")
    p.add_argument("--tuning-db", type=Path, metavar="DIR", help="TVM tuning database, reused across builds")
    p.add_argument("--depfile", type=Path, metavar="FILE", help="write a Makefile-syntax dependency file")
    p.set_defaults(func=_run_compile)


def _run_compile(args) -> int:
    from partc.build import compile_model
    from partc.context import parse_profile_args
    from partc.report import format_table

    build = compile_model(
        args.model, args.input_shape, args.cluster, args.output, profiles=parse_profile_args(args.profile),
        tvm_trials=args.tvm_trials, tuning_db=args.tuning_db, dump_after=args.dump_after, dump_dir=args.dump_dir,
        depfile=args.depfile, progress=lambda line: print(f"partc: {line}", file=sys.stderr),
    )
    manifest = build.manifest
    rows = [("stage", "program", "backend", "target", "artifact", "MB", "predicted ms", "measured ms")]
    for s in manifest["stages"]:
        for p in s["programs"]:
            measured = f"{p['measured_s'] * 1e3:.2f}" if p["measured_s"] is not None else "-"
            rows.append((s["name"], p["id"], s["backend"], s["target"], p["artifact"], f"{p['bytes'] / 1e6:.2f}",
                         f"{p['predicted_s'] * 1e3:.2f}", measured))
    print(format_table(rows, right=(5, 6, 7)))
    links = list(manifest["plans"][0]["predicted"]["link_bytes"])
    rows = [("plan", "kind", "stages", "predicted ms", *(f"{link} MB" for link in links))]
    for p in manifest["plans"]:
        predicted = p["predicted"]
        rows.append((p["name"], p["kind"], " ".join(p["programs"]), f"{predicted['latency'] * 1e3:.2f}",
                     *(f"{predicted['link_bytes'][link] / 1e6:.3f}" for link in links)))
    print(format_table(rows, right=tuple(range(3, 4 + len(links)))))
    check = manifest["verification"]
    print(f"every plan's artifacts match the model within {check['max_abs_diff']:.2e} "
          f"(output scale {check['output_scale']:.3g})")
    print(f"wrote {build.path}/manifest.json")
    return 0


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

    from partc.errors import PartcError
    from partc.manifest import read_manifest
    from partc.trace import parse_input_spec

    manifest = read_manifest(args.build)
    specs = manifest["model"]["inputs"]
    if args.input and len(args.input) != len(specs):
        raise PartcError(f"--input: the model takes {len(specs)} input(s), {len(args.input)} given")
    if args.input:
        inputs = {spec["name"]: _read_npy(path) for spec, path in zip(specs, args.input, strict=True)}
    else:
        inputs = {s["name"]: parse_input_spec(",".join(map(str, s["shape"])) + f":{s['dtype']}").example().numpy()
                  for s in specs}
    if args.connect and not args.distributed:
        raise PartcError("--connect needs --distributed")
    if args.distributed:
        outputs = _run_distributed(args, inputs)
    else:
        from partc.runtime.local import load

        outputs = load(args.build)(inputs)
    if args.output:
        if len(outputs) == 1 and args.output.suffix == ".npy":
            np.save(args.output, next(iter(outputs.values())))
        else:
            np.savez(args.output, **outputs)
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
        "stage's worker (--next). Only the manifest and this stage's artifacts are needed on the machine "
        "('partc bundle').",
        epilog="example (three machines, last stage first):\n"
        "  partc serve build/resnet50 --stage cloud.0 --listen 0.0.0.0:50051\n"
        "  partc serve build/resnet50 --stage edge.0 --listen 0.0.0.0:50051 --next 10.0.0.4:50051\n"
        "  partc serve build/resnet50 --stage device.0 --listen 0.0.0.0:50051 --next 10.0.0.3:50051\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
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
    import signal
    import threading

    from partc.runtime.deploy import serve
    from partc.runtime.worker import parse_pair

    peers = dict(parse_pair(text, "--peer", "STAGE=HOST:PORT") for text in args.peer)
    server = serve(args.build, args.stage, listen=args.listen, next_address=args.next, peers=peers,
                   security=_security(args), threads=args.threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.warning("serving stage %s on %s", args.stage, server.address)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"stage": args.stage, "address": server.address}))
        os.replace(tmp, args.ready_file)
    stop.wait()
    server.stop()
    return 0


def _add_bundle(sub) -> None:
    p = sub.add_parser(
        "bundle", help="pack what one tier's machines need from a build",
        description="Write a .tar.gz with the manifest, the build README, and for every stage of TIER its "
        "artifacts (checked against the manifest's sha256), its serve script and its systemd unit.",
        epilog="example:\n  partc bundle build/resnet50 --tier edge -o edge.tar.gz\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--tier", required=True, help="tier name from the cluster file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="archive to write (.tar.gz)")
    p.set_defaults(func=_run_bundle)


def _run_bundle(args) -> int:
    from partc.runtime.deploy import bundle

    members = bundle(args.build, args.tier, args.output)
    print(f"wrote {args.output}: {', '.join(members)}")
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
    from partc.runtime.testbed import Testbed, check_privileges
    from partc.runtime.worker import parse_pair

    shares = {}
    for text in args.cpu_share:
        stage, value = parse_pair(text, "--cpu-share", "STAGE=FRACTION")
        try:
            shares[stage] = float(value)
        except ValueError:
            raise PartcError(f"--cpu-share {text!r}: {value!r} is not a number") from None
    check_privileges()
    with Testbed(args.build, cpu_shares=shares) as testbed:
        report = testbed.measure(args.requests)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table())
    return 0


def _read_npy(path: Path):
    import numpy as np

    from partc.errors import PartcError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PartcError(f"--input {path}: cannot read a .npy array ({err})") from err


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``partc`` command."""
    parser = argparse.ArgumentParser(
        prog="partc",
        description="partc compiles a PyTorch model for a device / edge / cloud deployment: it traces "
        "the model, chooses where each layer runs, emits per-tier artifacts and runs the pipeline.",
        epilog="run 'partc COMMAND --help' for a command's flags and an example",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(sub)
    _add_profile(sub)
    _add_plan(sub)
    _add_compile(sub)
    _add_run(sub)
    _add_serve(sub)
    _add_bundle(sub)
    _add_testbed(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the partc command line; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_torch(args.verbose)
    try:
        return args.func(args)
    except PartcError as err:
        if args.debug:
            log.exception("traceback")
        print(f"partc: error: {err}", file=sys.stderr)
        return err.exit_code


def _quiet_torch(verbose: int) -> None:
    """Keep torch's own loggers and Python warnings (deprecations) off stderr unless -v / -vv."""
    import torch._logging

    torch._logging.set_logs(all=logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
