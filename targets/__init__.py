"""partc's targets: hardware descriptions, one small YAML file each under ``descriptions/``.

A *target* is a hardware description (what a tier runs on); a *backend* is an artifact
format. Each ``descriptions/NAME.yaml`` holds the fields of ``TargetDesc`` and a ``source``
text that says where its numbers come from (vendor data sheets, measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib.resources import files

import yaml

from partc.errors import ClusterError


@dataclass(frozen=True)
class TargetDesc:
    """A hardware description, as the cost model and the backends see it.

    Attributes:
        name: the key in ``TARGETS`` and in cluster files ("rpi4").
        summary: one line for humans.
        kind: "cpu" or "gpu".
        cores: CPU cores (or GPU CUDA cores) used for inference.
        clock_ghz: core clock; scales per-node dispatch overhead between CPUs.
        peak_gflops: peak FP32 GFLOP/s of all ``cores`` together.
        memory_bandwidth_gbs: peak DRAM bandwidth in GB/s (1e9 bytes/s).
        memory_bytes: memory available to inference.
        launch_overhead_us: fixed cost added to every node (GPU kernel launch); 0 on CPUs.
        triple: LLVM target triple for compiled backends ("aarch64-linux-gnu").
        mcpu: LLVM ``-mcpu`` ("cortex-a72"), or "" when there is none to give.
        mattr: LLVM ``-mattr`` ("+neon"), or "".
        source: where the numbers come from.
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


def _load_descriptions() -> dict[str, TargetDesc]:
    """Read every ``descriptions/*.yaml`` shipped with partc."""
    types = {f.name: f.type for f in fields(TargetDesc)}
    casts = {"int": int, "float": float, "str": str}
    out = {}
    for entry in sorted(files("partc.targets").joinpath("descriptions").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(entry.read_text())
        desc = TargetDesc(**{k: casts[types[k]](data[k]) for k in types})
        out[desc.name] = desc
    return out


TARGETS: dict[str, TargetDesc] = _load_descriptions()


def target(name: str) -> TargetDesc:
    """Return the target description called ``name``.

    Raises:
        ClusterError: if there is none; the message lists the known targets.
    """
    if name not in TARGETS:
        raise ClusterError(f"unknown target {name!r}; known targets are: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
