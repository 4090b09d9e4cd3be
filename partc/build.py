"""``partc compile``: from a model and a cluster file to a build folder.

``compile_model`` runs the compile pipeline (``partc.compilation.compile_plans``: the same
passes, plans and prices as ``partc plan``), emits every program of every plan the build
carries (the primary plan, the rest of its family, fallbacks; see ``partc.compilation``),
runs every plan through the artifacts on a seeded input and compares it with the model,
times the artifacts here, and writes the manifest (``partc.manifest``), which records the
compilation's predictions as they are.

The build folder holds one artifact per program and ``manifest.json``. It is written as a
good build step should be: everything goes to a temporary folder beside the output, the
manifest last, and the folder is renamed into place only when all of it is there, so a
failed compile leaves no complete-looking build (and an older build stays intact).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from partc.cluster import load_cluster
from partc.codec import NO_CODEC
from partc.compilation import Compilation, compile_plans
from partc.context import BackendOptions
from partc.deployment import render_deployment
from partc.errors import PartcError
from partc.ir import META_TIER, link_name
from partc.manifest import (
    MANIFEST,
    LinkEntry,
    Manifest,
    PlanEntry,
    ProgramEntry,
    ScheduleEntry,
    StageEntry,
    TierEntry,
    TierScaling,
    TransferEntry,
    write_manifest,
)
from partc.partition.model import link_price, program_seconds
from partc.passes import DEFAULT_PIPELINE
from partc.pipeline import Pipeline
from partc.plan import Artifact, StageFn, eager_stage_fn, run_plan
from partc.runtime.emulate import SYSROOT_SCRIPT, emulated_stage_fn, find_emulator
from partc.targets import backend, runs_here, target
from partc.tiling.schedule import local_schedule_fn, step_id
from partc.version import __version__

log = logging.getLogger(__name__)

TIMING_RUNS = 5


@dataclass(frozen=True)
class Build:
    """A finished build: its folder, the manifest written there, and each program's median time
    on this host (program id -> seconds; None where it cannot run here)."""

    path: Path
    manifest: Manifest
    measured: Mapping[str, float | None]


def compile_model(
    model: str,
    input_shapes: Sequence[str],
    cluster: Path | str,
    output: Path | str,
    *,
    profiles: Mapping[str, Path] | None = None,
    pipeline: Pipeline = DEFAULT_PIPELINE,
    tvm_trials: int = 0,
    tuning_db: Path | None = None,
    aoti: bool = False,
    qemu_sysroot: Path | None = None,
    dump_after: Sequence[str] = (),
    dump_dir: Path = Path("partc-dump"),
    depfile: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Build:
    """Python twin of ``partc compile``: run the pipeline, emit every program, write the manifest.

    Every emitted program that can run on this machine is loaded back and timed, and every
    plan is run through the artifacts on a seeded example input and compared with the
    original model; the manifest records both.

    Args:
        model: a MODEL spec (``torchvision:resnet50``, ``pkg.mod:factory``, ``file.py:factory``).
        input_shapes: one shape per model input (``"1,3,224,224"``).
        cluster: the cluster file.
        output: the build folder to (re)write.
        profiles: target name -> measured profile file (``partc profile``).
        pipeline: the passes to run (``partc.passes.DEFAULT_PIPELINE``).
        tvm_trials: MetaSchedule trials per task for TVM stages (0: untuned).
        tuning_db: TVM tuning database folder, reused across builds.
        aoti: compile ``export`` stages with AOTInductor for this machine (minutes per stage).
        qemu_sysroot: the target's Python (``examples/qemu/make-sysroot.sh``) in which to check
            TVM stages compiled for another architecture, under qemu-user; None checks their
            PyTorch graph instead.
        dump_after: passes after which to dump the IR (``partc.compilation.compile_plans``).
        dump_dir: where to dump it.
        depfile: write a Makefile-syntax dependency file for make / ninja / CMake.
        progress: called with a line of text as each step starts.

    Raises:
        PartcError: for bad input (model, shapes, cluster, constraints, unsupported layers).
    """
    output = Path(output)
    ctx = load_cluster(cluster, profiles, BackendOptions(tvm_trials=tvm_trials, tuning_db=tuning_db, aoti=aoti,
                                                         qemu_sysroot=qemu_sysroot))
    compiled = compile_plans(model, input_shapes, ctx, pipeline=pipeline, dump_after=dump_after,
                             dump_dir=dump_dir, progress=progress)
    staging = _staging_folder(output)
    try:
        artifacts: dict[str, Artifact] = {}
        for pid, stage in compiled.artifacts.items():
            tier = ctx.tier(stage.tier)
            progress(f"emitting {pid} with {tier.backend} for {tier.target}")
            artifacts[pid] = backend(tier.backend).emit(replace(stage, name=pid), target(tier.target), staging,
                                                        ctx.options)
        measured, diffs, scale = _verify(compiled, artifacts, ctx.options.qemu_sysroot, progress)
        manifest = _manifest(model, compiled, artifacts, diffs, scale)
        render_deployment(manifest, staging, output.name)
        write_manifest(manifest, staging)  # last: a folder without it is not a build
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if depfile is not None:
        _write_depfile(Path(depfile), output / MANIFEST, _dependencies(model, compiled, Path(cluster)))
    return Build(output, manifest, measured)


def _staging_folder(output: Path) -> Path:
    if output.exists() and not output.is_dir():
        raise PartcError(f"{output}: exists and is not a folder; remove it or choose another -o")
    if output.exists() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise PartcError(f"{output}: exists and is not a partc build; remove it or choose another -o")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as err:
        raise PartcError(f"{output}: cannot write the build beside it ({err.strerror}); choose another -o") from err


def _replace(staging: Path, output: Path) -> None:
    """Move the finished build into place; an older build is removed only afterwards, and put back
    if the new one cannot take its place (also when a signal interrupts)."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        output.rename(old / output.name)
    try:
        staging.chmod(0o755)
        staging.rename(output)
    except BaseException:
        if old is not None:
            (old / output.name).rename(output)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def _manifest(
    model: str, compiled: Compilation, artifacts: Mapping[str, Artifact], diffs: Sequence[float], scale: float,
) -> Manifest:
    """The manifest of a build: ``compiled`` as it is, with the artifacts and the check."""
    ctx = compiled.ctx
    order = {name: i for i, name in enumerate(ctx.tier_names)}
    emitted = compiled.artifacts
    schedules = {pid: p.schedule for pid, p in compiled.programs.items() if p.schedule is not None}
    plans = compiled.plans
    chain = sorted({s.name: s for p in plans for s in p.plan.stages}.values(), key=lambda s: order[s.tier])
    peers = sorted({p.name: p for sch in schedules.values() for step in sch.steps for p in step.programs[1:]}.values(),
                   key=lambda s: (order[s.tier], s.index))
    stages = []
    for worker in [*chain, *peers]:
        tier = ctx.tier(worker.tier)
        programs = tuple(
            ProgramEntry(pid, a.path.name, a.sha256, a.bytes, a.inputs, a.outputs,
                         compiled.programs[pid].seconds if pid in compiled.programs
                         else program_seconds(emitted[pid].gm, worker.tier), dict(a.info))
            for pid, a in artifacts.items() if emitted[pid].name == worker.name)
        tiled = tuple(
            ScheduleEntry(pid, sch.inputs, sch.outputs,
                          tuple(tuple(step_id(pid, i, t) for t in range(len(step.programs)))
                                for i, step in enumerate(sch.steps)),
                          sch.results, compiled.programs[pid].seconds)
            for pid, sch in schedules.items() if sch.stage == worker.name)
        stages.append(StageEntry(worker.name, worker.tier, worker.index, tier.backend, tier.target, programs, tiled))
    names = [w.name for w in chain]
    entries = tuple(PlanEntry(
        p.name, p.kind, tuple(names[: max(names.index(stage) for stage in p.programs) + 1]), dict(p.programs),
        {n.name: n.meta[META_TIER] for n in p.gm.graph.nodes}, p.prediction,
        tuple(TransferEntry(t.tensor, t.src, t.dst, t.tensor.nbytes) for t in p.plan.transfers), diffs[i],
    ) for i, p in enumerate(plans))
    codecs = {link.name: link.codec for link in compiled.links}
    first = plans[0].plan
    load = plans[0].cost.load
    uses = {u.name: u for u in load.tiers} if load else {}  # each tier under the fleet's load
    return Manifest(
        __version__, model, compiled.gm.meta["partc.tracer"], first.model_inputs, first.model_outputs,
        ctx.source, ctx.objective,
        tuple(TierEntry(t.name, t.target, t.backend, t.nodes, TierScaling.of(t.scaling, uses.get(t.name)))
              for t in ctx.tiers),
        tuple(LinkEntry(lk.src, lk.dst, lk.bandwidth, lk.latency, link_price(ctx, lk).call,
                        codecs.get(link_name(lk.src, lk.dst), NO_CODEC)) for lk in ctx.links),
        tuple(stages), entries, max(diffs), scale,
    )


