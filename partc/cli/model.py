"""The compiler side of the ``partc`` command line: ``inspect``, ``profile``, ``plan`` and ``compile``.

Each command is a ``_add_<command>(subparsers)`` function that declares its flags and sets
``func`` to the ``_run_<command>(args) -> int`` that does the work.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from partc.errors import PartcError
from partc.output import document, with_units
from partc.progress import Progress

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


def add_qemu_sysroot_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--qemu-sysroot DIR``; the environment variable ``PARTC_QEMU_SYSROOT`` is its default, read
    here and nowhere in the library."""
    parser.add_argument("--qemu-sysroot", type=Path, default=os.environ.get("PARTC_QEMU_SYSROOT") or None,
                        metavar="DIR", help=f"{what} TVM stages compiled for another architecture under qemu-user, "
                        "in the target's Python made by examples/qemu/make-sysroot.sh DIR (default: "
                        "$PARTC_QEMU_SYSROOT; unset: none)")


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="trace a model and print a per-layer table",
        description="Trace MODEL into partc's IR and print, per layer: op, output shape, MFLOPs, "
        "activation KB and parameter KB, with totals.",
        epilog=EPILOG_MODEL + "\nexample:\n  partc inspect torchvision:resnet50 --input-shape 1,3,224,224\n",
    )
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from partc.passes import passes_named
    from partc.pipeline import TRACE, Pipeline, dump_ir
    from partc.report import inspect, trace_model

    Pipeline(passes_named(d for d in args.dump_after if d != TRACE)).check_dumps(args.dump_after)
    gm = trace_model(args.model, args.input_shape)
    if args.dump_after:  # inspect runs no pass: only the traced IR can be dumped
        Pipeline(()).check_dumps(args.dump_after)
        dump_ir(gm, args.dump_dir / f"00-{TRACE}")
    report = inspect(gm)
    print(document("inspect", report.to_json()) if args.json else report.table())
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
    )
    _add_model_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="profile file to write")
    p.add_argument("--repeats", type=int, default=15, metavar="N", help="timed runs")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first, at least 1")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's default, all cores)")
    p.add_argument("--fit-target", type=Path, default=None, metavar="FILE.yaml",
                   help="also write a target description of this host fitted to the profile (the cost model's "
                   "rates); name it as a tier's target in a cluster file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_profile)


def _write_fitted_target(profile, path: Path) -> None:
    import dataclasses
    import os
    import platform

    from partc.costmodel import fit_target, load_calibration, target_yaml

    cal = load_calibration()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    base = dataclasses.replace(
        cal.reference, name=path.stem, summary=f"{profile.host.get('cpu', 'this host')}, {profile.threads} threads "
        "(fitted by partc profile --fit-target)", cores=profile.threads, memory_bytes=memory,
        triple=f"{platform.machine()}-linux-gnu", source="",
    )
    desc = fit_target(cal, [profile], base)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(target_yaml(desc))
    os.replace(tmp, path)


def _run_profile(args) -> int:
    from partc.profile import profile_model, write_profile
    from partc.report import trace_model

    if args.fit_target is not None and args.fit_target.suffix not in (".yaml", ".yml"):
        raise PartcError(f"{args.fit_target}: --fit-target: the file name must end in .yaml (a cluster file's tier "
                         "names a target file by that suffix)")
    with Progress(args.quiet) as progress:
        progress.step(f"tracing {args.model}")
        gm = trace_model(args.model, args.input_shape)
        progress.step("timing every layer and the whole model")
        profile = profile_model(gm, model=args.model, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                progress=lambda done, total: progress.count("runs", done, total))
    write_profile(profile, args.output)
    if args.fit_target is not None:
        _write_fitted_target(profile, args.fit_target)
    top = sorted(profile.nodes, key=lambda n: n.median_s, reverse=True)[:5]
    if args.json:
        print(document("profile", with_units({
            "file": str(args.output), "fitted_target": str(args.fit_target) if args.fit_target else None,
            "layers": len(profile.nodes), "threads": profile.threads, "warmup": profile.warmup,
            "repeats": profile.repeats, "whole_model_median_s": profile.whole_median_s,
            "sum_layer_medians_s": profile.sum_node_median_s, "load_average": profile.load_average,
            "warnings": list(profile.warnings),
            "slowest_layers": [{"name": n.name, "op": n.op, "median_s": n.median_s} for n in top],
        })))
        return 0
    print(f"wrote {args.output}: {len(profile.nodes)} layers, {profile.threads} threads, "
          f"{profile.repeats} runs after {profile.warmup} warm-up")
    print(f"whole model (median)   {profile.whole_median_s * 1e3:9.2f} ms")
    print(f"sum of layer medians   {profile.sum_node_median_s * 1e3:9.2f} ms")
    for n in top:
        print(f"  {n.name:<28} {n.op:<18} {n.median_s * 1e3:9.2f} ms")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="choose where every layer runs; compare with the baseline strategies",
        description="Run the compile pipeline up to emission ('partc compile' stopped before it writes anything: "
        "the same passes, plans and predicted times). Predicts every layer's time on every tier of the cluster "
        "(measured profiles where given, the cost model elsewhere), chooses the device -> edge -> cloud "
        "assignment for the cluster's objective and constraints together with what a tier of several nodes "
        "runs in parallel (fork/join branches, spatial tiles), and prints the layers per tier, compute per tier, "
        "bytes and time per link, what runs on which node, and every plan a build would carry. --compare adds "
        "every baseline (single-tier, Neurosurgeon, Scission, DADS, a D3-style greedy, and with several nodes "
        "D3 with tiles, DeepThings-like and branch load balancing) priced by partc's own rules; --sweep LINK "
        "lists the plans that are optimal over a bandwidth range of that link and where the optimum changes, "
        "and plots latency against bandwidth.",
        epilog=EPILOG_MODEL + "\nexamples:\n  partc plan torchvision:resnet50 --input-shape 1,3,224,224 "
        "--cluster examples/cluster.yaml --compare\n  partc plan torchvision:googlenet --input-shape 1,3,224,224 "
        "--cluster examples/cluster.yaml --sweep 'device->edge' --plot sweep.png\n  partc plan "
        "torchvision:googlenet --input-shape 1,3,224,224 --cluster examples/edge4.yaml\n",
    )
    _add_model_args(p)
    p.add_argument("--cluster", type=Path, required=True, help="cluster file (tiers, links, constraints)")
    p.add_argument("--profile", action="append", default=[], metavar="TARGET=FILE",
                   help="measured profile of TARGET (from 'partc profile' on that machine); repeatable")
    p.add_argument("--compare", action="store_true", help="add a table of every baseline strategy")
    p.add_argument("--sweep", metavar="LINK", help="link to sweep, e.g. 'device->edge'")
    p.add_argument("--sweep-range", default="100kbit/s:1Gbit/s", metavar="LOW:HIGH", help="bandwidth range of --sweep")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --sweep: where to write the plot (default: "
                   "plan-sweep.png)")
    p.add_argument("--draw", type=Path, metavar="FILE", help="draw the plan on the model's graph: FILE.dot (Graphviz), "
                   "and FILE itself when it ends in .svg and Graphviz's dot is installed")
    p.add_argument("--json", action="store_true", help="print the plan, costs and baselines as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from partc.cluster import parse_profile_args
    from partc.planning import plan_model

    low, sep, high = args.sweep_range.partition(":")
    if not sep:
        raise PartcError(f"--sweep-range {args.sweep_range!r}: expected LOW:HIGH, e.g. 1Mbit/s:100Mbit/s")
    plot = (args.plot or Path("plan-sweep.png")) if args.sweep else None
    with Progress(args.quiet) as progress:
        report = plan_model(args.model, args.input_shape, args.cluster, profiles=parse_profile_args(args.profile),
                            sweep=args.sweep, sweep_range=(low, high), plot=plot, draw=args.draw,
                            dump_after=args.dump_after,
                            dump_dir=args.dump_dir, progress=progress.step, compare=args.compare or args.json)
    print(document("plan", report.to_json()) if args.json else report.table(compare=args.compare))
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
    )
    _add_model_args(p)
    p.add_argument("--cluster", type=Path, required=True, help="cluster file (tiers, links, constraints)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="build folder to write")
    p.add_argument("--profile", action="append", default=[], metavar="TARGET=FILE",
                   help="measured profile of TARGET (from 'partc profile' on that machine); repeatable")
    p.add_argument("--tvm-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials per task for TVM stages (default: 0, untuned, slow)")
    p.add_argument("--tuning-db", type=Path, metavar="DIR", help="TVM tuning database, reused across builds")
    p.add_argument("--aoti", action="store_true",
                   help="compile 'export' stages with AOTInductor: native code for this machine, minutes per stage")
    add_qemu_sysroot_arg(p, "check")
    p.add_argument("--depfile", type=Path, metavar="FILE", help="write a Makefile-syntax dependency file")
    p.add_argument("--json", action="store_true", help="print the build's programs, plans and check as JSON")
    p.set_defaults(func=_run_compile)


def _run_compile(args) -> int:
    from partc.build import compile_model
    from partc.cluster import parse_profile_args
    from partc.report import format_table

    with Progress(args.quiet) as progress:
        build = compile_model(
            args.model, args.input_shape, args.cluster, args.output, profiles=parse_profile_args(args.profile),
            tvm_trials=args.tvm_trials, tuning_db=args.tuning_db, aoti=args.aoti, qemu_sysroot=args.qemu_sysroot,
            dump_after=args.dump_after, dump_dir=args.dump_dir, depfile=args.depfile, progress=progress.step,
        )
    manifest = build.manifest
    links = manifest.prices
    size = {p.id: p.bytes for s in manifest.stages for p in s.programs}
    steps = {pid for s in manifest.stages for sch in s.schedules for step in sch.steps for pid in step}
    programs = []  # a parallel program is one entry, its steps' artifacts summed
    for s in manifest.stages:
        for p in s.programs:
            if p.id not in steps:
                programs.append({"stage": s.name, "program": p.id, "backend": s.backend, "target": s.target,
                                 "artifact": p.artifact, "bytes": p.bytes, "predicted_s": p.predicted_s,
                                 "measured_s": build.measured[p.id]})
        for p in s.schedules:
            programs.append({"stage": s.name, "program": p.id, "backend": s.backend, "target": s.target,
                             "artifact": f"{len(p.steps)} steps on {max(map(len, p.steps))} nodes",
                             "bytes": sum(size[i] for step in p.steps for i in step), "predicted_s": p.predicted_s,
                             "measured_s": build.measured[p.id]})
    plans = [{"plan": p.name, "kind": p.kind, "programs": dict(p.programs),
              "predicted_latency_s": p.predicted.latency(links), "link_bytes": dict(p.predicted.link_bytes)}
             for p in manifest.plans]
    if args.json:
        print(document("compile", with_units({
            "build": str(build.path), "programs": programs, "plans": plans,
            "max_abs_diff": manifest.max_abs_diff, "output_scale": manifest.output_scale,
        })))
        return 0
    rows = [("stage", "program", "backend", "target", "artifact", "MB", "predicted ms", "measured ms")]
    rows += [(p["stage"], p["program"], p["backend"], p["target"], p["artifact"], f"{p['bytes'] / 1e6:.2f}",
              _ms(p["predicted_s"]), _ms(p["measured_s"])) for p in programs]
    print(format_table(rows, right=(5, 6, 7)))
    rows = [("plan", "kind", "stages", "predicted ms", *(f"{link.name} MB" for link in links))]
    rows += [(p["plan"], p["kind"], " ".join(p["programs"]), _ms(p["predicted_latency_s"]),
              *(f"{p['link_bytes'][link.name] / 1e6:.3f}" for link in links)) for p in plans]
    print(format_table(rows, right=tuple(range(3, 4 + len(links)))))
    print(f"every plan's artifacts match the model within {manifest.max_abs_diff:.2e} "
          f"(output scale {manifest.output_scale:.3g})")
    print(f"wrote {build.path}/manifest.json")
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _add_targets(sub) -> None:
    p = sub.add_parser(
        "targets", help="list the hardware targets and the backends, and what this machine can run",
        description="List the targets a cluster file's tiers name (partc/targets/descriptions/*.yaml: the rates "
        "the cost model prices layers with) and the backends (artifact formats), each with whether this machine "
        "has what it needs to emit and load its artifacts. With TARGET (a name or a .yaml file), print that "
        "target in full, with where its numbers come from.",
        epilog="examples:\n  partc targets\n  partc targets rpi4\n  partc targets boards/my-board.yaml --json\n",
    )
    p.add_argument("target", nargs="?", metavar="TARGET", help="a target to print in full")
    p.add_argument("--json", action="store_true", help="print the targets and backends as JSON")
    p.set_defaults(func=_run_targets)


def _run_targets(args) -> int:
    import dataclasses
    import textwrap

    from partc.report import format_table
    from partc.targets import BACKENDS, TARGETS, target

    targets = [target(args.target)] if args.target else list(TARGETS.values())
    backends = [{"name": b.name, "suffix": b.suffix, "cross_compiles": b.cross_compiles, "missing": _missing(b.name)}
                for b in BACKENDS.values()]
    if args.json:
        print(document("targets", {"targets": [dataclasses.asdict(t) for t in targets], "backends": backends}))
        return 0
    if args.target:
        desc = dataclasses.asdict(targets[0])
        source = desc.pop("source")
        print("\n".join(f"{key:<22} {value}" for key, value in desc.items()))
        print(textwrap.fill(source, 100, initial_indent=f"{'source':<22} ", subsequent_indent=" " * 23))
        return 0
    rows = [("target", "kind", "cores", "GHz", "GFLOP/s", "memory GB/s", "memory GB", "summary")]
    rows += [(t.name, t.kind, str(t.cores), f"{t.clock_ghz:g}", f"{t.peak_gflops:g}", f"{t.memory_bandwidth_gbs:g}",
              f"{t.memory_bytes / 1e9:.1f}", t.summary) for t in targets]
    print(format_table(rows, right=(2, 3, 4, 5, 6)))
    print("(sustained rates; 'partc targets NAME' says where each number comes from)\n")
    rows = [("backend", "artifact", "cross-compiles", "usable here")]
    rows += [(b["name"], b["suffix"], "yes" if b["cross_compiles"] else "no",
              "yes" if not b["missing"] else f"no: pip install 'partc[{b['name']}]' ({', '.join(b['missing'])})")
             for b in backends]
    print(format_table(rows))
    return 0


def _missing(extra: str) -> list[str]:
    """The distributions of partc's extra named ``extra`` (a backend's) that are not installed here."""
    import importlib.metadata
    import re

    needed = [re.match(r"[A-Za-z0-9._-]+", r).group() for r in importlib.metadata.requires("partc") or ()
              if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", r)]
    missing = []
    for name in needed:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect``, ``profile``, ``plan``, ``compile`` and ``targets`` to the subparsers ``sub``, in that order."""
    _add_inspect(sub)
    _add_profile(sub)
    _add_plan(sub)
    _add_compile(sub)
    _add_targets(sub)
