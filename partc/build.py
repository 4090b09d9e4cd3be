"""``partc compile``: from a model and a cluster file to a build folder.

The build folder holds one artifact per stage and ``manifest.json``. It is written as a
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx

import partc
from partc.context import CompileContext, load_cluster
from partc.errors import PartcError
from partc.ir import META_TIER
from partc.manifest import MANIFEST, render_deployment, tensor_json, write_manifest
from partc.pipeline import run_passes
from partc.plan import Artifact, Plan, StageFn, build_plan, eager_stage_fn, run_plan
from partc.report import trace_model
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
    from partc.passes import DEFAULT_PIPELINE
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
    plan = build_plan(gm, ctx)

    staging = _staging_folder(output)
    try:
        artifacts = []
        for stage in plan.stages:
            tier = ctx.tier(stage.tier)
            progress(f"emitting {stage.name} with {tier.backend} for {tier.target}")
            emitter = _tvm_backend(tvm_trials, tuning_db) if tier.backend == "tvm" else backend(tier.backend)
            artifacts.append(emitter.emit(stage, target(tier.target), staging))
        progress("verifying and timing the artifacts on this machine")
        measured, diff, scale = _verify(gm, plan, artifacts, ctx)
        manifest = _manifest(model, gm, ctx, plan, artifacts, measured, diff, scale)
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


def _verify(
    gm: fx.GraphModule, plan: Plan, artifacts: Sequence[Artifact], ctx: CompileContext
) -> tuple[dict[str, float | None], float, float]:
    """Run the pipeline through the artifacts; time each stage; compare with the model.

    A stage whose artifact cannot run here (cross-compiled for another architecture) runs
    eagerly and is not timed.
    """
    from partc.targets import backend
    from partc.targets.tvm import host_arch

    examples = [spec.example() for spec in gm.meta["partc.inputs"]]
    fns: dict[str, StageFn] = {}
    runnable: dict[str, bool] = {}
    for stage, artifact in zip(plan.stages, artifacts, strict=True):
        runnable[stage.name] = artifact.info.get("arch", host_arch()) == host_arch()
        fns[stage.name] = backend(artifact.backend).load(artifact) if runnable[stage.name] else eager_stage_fn(stage)
    measured: dict[str, float | None] = {}
    timed = {name: _timed(fn, measured, name) if runnable[name] else fn for name, fn in fns.items()}
    inputs = {t.name: x.numpy() for t, x in zip(plan.model_inputs, examples, strict=True)}
    for _ in range(TIMING_RUNS + 1):
        outputs = run_plan(plan, timed, inputs)
    with torch.no_grad():
        expected = gm(*examples)
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    diff = scale = 0.0
    for spec, want in zip(plan.model_outputs, expected, strict=True):
        want = want.numpy()
        diff = max(diff, float(np.abs(outputs[spec.name] - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    times = {name: statistics.median(ts[1:]) if ts else None for name, ts in measured.items()}
    return {s.name: times.get(s.name) for s in plan.stages}, diff, scale


def _timed(fn: StageFn, measured: dict, name: str) -> StageFn:
    measured[name] = []

    def run(tensors):
        start = time.perf_counter()
        result = fn(tensors)
        measured[name].append(time.perf_counter() - start)
        return result

    return run


def _manifest(model, gm, ctx, plan, artifacts, measured, diff, scale) -> dict:
    from partc.passes.cut import assigned_cost

    graph, _, cost = assigned_cost(gm, ctx)
    compute = dict(zip(graph.tiers, cost.compute, strict=True))
    stages = []
    for stage, artifact in zip(plan.stages, artifacts, strict=True):
        stages.append({
            "name": stage.name, "tier": stage.tier, "index": stage.index, "backend": artifact.backend,
            "target": ctx.tier(stage.tier).target, "artifact": artifact.path.name, "sha256": artifact.sha256,
            "bytes": artifact.bytes, "inputs": [tensor_json(t) for t in artifact.inputs],
            "outputs": [tensor_json(t) for t in artifact.outputs], "predicted_s": compute[stage.tier],
            "measured_s": measured[stage.name], "info": dict(artifact.info),
        })
    return {
        "schema_version": 1,
        "partc_version": partc.__version__,
        "model": {
            "spec": model, "tracer": gm.meta["partc.tracer"],
            "inputs": [tensor_json(t) for t in plan.model_inputs],
            "outputs": [tensor_json(t) for t in plan.model_outputs],
        },
        "cluster": {
            "source": ctx.source, "objective": ctx.objective,
            "tiers": [{"name": t.name, "target": t.target, "backend": t.backend, "nodes": t.nodes} for t in ctx.tiers],
            "links": [{"from": lk.src, "to": lk.dst, "bandwidth": lk.bandwidth, "latency": lk.latency}
                      for lk in ctx.links],
        },
        "plan": {
            "assignment": {n.name: n.meta[META_TIER] for n in gm.graph.nodes},
            "predicted": {
                "latency": cost.latency, "bottleneck": cost.bottleneck, "compute": compute,
                "transfer": dict(zip(graph.links, cost.transfer, strict=True)),
                "link_bytes": dict(zip(graph.links, map(int, cost.link_bytes), strict=True)),
            },
        },
        "stages": stages,
        "transfers": [
            {"tensor": tensor_json(t.tensor), "from": t.src, "to": t.dst,
             "bytes": int(np.prod(t.tensor.shape)) * np.dtype(t.tensor.dtype).itemsize}
            for t in plan.transfers
        ],
        "verification": {"max_abs_diff": diff, "output_scale": scale, "inputs": "seeded example"},
    }


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