def _verify(
    compiled: Compilation, artifacts: Mapping[str, Artifact], sysroot: Path | None, progress: Callable[[str], None]
) -> tuple[dict[str, float | None], list[float], float]:
    """Run every plan through the artifacts; time each program; compare with the model.

    An artifact that cannot run here (cross-compiled for another architecture) runs under
    qemu-user in ``sysroot`` where ``partc.runtime.emulate`` finds it (once per distinct input, compared with
    its stage run eagerly), else eagerly; either way it is not timed, and progress says which
    it was. Returns the median seconds per program (artifacts and tiled
    programs' schedules), the largest absolute difference per plan, and the output scale.
    """
    gm, emitted = compiled.gm, compiled.artifacts
    schedules = {pid: p.schedule for pid, p in compiled.programs.items() if p.schedule is not None}
    examples = [spec.example() for spec in gm.meta["partc.inputs"]]
    measured: dict[str, list[float]] = {}
    fns: dict[str, StageFn] = {}
    warmup = 3  # untimed first calls of every program: TorchScript optimises on its second call, ORT lazily
    progress(f"loading {len(artifacts)} artifact(s)")
    emulated: dict[str, str] = {}  # program id -> what ran it
    gaps: dict[str, float] = {}  # program id -> largest difference of the emulated module from its eager stage
    for pid, artifact in artifacts.items():
        foreign = f"{artifact.info.get('arch')} {artifact.backend} module"
        if runs_here(artifact):
            fns[pid] = _timed(backend(artifact.backend).load(artifact), measured, pid, warmup)
        elif (emulator := find_emulator(artifact, sysroot)) is not None:
            emulated[pid] = f"{foreign} under {emulator.name}"
            progress(f"starting {pid} ({emulated[pid]}): checked, not timed")
            fns[pid] = _checked(emulated_stage_fn(artifact, emulator), eager_stage_fn(emitted[pid]), gaps, pid)
        else:
            progress(f"{pid} ({foreign}) cannot run here: checking its stage eagerly instead "
                     f"(to run it under qemu-user: --qemu-sysroot DIR, made by {SYSROOT_SCRIPT} DIR)")
            fns[pid] = eager_stage_fn(emitted[pid])
    with ThreadPoolExecutor(4, thread_name_prefix="partc-tiles") as pool:
        for pid, sch in schedules.items():
            fns[pid] = _timed(local_schedule_fn(sch, pid, fns, pool), measured, pid, warmup)
        with torch.no_grad():
            expected = gm(*examples)
        expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else [expected])]
        scale = max(float(np.abs(want).max()) for want in expected)
        diffs = []
        for i, compiled_plan in enumerate(compiled.plans):
            progress(f"verifying plan {i + 1} of {len(compiled.plans)} ({compiled_plan.name}, {compiled_plan.kind}) "
                     "and timing its artifacts on this machine")
            plan = compiled_plan.plan
            inputs = {t.name: x.numpy() for t, x in zip(plan.model_inputs, examples, strict=True)}
            plan_fns = {stage: fns[pid] for stage, pid in compiled_plan.programs.items()}
            for _ in range(TIMING_RUNS + warmup):
                outputs = run_plan(plan, plan_fns, inputs)
            diffs.append(max(float(np.abs(outputs[spec.name] - want).max())
                             for spec, want in zip(plan.model_outputs, expected, strict=True)))
    for pid, how in emulated.items():
        progress(f"{pid}: the {how} matched its stage run eagerly within {gaps[pid]:.2e}")
    times = {pid: statistics.median(ts) if ts else None for pid, ts in measured.items()}
    return {pid: times.get(pid) for pid in [*emitted, *schedules]}, diffs, scale


