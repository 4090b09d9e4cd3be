"""Run a build on this machine: the primary plan's stages in this process, through their artifacts.

Tensors that cross a hop go through that hop's codec (encoded, then decoded), as they do
between workers, so a build with a lossy codec gives here what it gives when distributed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from partc.codec import decode, encode, parse_codec
from partc.errors import ManifestError
from partc.manifest import Manifest, ManifestStage, manifest_stages, read_manifest
from partc.plan import Artifact, StageFn, TensorSpec
from partc.runtime.driver import check_inputs
from partc.runtime.plans import Hop, from_manifest
from partc.tiling.schedule import Observer, TileCall, schedule_fn

if TYPE_CHECKING:
    from partc.build import Build

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Pipeline:
    """A loaded build: the primary plan's programs, loaded, in the order they run.

    Call it with the model's inputs (numpy arrays or torch tensors: one dict by input name, in
    the model's input order, or as keywords) to get the named outputs as numpy arrays.

    Attributes:
        path: the build folder.
        manifest: its manifest.
        programs: (stage, program id, its inputs, its outputs) of each stage of the primary
            plan that has a program, in chain order.
        fns: program id -> loaded program (a tiled one runs its tiles in this process).
        hops: the hops of the chain (their codecs apply to the tensors crossing them).
    """

    path: Path
    manifest: Manifest
    programs: tuple[tuple[str, str, tuple[TensorSpec, ...], tuple[TensorSpec, ...]], ...]
    fns: Mapping[str, StageFn]
    hops: tuple[Hop, ...]

    @property
    def model_inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in order."""
        return self.manifest.inputs

    @property
    def model_outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in order."""
        return self.manifest.outputs

    def __call__(self, *args: object, **named: object) -> dict[str, np.ndarray]:
        """Run every stage in order on the model's inputs: ``pipeline(x)``, ``pipeline(x, y)``,
        ``pipeline({"x": x})`` or ``pipeline(x=x)``, each a numpy array or a torch tensor.

        Raises:
            ManifestError: naming the input that is missing, unknown, not an array, or of the
                wrong shape or dtype, and what to do.
        """
        inputs = self._arrays(args, named)
        check_inputs(self.model_inputs, inputs)
        names = [s.name for s in self.manifest.chain]
        env = {t.name: inputs[t.name] for t in self.model_inputs}
        made_at = dict.fromkeys(env, 0)
        for stage, pid, reads, writes in self.programs:
            here = names.index(stage)
            for t in reads:
                for hop in self.hops[made_at[t.name]: here]:
                    env[t.name] = _through(hop.codec, env[t.name])
                made_at[t.name] = here
            env.update(self.fns[pid]({t.name: env[t.name] for t in reads}))
            made_at.update(dict.fromkeys((t.name for t in writes), here))
        return {t.name: env[t.name] for t in self.model_outputs}


    def _arrays(self, args: tuple, named: Mapping[str, object]) -> dict[str, np.ndarray]:
        """The call's inputs by name as numpy arrays, checked against the model's inputs but for shape."""
        specs = self.model_inputs
        takes = ", ".join(f"{s.name} ({'x'.join(map(str, s.shape))} {s.dtype})" for s in specs)
        if len(args) == 1 and isinstance(args[0], Mapping) and not named:
            given = dict(args[0])
        elif args and named:
            raise ManifestError("give the inputs in order or by name, not both")
        elif args:
            if len(args) != len(specs):
                raise ManifestError(f"{len(args)} input(s) given; the model takes {len(specs)}: {takes}")
            given = {s.name: value for s, value in zip(specs, args, strict=True)}
        else:
            given = dict(named)
        unknown = sorted(set(given) - {s.name for s in specs})
        if unknown:
            raise ManifestError(f"input {unknown[0]!r}: the model has no such input; it takes {takes}")
        arrays = {}
        for spec in specs:
            value = given.get(spec.name)
            if type(value).__module__.startswith("torch") and hasattr(value, "numpy"):
                value = value.detach().cpu().numpy()
            if value is not None and not isinstance(value, np.ndarray):
                raise ManifestError(f"input {spec.name!r}: got a {type(value).__name__}; give a numpy array or a "
                                    "torch tensor")
            if value is not None and value.shape == tuple(spec.shape) and value.dtype != np.dtype(spec.dtype):
                raise ManifestError(f"input {spec.name!r}: got {value.dtype}, the build takes {spec.dtype}; convert "
                                    f"it (array.astype(numpy.{spec.dtype}) or tensor.to(torch.{spec.dtype}))")
            if value is not None:
                arrays[spec.name] = value
        return arrays


def _through(codec: str, array: np.ndarray) -> np.ndarray:
    """``array`` as it arrives after crossing a hop with ``codec``."""
    if codec == "none":
        return array
    parsed = parse_codec(codec)
    return decode(encode(array, parsed), parsed, array.shape, array.dtype)


def load(build: Build | Path | str, qemu_sysroot: Path | None = None) -> Pipeline:
    """Verify every artifact of ``build`` (what ``partc.compile`` returns, or its folder) against
    the manifest, then load it (a TVM stage compiled for another architecture under qemu-user in
    ``qemu_sysroot``: ``load_programs``).

    Raises:
        ManifestError: for a malformed manifest, or a missing or tampered artifact.
    """
    path = Path(build if isinstance(build, (str, os.PathLike)) else build.path)
    manifest = read_manifest(path)
    folder = path if path.is_dir() else path.parent
    stages = manifest_stages(manifest, folder)  # checksums first: nothing unverified is loaded
    primary = manifest.plans[0].programs
    fns = load_programs(stages, [s.name for s in stages], None, ThreadPoolExecutor(4, thread_name_prefix="partc-tiles"),
                        qemu_sysroot=qemu_sysroot)
    programs = []
    for stage in stages:
        pid = primary.get(stage.name)
        if pid is not None:
            program = stage.schedules.get(pid) or stage.programs[pid]
            programs.append((stage.name, pid, program.inputs, program.outputs))
    _, hops = from_manifest(manifest)
    return Pipeline(folder, manifest, tuple(programs), fns, tuple(hops))


def load_programs(stages: Sequence[ManifestStage], names: Collection[str], call: TileCall | None,
                  pool: Executor, threads: int = 0, observe: Observer | None = None,
                  qemu_sysroot: Path | None = None) -> dict[str, StageFn]:
    """Load every program of the stages ``names`` of a build, by program id.

    An artifact loads through its backend, with ``threads`` compute threads where the
    backend takes a number (TorchScript, ONNX; 0: the backend's default, every core), or,
    cross-compiled for another architecture, under qemu-user in ``qemu_sysroot`` where
    ``partc.runtime.emulate`` finds it (with a warning: its times say nothing about the target); a
    tiled program becomes its schedule's ``StageFn``, whose tiles on the tier's other nodes
    go through ``call`` (None: those nodes' programs run in this process and must be among
    ``names``), its parallel steps timed for ``observe`` (``schedule_fn``).
    """
    from partc.runtime.emulate import emulated_stage_fn, find_emulator
    from partc.targets import backend, runs_here

    def load_one(artifact: Artifact) -> StageFn:
        emulator = None if runs_here(artifact) else find_emulator(artifact, qemu_sysroot)
        if emulator is not None:
            log.warning("stage %s: its %s %s module runs under %s here (emulated: not the target's speed)",
                        artifact.stage, artifact.info["arch"], artifact.backend, emulator.name)
            return emulated_stage_fn(artifact, emulator)
        chosen = backend(artifact.backend)
        return (type(chosen)(threads=threads) if threads and hasattr(chosen, "threads") else chosen).load(artifact)

    fns = {pid: load_one(a) for s in stages if s.name in names for pid, a in s.programs.items()}
    reads = {pid: [t.name for t in a.inputs] for s in stages for pid, a in s.programs.items()}
    for stage in stages:
        if stage.name not in names:
            continue
        for pid, entry in stage.schedules.items():
            tiles = call or (lambda t, program, tensors: fns[program](tensors))
            fns[pid] = schedule_fn(entry.steps, reads, entry.results, fns, tiles, pool, observe)
    return fns
