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
    """Keep torch's own loggers (tracing warnings, graph dumps) off stderr unless -vv."""
    import torch._logging

    torch._logging.set_logs(all=logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