def _checked(fn: StageFn, eager: StageFn, gaps: dict[str, float], name: str) -> StageFn:
    """Wrap ``fn`` (an emulated module: slow, and its time means nothing) to run once per distinct
    input, keeping in ``gaps[name]`` its largest absolute difference from ``eager``."""
    gaps[name] = 0.0
    last: list[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]] = []

    def run(tensors):
        if last and all(np.array_equal(tensors[k], last[0][0][k]) for k in tensors):
            return last[0][1]
        got, want = fn(tensors), eager(tensors)
        gaps[name] = max(gaps[name], *(float(np.abs(got[k] - want[k]).max()) for k in want))
        last[:] = [(dict(tensors), got)]
        return got

    return run


def _timed(fn: StageFn, measured: dict, name: str, warmup: int) -> StageFn:
    """Wrap ``fn`` to append its wall time to ``measured[name]``, except for its first ``warmup`` calls."""
    measured[name] = []
    calls = 0

    def run(tensors):
        nonlocal calls
        calls += 1
        start = time.perf_counter()
        result = fn(tensors)
        if calls > warmup:
            measured[name].append(time.perf_counter() - start)
        return result

    return run


def _dependencies(model: str, compiled: Compilation, cluster: Path) -> list[Path]:
    """Every file a build is made from, for the depfile, each once.

    The model's source files (the file or module its spec names, or its ONNX file; the file
    that defines its class), the cluster file, the profiles, the description of each tier's target, the cost
    model's calibration, the calibration inputs a ``.npy`` cluster file names, and
    ``partc/version.py``, the stamp of partc's version (reinstalling partc rewrites it).
    """
    import sys
    from importlib.resources import files

    import partc.version

    ctx = compiled.ctx
    spec = model if model.endswith(".onnx") else model.rpartition(":")[0]
    factory = spec if spec.endswith((".py", ".onnx")) else getattr(sys.modules.get(spec), "__file__", None)
    shipped = files("partc.targets")
    calibration = ctx.compression.calibration if ctx.compression else None
    found = [
        factory, compiled.source, cluster, *ctx.profiles.values(),
        *(shipped.joinpath("descriptions", f"{name}.yaml") for name in sorted({t.target for t in ctx.tiers})),
        shipped.joinpath("calibration.json"), calibration if calibration and calibration.endswith(".npy") else None,
        partc.version.__file__,
    ]
    return list(dict.fromkeys(Path(str(f)).resolve() for f in found if f))


def _write_depfile(path: Path, output: Path, deps: Sequence[Path]) -> None:
    """Write ``output: deps...`` in Makefile syntax, atomically, as the build system names the files.

    The target is written as given (the ``-o`` folder as on the command line, then
    ``manifest.json``): make and ninja match it against their own rule's output by name. A
    dependency inside the current folder (where the build runs) is written relative to it,
    any other absolute; both only have to exist for make, ninja and CMake.
    """
    here = Path.cwd()

    def name(p: Path) -> str:
        return str(p.relative_to(here) if p.is_relative_to(here) else p)

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{escape(str(output))}: " + " \\\n  ".join(escape(name(d)) for d in deps) + "\n")
    tmp.replace(path)
