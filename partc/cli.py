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

    build = compile_model(
        args.model, args.input_shape, args.cluster, args.output, profiles=parse_profile_args(args.profile),
        tvm_trials=args.tvm_trials, tuning_db=args.tuning_db, dump_after=args.dump_after, dump_dir=args.dump_dir,
        depfile=args.depfile, progress=lambda line: print(f"partc: {line}", file=sys.stderr),
    )
    manifest = build.manifest
    rows = [("stage", "backend", "target", "artifact", "MB", "predicted ms", "measured ms")]
    for s in manifest["stages"]:
        measured = f"{s['measured_s'] * 1e3:.2f}" if s["measured_s"] is not None else "-"
        rows.append((s["name"], s["backend"], s["target"], s["artifact"], f"{s['bytes'] / 1e6:.2f}",
                     f"{s['predicted_s'] * 1e3:.2f}", measured))
    print(_table(rows))
    predicted = manifest["plan"]["predicted"]
    for link, nbytes in predicted["link_bytes"].items():
        print(f"link {link}: {nbytes / 1e6:.3f} MB, predicted {predicted['transfer'][link] * 1e3:.2f} ms")
    check = manifest["verification"]
    print(f"predicted end-to-end latency {predicted['latency'] * 1e3:.2f} ms; artifacts match the model "
          f"within {check['max_abs_diff']:.2e} (output scale {check['output_scale']:.3g})")
    print(f"wrote {build.path}/manifest.json")
    return 0


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Align ``rows`` (the first is the header) into a text table; numbers right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(value: str, width: int) -> str:
        return value.rjust(width) if value.replace(".", "").replace("-", "").isdigit() else value.ljust(width)

    lines = ["  ".join(cell(v, w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:]])


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run a compiled build on this machine, through its artifacts",
        description="Load BUILD (checking every artifact against the manifest's sha256), run its stages "
        "in order in this process and write the model's output. Without --input, a seeded example input "
        "of the compiled shape is used.",
        epilog="example:\n  partc run build/resnet50 --input x.npy --output y.npy\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="folder written by 'partc compile'")
    p.add_argument("--input", action="append", default=[], type=Path, metavar="FILE",
                   help=".npy file of one model input, in the model's input order; repeatable")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="where to write the output: .npy for one output, .npz for several")
    p.set_defaults(func=_run_run)


def _run_run(args) -> int:
    import numpy as np

    from partc.errors import PartcError
    from partc.runtime.local import load
    from partc.trace import parse_input_spec

    pipeline = load(args.build)
    specs = pipeline.model_inputs
    if args.input and len(args.input) != len(specs):
        raise PartcError(f"--input: the model takes {len(specs)} input(s), {len(args.input)} given")
    if args.input:
        inputs = {spec.name: _read_npy(path) for spec, path in zip(specs, args.input, strict=True)}
    else:
        inputs = {s.name: parse_input_spec(",".join(map(str, s.shape)) + f":{s.dtype}").example().numpy()
                  for s in specs}
    outputs = pipeline(inputs)
    if args.output:
        if len(outputs) == 1 and args.output.suffix == ".npy":
            np.save(args.output, next(iter(outputs.values())))
        else:
            np.savez(args.output, **outputs)
    for name, value in outputs.items():
        print(f"{name}: {'x'.join(map(str, value.shape))} {value.dtype}, "
              f"min {value.min():.4g} max {value.max():.4g} mean {value.mean():.4g}")
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
    _add_compile(sub)
    _add_run(sub)
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
