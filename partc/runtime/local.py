"""Run a build on this machine: every stage in this process, through its emitted artifact."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partc.errors import ManifestError
from partc.manifest import ManifestStage, manifest_stages, read_manifest
from partc.plan import StageFn, TensorSpec, run_plan


@dataclass(frozen=True, eq=False)
class Pipeline:
    """A loaded build: its stages, each with a loaded artifact, in the order they run.

    Call it with named input arrays to get the named outputs.
    """

    path: Path
    manifest: dict
    stages: tuple[ManifestStage, ...]
    fns: Mapping[str, StageFn]

    @property
    def model_inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in order."""
        return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in self.manifest["model"]["inputs"])

    @property
    def model_outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in order."""
        return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in self.manifest["model"]["outputs"])

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every stage in order on ``inputs`` (model input name -> array).

        Raises:
            ManifestError: if an input is missing or has the wrong shape or dtype.
        """
        for spec in self.model_inputs:
            if spec.name not in inputs:
                raise ManifestError(f"input {spec.name!r} missing; the model takes {_describe(self.model_inputs)}")
            value = inputs[spec.name]
            if tuple(value.shape) != spec.shape or value.dtype != np.dtype(spec.dtype):
                raise ManifestError(
                    f"input {spec.name!r}: got {_shape(value.shape)} {value.dtype}, but the build was compiled "
                    f"for {_shape(spec.shape)} {spec.dtype}; recompile with --input-shape "
                    f"{','.join(map(str, value.shape))}"
                )
        return run_plan(self, self.fns, inputs)


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _describe(specs) -> str:
    return ", ".join(f"{s.name} ({_shape(s.shape)} {s.dtype})" for s in specs)


def load(path: Path | str) -> Pipeline:
    """Verify every artifact of the build at ``path`` against the manifest, then load it.

    Raises:
        ManifestError: for a malformed manifest, or a missing or tampered artifact.
    """
    from partc.targets import backend

    path = Path(path)
    manifest = read_manifest(path)
    folder = path if path.is_dir() else path.parent
    stages = tuple(manifest_stages(manifest, folder))  # checksums first: nothing unverified is loaded
    fns = {s.name: backend(s.artifact.backend).load(s.artifact) for s in stages}
    return Pipeline(folder, manifest, stages, fns)
