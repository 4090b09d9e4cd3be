"""``partc compile``: from a model and a cluster file to a build folder.

A build carries several plans (``partc.partition.family.deployment_plans``): the primary one for
the cluster file's bandwidths, the other plans of its family (optimal at other
bandwidths, for the runtime to switch to) and fallbacks that stop before a tier. Each tier
with work in some plan is one stage, ``<tier>.0``, served by one worker; a stage holds one
program per distinct piece of the model it runs across the plans (a piece shared by
several plans is emitted once). The primary plan's programs are named after their stage
(``edge.0``), the others after the plan that first needs them (``edge.0-p2``).

The build folder holds one artifact per program and ``manifest.json``. It is written as a
good build step should be: everything goes to a temporary folder beside the output, the
manifest last, and the folder is renamed into place only when all of it is there, so a
failed compile leaves no complete-looking build (and an older build stays intact).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import fx

from partc.context import load_cluster
from partc.errors import PartcError
from partc.ir import META_TIER, clone
from partc.manifest import MANIFEST, build_manifest, render_deployment, write_manifest
from partc.pipeline import run_passes
from partc.plan import Artifact, Plan, Stage, StageFn, build_plan, eager_stage_fn, run_plan
from partc.report import trace_model
from partc.tiling.schedule import Schedule, local_schedule_fn, schedule_stage, step_id
from partc.trace import load_model

log = logging.getLogger(__name__)

TIMING_RUNS = 5


@dataclass(frozen=True)
class Build:
    """A finished build: its folder and the manifest written there."""

    path: Path
    manifest: dict


def compile_model(
    model: str,
    input_shapes: Sequence[str],
    cluster: Path | str,
    output: Path | str,
    *,
    profiles: Mapping[str, Path] | None = None,
    passes: Sequence[str] | None = None,
    tvm_trials: int = 0,
    tuning_db: Path | None = None,
    dump_after: Sequence[str] = (),
    dump_dir: Path = Path("partc-dump"),
    depfile: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Build:
    """Python twin of ``partc compile``: trace, plan, emit every stage, write the manifest.

    Every emitted stage that can run on this machine is loaded back and timed, and the
    whole pipeline is run through the artifacts on a seeded example input and compared
    with the original model; the manifest records both.

    Args:
        model: a MODEL spec (``torchvision:resnet50``, ``pkg.mod:factory``, ``file.py:factory``).
        input_shapes: one shape per model input (``"1,3,224,224"``).
        cluster: the cluster file.
        output: the build folder to (re)write.
        profiles: target name -> measured profile file (``partc profile``).
        passes: pass names to run; default ``partc.passes.DEFAULT_PIPELINE``.
        tvm_trials: MetaSchedule trials per task for TVM stages (0: untuned).
        tuning_db: TVM tuning database folder, reused across builds.
        dump_after: passes after which to dump the IR (see ``run_passes``).
        dump_dir: where to dump it.
        depfile: write a Makefile-syntax dependency file for make / ninja / CMake.
        progress: called with a line of text as each step starts.

    Raises:
        PartcError: for bad input (model, shapes, cluster, constraints, unsupported layers).
    """
    from partc.partition.family import deployment_plans
    from partc.partition.model import assigned_cost
    from partc.passes import DEFAULT_PIPELINE, PLAN_PASSES
    from partc.passes.compress import priced
    from partc.targets import backend, target

    output = Path(output)
    ctx = load_cluster(cluster, profiles)
    progress(f"tracing {model}")
    module = load_model(model)
    gm = trace_model(module, input_shapes)
    names = tuple(passes) if passes is not None else DEFAULT_PIPELINE
    for name in names:
        progress(f"pass {name}")
        gm = run_passes(gm, [name], ctx, dump_after=[d for d in dump_after if d in (name, "trace")], dump_dir=dump_dir)
        dump_after = [d for d in dump_after if d not in (name, "trace")]
    graph, primary, _ = assigned_cost(gm, ctx)
    graph = priced(graph, gm)  # every plan is priced with each link's codec
    progress("planning for other bandwidths and for failed tiers")
    choices = deployment_plans(graph, primary, ctx.objective)
    assigned = [_assign(gm, graph.tiers, tiers) for _, tiers in choices]
    if any(t.nodes > 1 for t in ctx.tiers):
        progress(f"tiling each plan's stages on tiers with several nodes ({', '.join(PLAN_PASSES)})")
        assigned = [run_passes(g, PLAN_PASSES, ctx) for g in assigned]
    plans = [build_plan(g, ctx) for g in assigned]
    programs, uses = _programs(plans)
    schedules = {pid: sch for pid, stage in programs.items() if (sch := schedule_stage(stage)) is not None}
    emitted = {step_id(pid, i, t): program for pid, sch in schedules.items()
               for i, step in enumerate(sch.steps) for t, program in enumerate(step.programs)}
    emitted |= {pid: stage for pid, stage in programs.items() if pid not in schedules}

    staging = _staging_folder(output)
    try:
        artifacts: dict[str, Artifact] = {}
        for pid, stage in emitted.items():
            tier = ctx.tier(stage.tier)
            progress(f"emitting {pid} with {tier.backend} for {tier.target}")
            emitter = _tvm_backend(tvm_trials, tuning_db) if tier.backend == "tvm" else backend(tier.backend)
            artifacts[pid] = emitter.emit(replace(stage, name=pid), target(tier.target), staging)
        progress(f"verifying {len(plans)} plan(s) and timing the artifacts on this machine")
        measured, diffs, scale = _verify(gm, plans, uses, emitted, schedules, artifacts)
        manifest = build_manifest(model, gm, ctx, graph, choices, assigned, plans, uses, schedules, emitted,
                                  artifacts, measured, diffs, scale)
        render_deployment(manifest, staging, output.name)
        write_manifest(manifest, staging)  # last: a folder without it is not a build
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if depfile is not None:
        _write_depfile(Path(depfile), output / MANIFEST, _dependencies(module, cluster, profiles or {}))
    return Build(output, manifest)


def _tvm_backend(trials: int, database: Path | None):
    from partc.targets.tvm import TvmBackend

    return TvmBackend(trials=trials, database=database)


def _staging_folder(output: Path) -> Path:
    if output.exists() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise PartcError(f"{output}: exists and is not a partc build; remove it or choose another -o")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))


def _replace(staging: Path, output: Path) -> None:
    """Move the finished build into place; an older build is removed only afterwards."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        output.rename(old / output.name)
    staging.chmod(0o755)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


