"""TVM backend: a stage as a Relax VM shared library (``.so``) for the target's triple.

A stage is imported with ``relax.frontend.torch.from_fx``, lowered with the Relax "zero"
pipeline, optionally scheduled from a MetaSchedule tuning database, compiled with
``tvm.compile`` for ``{"kind": "llvm", "mtriple": target.triple, ...}`` and exported with
``export_library``. A target on another architecture is cross-compiled with
``<triple>-gcc`` (Debian: ``apt-get install gcc-aarch64-linux-gnu``), and the ELF header of
the result is checked to be for that architecture.

Speed: the wheel's default CPU pipeline applies no schedules, so an untuned stage runs
naive loops (~50x slower than ONNX Runtime on resnet50). ``emit`` with
``BackendOptions(tvm_trials=N, tuning_db=DIR)`` tunes every task of a stage that ``DIR`` has
no record for with N MetaSchedule trials, and keeps the records in ``DIR`` (a
``JSONDatabase``), so later builds of the same layers reuse them without tuning again;
``tvm_trials=0`` with a ``tuning_db`` only applies what is there. Tuning measures
candidates on this machine, so it is only done for targets of this machine's architecture.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from partc.context import BackendOptions
from partc.errors import PartcError, RunError, UnsupportedLayerError
from partc.plan import Artifact, Stage, StageFn, make_artifact

log = logging.getLogger(__name__)

# ELF e_machine by architecture (the first field of a target triple).
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm": 40, "riscv64": 243}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "arm", "armv7": "arm"}

UNTUNED_WARNING = "stage %s is untuned: expect ~50x slower than ONNX Runtime (tune with trials > 0)"


def host_arch() -> str:
    """Return this machine's architecture as the first field of a triple ("x86_64")."""
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def triple_arch(triple: str) -> str:
    """Return the architecture of an LLVM triple ("aarch64-linux-gnu" -> "aarch64")."""
    arch = triple.split("-")[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


def elf_machine(path: Path) -> int:
    """Return the ``e_machine`` field of the ELF file ``path``.

    Raises:
        PartcError: if ``path`` is not an ELF file.
    """
    with open(path, "rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise PartcError(f"{path}: not an ELF file")
    order = "little" if header[5] == 1 else "big"
    return int.from_bytes(header[18:20], order)


class TvmBackend:
    """Emit TVM stages and run them with the Relax VM.

    The backend holds no settings: ``emit`` reads ``options.tvm_trials`` and
    ``options.tuning_db``.
    """

    name = "tvm"
    suffix = ".so"
    dynamic_shapes = False
    cross_compiles = True

    def emit(self, stage: Stage, target: object, outdir: Path, options: BackendOptions) -> Artifact:
        """Compile ``stage`` for ``target`` and write ``outdir/<stage>.so``.

        ``target`` is a ``TargetDesc`` (or any object with ``triple``, ``cores``, ``mcpu``
        and ``mattr``). With ``options.tuning_db``, the stage is scheduled from that
        database after tuning its missing tasks with ``options.tvm_trials`` trials each.

        Raises:
            UnsupportedLayerError: if TVM cannot import or compile the stage.
            PartcError: if the cross compiler for a foreign target is not installed, or the
                library is not an ELF file for the target's architecture.
        """
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_fx

        arch = triple_arch(target.triple)
        if arch not in ELF_MACHINES:
            raise PartcError(f"target {target.name!r}: triple {target.triple!r}: unknown architecture {arch!r}")
        cross = arch != host_arch()
        cc = f"{target.triple}-gcc" if cross else None
        if cc and shutil.which(cc) is None:
            raise PartcError(
                f"stage {stage.name}: cross compiler {cc!r} for target {target.name!r} not found; "
                f"install it (Debian/Ubuntu: apt-get install gcc-{target.triple})"
            )
        tvm_target = tvm.target.Target(_target_dict(target))
        try:
            mod = from_fx(stage.gm, [(t.shape, t.dtype) for t in stage.inputs])
            mod = relax.transform.DecomposeOpsForInference()(mod)
        except Exception as err:
            raise UnsupportedLayerError(
                f"stage {stage.name}: TVM cannot import it: {str(err).strip().splitlines()[0]}; "
                "use backend 'onnx' or 'torchscript' for this tier"
            ) from err
        tuned, total = 0, None
        if options.tuning_db is not None:
            mod, tuned, total = self._schedule(stage, mod, tvm_target, cross, options.tvm_trials, options.tuning_db)
        if not tuned:
            log.warning(UNTUNED_WARNING, stage.name)
        elif tuned < total:
            log.warning("stage %s is partly tuned: %d of %d tasks have tuning records", stage.name, tuned, total)
        path = Path(outdir) / f"{stage.name}{self.suffix}"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=self.suffix)
        os.close(fd)
        try:
            executable = tvm.compile(mod, target=tvm_target)
            executable.export_library(tmp, **({"cc": cc} if cc else {}))
            machine = elf_machine(Path(tmp))
            if machine != ELF_MACHINES[arch]:
                raise PartcError(
                    f"stage {stage.name}: {path.name} has ELF machine {machine}, not {ELF_MACHINES[arch]} "
                    f"({arch}); check the cross compiler {cc or 'cc'}"
                )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        info = {
            "triple": target.triple,
            "arch": arch,
            "tuned": bool(total) and tuned == total,
            "tuned_tasks": tuned,
            "tasks": total,
            "trials": options.tvm_trials,
        }
        return make_artifact(stage, self.name, path, info)

    def _schedule(self, stage: Stage, mod, tvm_target, cross: bool, trials: int, database: Path):
        """Tune the tasks of ``mod`` missing from ``database`` with ``trials`` trials each, then apply it.

        Returns the scheduled module, the number of tasks with a record and the number of tasks.
        """
        from tvm import relax
        from tvm.s_tir import meta_schedule as ms

        with tvm_target:  # lower to TIR first: tasks and records are TIR functions
            mod = relax.get_pipeline("zero")(relax.transform.CanonicalizeBindings()(mod))
        database.mkdir(parents=True, exist_ok=True)
        db = ms.database.JSONDatabase(work_dir=str(database))
        tasks = ms.relax_integration.extract_tasks(mod, tvm_target)

        def missing():
            return [t for t in tasks if db.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is None]

        todo = missing()
        if todo and trials and cross:
            log.warning(
                "stage %s: cannot tune for %s on this %s machine (MetaSchedule measures candidates "
                "where it runs); using the %d records the database has",
                stage.name,
                triple_arch(str(tvm_target.attrs["mtriple"])),
                host_arch(),
                len(tasks) - len(todo),
            )
        elif todo and trials:
            cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
            log.info(
                "stage %s: tuning %d of %d tasks, %d trials each (cost model %s)",
                stage.name,
                len(todo),
                len(tasks),
                trials,
                cost_model,
            )
            with tempfile.TemporaryDirectory(prefix="partc-ms-") as work_dir:
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    extracted_tasks=todo, work_dir=work_dir, seed=0
                )
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=work_dir,
                    max_trials_global=trials * len(todo),
                    max_trials_per_task=trials,
                    num_trials_per_iter=min(trials, 64),
                    builder=ms.builder.LocalBuilder(f_build=_build_candidate, timeout_sec=180),
                    runner=ms.runner.LocalRunner(timeout_sec=60),
                    database=db,
                    cost_model=cost_model,
                )
            todo = missing()
        with tvm_target, db:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        return mod, len(tasks) - len(todo), len(tasks)

    def load(self, artifact: Artifact) -> StageFn:
        """Load ``artifact.path`` into a Relax VM on this machine's CPU.

        Raises:
            RunError: if the library was built for another architecture.
        """
        machine = elf_machine(artifact.path)
        if machine != ELF_MACHINES.get(host_arch()):
            arch = next((a for a, m in ELF_MACHINES.items() if m == machine), f"ELF machine {machine}")
            raise RunError(
                f"{artifact.path}: stage {artifact.stage} was compiled for {arch} and cannot run on this "
                f"{host_arch()} machine; run it on its target, or compile it for a {host_arch()} target"
            )
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.path)), tvm.cpu())
        main = vm["main"]

        def run(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            args = [tvm.runtime.tensor(np.ascontiguousarray(tensors[t.name])) for t in artifact.inputs]
            result = main(*args)
            values = [result] if hasattr(result, "numpy") else list(result)
            return {t.name: v.numpy() for t, v in zip(artifact.outputs, values, strict=True)}

        return run


def _target_dict(target: object) -> dict:
    """The TVM target of ``target``'s CPU (for a GPU target: the CPU of its host, with TVM's defaults)."""
    spec: dict = {"kind": "llvm", "mtriple": target.triple}
    if getattr(target, "kind", "cpu") == "cpu":
        spec["num-cores"] = int(getattr(target, "cores", 1) or 1)
    else:
        log.warning("target %s is a %s: the tvm backend compiles for its host CPU only", target.name, target.kind)
        return spec
    if getattr(target, "mcpu", ""):
        spec["mcpu"] = target.mcpu
    if getattr(target, "mattr", ""):
        spec["mattr"] = [a.strip() for a in target.mattr.split(",") if a.strip()]
    return spec


def _build_candidate(mod, target, _params):
    """MetaSchedule builder without the default's 35-60 s import of CUDA intrinsics per worker."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


BACKEND = TvmBackend()
