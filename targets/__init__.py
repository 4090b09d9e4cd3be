"""partc's targets: hardware descriptions, one small YAML file each under ``descriptions/``.

A *target* is a hardware description (what a tier runs on); a *backend* is an artifact
format. Each ``descriptions/NAME.yaml`` holds the fields of ``TargetDesc`` and a ``source``
text that says where its numbers come from (vendor data sheets, measurements).

A user's own target is a YAML file of the same fields, named by its path wherever a target
name goes (a tier's ``target: boards/my-board.yaml`` in a cluster file, relative to the
working directory): ``target(name)`` reads any name that ends in ``.yaml`` or ``.yml`` as
a file. ``partc profile MODEL ... --fit-target boards/my-board.yaml`` writes one fitted to
a profile measured on that board (``partc.costmodel.fit_target``).

Backends (``torchscript``, ``onnx``, ``tvm``, ``export``) are one module each; ``BACKENDS`` maps their
names to their instances, and ``backend(name)`` looks one up. A backend takes its compile
settings from the ``BackendOptions`` that ``emit`` receives. ``runs_here(artifact)`` says
whether this machine can load an artifact.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Protocol

import yaml

from partc.context import BackendOptions
from partc.errors import ClusterError
from partc.plan import Artifact, Stage, StageFn
from partc.targets import export, onnx, torchscript, tvm
from partc.targets.tvm import host_arch


@dataclass(frozen=True)
class TargetDesc:
    """A hardware description, as the cost model and the backends see it.

    Attributes:
        name: the key in ``TARGETS`` and in cluster files ("rpi4").
        summary: one line for humans.
        kind: "cpu" or "gpu".
        cores: CPU cores (or GPU CUDA cores) used for inference.
        clock_ghz: core clock; scales per-node dispatch overhead between CPUs.
        peak_gflops: sustained FP32 GFLOP/s of all ``cores`` together on a large sgemm
            (like for like with the calibration host, whose rate is measured the same way;
            the data-sheet peak is in ``source``).
        memory_bandwidth_gbs: sustained DRAM bandwidth in GB/s (1e9 bytes/s) of a large
            copy (STREAM-like); the data-sheet figure is in ``source``.
        memory_bytes: memory available to inference.
        launch_overhead_us: fixed cost added to every node (GPU kernel launch); 0 on CPUs.
        triple: LLVM target triple for compiled backends ("aarch64-linux-gnu").
        mcpu: LLVM ``-mcpu`` ("cortex-a72"), or "" when there is none to give.
        mattr: LLVM ``-mattr`` ("+neon"), or "".
        source: where the numbers come from.
        dispatch_us: per-node framework dispatch time on this machine (a tiny op called
            eagerly: Python, ATen dispatch, allocator); 0 when unknown, and then the
            reference host's is scaled by clock. Optional in a description file.
        saturation_items: GPU only: output elements a kernel needs to fill the device
            (SMs x resident threads); a smaller layer runs at the fraction it fills.
            0 for CPUs. Optional in a description file.
    """

    name: str
    summary: str
    kind: str
    cores: int
    clock_ghz: float
    peak_gflops: float
    memory_bandwidth_gbs: float
    memory_bytes: int
    launch_overhead_us: float
    triple: str
    mcpu: str
    mattr: str
    source: str
    dispatch_us: float = 0.0
    saturation_items: int = 0


OPTIONAL = {f.name: f.default for f in fields(TargetDesc) if f.default is not MISSING}


def parse_description(text: str, where: str) -> TargetDesc:
    """Read one target description (YAML) from ``text``; ``where`` names it in errors.

    Raises:
        ClusterError: naming ``where`` and the missing or malformed field.
    """
    types = {f.name: f.type for f in fields(TargetDesc)}
    casts = {"int": int, "float": float, "str": str}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClusterError(f"{where}: not a YAML target description: {err}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{where}: a target description is a mapping of TargetDesc fields")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ClusterError(f"{where}: unknown field {unknown[0]!r}; the fields are: {', '.join(types)}")
    values = {}
    for key, kind in types.items():
        if key not in data and key in OPTIONAL:
            values[key] = OPTIONAL[key]
            continue
        if key not in data:
            raise ClusterError(f"{where}: missing field {key!r}")
        try:
            values[key] = casts[kind](data[key])
        except (TypeError, ValueError):
            raise ClusterError(f"{where}: {key}: expected {kind}, found {data[key]!r}") from None
    if values["kind"] not in ("cpu", "gpu"):
        raise ClusterError(f"{where}: kind: expected 'cpu' or 'gpu', found {values['kind']!r}")
    return TargetDesc(**values)


def _load_descriptions() -> dict[str, TargetDesc]:
    """Read every ``descriptions/*.yaml`` shipped with partc."""
    out = {}
    for entry in sorted(files("partc.targets").joinpath("descriptions").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        desc = parse_description(entry.read_text(), str(entry))
        out[desc.name] = desc
    return out


TARGETS: dict[str, TargetDesc] = _load_descriptions()


def target(name: str) -> TargetDesc:
    """Return the target description called ``name``, or read it from the file ``name`` (``*.yaml``).

    Raises:
        ClusterError: if there is none, or the file is missing or malformed; the message
            lists the known targets or names the file and field.
    """
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ClusterError(f"{name}: target description file not found")
        return parse_description(path.read_text(), name)
    if name not in TARGETS:
        raise ClusterError(f"unknown target {name!r}; known targets are: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


class Backend(Protocol):
    """An artifact format: writes a stage to one file and loads that file back.

    Attributes:
        name: the key in ``BACKENDS`` and in cluster files ("onnx").
        suffix: the artifact's file suffix (".onnx"); the file is ``<stage><suffix>``.
        dynamic_shapes: whether an artifact accepts shapes other than the traced ones.
        cross_compiles: whether ``emit`` compiles for the target's triple (otherwise the
            file is portable and ``target`` is not used).
    """

    name: str
    suffix: str
    dynamic_shapes: bool
    cross_compiles: bool

    def emit(self, stage: Stage, target: TargetDesc, outdir: Path, options: BackendOptions) -> Artifact:
        """Write ``outdir/<stage.name><suffix>`` atomically and describe it.

        ``options`` carries the command line's settings; a backend reads the fields that
        concern it (``tvm`` its trials and tuning database).
        """
        ...

    def load(self, artifact: Artifact) -> StageFn:
        """Load what ``emit`` wrote; the result maps named arrays to named arrays."""
        ...


BACKENDS: dict[str, Backend] = {b.name: b for b in (torchscript.BACKEND, onnx.BACKEND, tvm.BACKEND, export.BACKEND)}


def backend(name: str) -> Backend:
    """Return the backend called ``name``.

    Raises:
        ClusterError: if there is none; the message lists the known backends.
    """
    if name not in BACKENDS:
        raise ClusterError(f"unknown backend {name!r}; known backends are: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def runs_here(artifact: Artifact) -> bool:
    """Return whether this machine can load ``artifact``.

    A portable artifact (TorchScript, ONNX, ExportedProgram) runs anywhere; a compiled one
    (TVM, AOTInductor) only on the architecture its ``info["arch"]`` names.
    """
    arch = artifact.info.get("arch")
    return arch is None or arch == host_arch()