def _assign(gm: fx.GraphModule, tier_names: Sequence[str], tiers: np.ndarray) -> fx.GraphModule:
    """A copy of ``gm`` with the tier of each node (cost-graph order: every node but the output)."""
    gm = clone(gm)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    for node, tier in zip(nodes, tiers.tolist(), strict=True):
        node.meta[META_TIER] = tier_names[tier]
    out = gm.graph.output_node()
    out.meta[META_TIER] = tier_names[max((tier_names.index(a.meta[META_TIER]) for a in out.all_input_nodes), default=0)]
    return gm


def _programs(plans: Sequence[Plan]) -> tuple[dict[str, Stage], list[dict[str, str]]]:
    """Every distinct stage program of ``plans`` by program id (see the module docstring), and
    for each plan, the program each of its stages runs."""
    programs: dict[str, Stage] = {}
    seen: dict[tuple, str] = {}
    uses = []
    for i, plan in enumerate(plans):
        for stage in plan.stages:
            key = (stage.name, stage.gm.code, stage.inputs, stage.outputs)
            if key not in seen:
                seen[key] = stage.name if i == 0 else f"{stage.name}-p{i}"
                programs[seen[key]] = stage
        uses.append({s.name: seen[(s.name, s.gm.code, s.inputs, s.outputs)] for s in plan.stages})
    return programs, uses


def _verify(
    gm: fx.GraphModule, plans: Sequence[Plan], uses: Sequence[Mapping[str, str]], emitted: Mapping[str, Stage],
    schedules: Mapping[str, Schedule], artifacts: Mapping[str, Artifact],
) -> tuple[dict[str, float | None], list[float], float]:
    """Run every plan through the artifacts; time each program; compare with the model.

    An artifact that cannot run here (cross-compiled for another architecture) runs
    eagerly and is not timed. Returns the median seconds per program (emitted ones and
    tiled stages' schedules), the largest absolute difference per plan, and the output scale.
    """
    from partc.targets import backend
    from partc.targets.tvm import host_arch

    examples = [spec.example() for spec in gm.meta["partc.inputs"]]
    measured: dict[str, list[float]] = {}
    fns: dict[str, StageFn] = {}
    for pid, artifact in artifacts.items():
        if artifact.info.get("arch", host_arch()) == host_arch():
            fns[pid] = _timed(backend(artifact.backend).load(artifact), measured, pid)
        else:
            fns[pid] = eager_stage_fn(emitted[pid])
    with ThreadPoolExecutor(4, thread_name_prefix="partc-tiles") as pool:
        for pid, sch in schedules.items():
            fns[pid] = _timed(local_schedule_fn(sch, pid, fns, pool), measured, pid)
        with torch.no_grad():
            expected = gm(*examples)
        expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else [expected])]
        scale = max(float(np.abs(want).max()) for want in expected)
        diffs = []
        for plan, use in zip(plans, uses, strict=True):
            inputs = {t.name: x.numpy() for t, x in zip(plan.model_inputs, examples, strict=True)}
            plan_fns = {stage: fns[pid] for stage, pid in use.items()}
            for _ in range(TIMING_RUNS + 1):
                outputs = run_plan(plan, plan_fns, inputs)
            diffs.append(max(float(np.abs(outputs[spec.name] - want).max())
                             for spec, want in zip(plan.model_outputs, expected, strict=True)))
    times = {pid: statistics.median(ts[1:]) if len(ts) > 1 else None for pid, ts in measured.items()}
    return {pid: times.get(pid) for pid in [*emitted, *schedules]}, diffs, scale


def _timed(fn: StageFn, measured: dict, name: str) -> StageFn:
    measured[name] = []

    def run(tensors):
        start = time.perf_counter()
        result = fn(tensors)
        measured[name].append(time.perf_counter() - start)
        return result

    return run


def _dependencies(module: torch.nn.Module, cluster: Path | str, profiles: Mapping[str, Path]) -> list[Path]:
    """The files a build depends on: the model's source, the cluster file, the profiles."""
    source = getattr(sys.modules.get(type(module).__module__), "__file__", None)
    deps = [Path(source)] if source else []
    return [*deps, Path(cluster), *map(Path, profiles.values())]


def _write_depfile(path: Path, output: Path, deps: Sequence[Path]) -> None:
    """Write ``output: deps...`` in Makefile syntax, atomically."""

    def escape(p: Path) -> str:
        return str(p.resolve()).replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{escape(output)}: " + " \\\n  ".join(escape(d) for d in deps) + "\n")
    tmp.replace(path)
