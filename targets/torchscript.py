"""TorchScript backend: a stage as a ``.pt`` file that ``torch.jit.load`` alone runs.

The stage's GraphModule is compiled with ``torch.jit.script`` (not ``trace``): the fx code
is already plain, static Python, scripting needs no example inputs, and ``trace`` warns
that it is deprecated. The file embeds the weights and no Python class of the model.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from partc.context import BackendOptions
from partc.errors import UnsupportedLayerError
from partc.plan import Artifact, Stage, StageFn, make_artifact


class TorchScriptBackend:
    """Emit and load TorchScript stages.

    Attributes:
        threads: intra-op threads for ``load`` (``torch.set_num_threads``); 0 keeps
            PyTorch's default. Note that the setting is per process.
    """

    name = "torchscript"
    suffix = ".pt"
    dynamic_shapes = False  # fx may have baked traced sizes into the code
    cross_compiles = False  # the file is portable; the target only needs libtorch

    def __init__(self, threads: int = 0):
        self.threads = threads

    def emit(self, stage: Stage, target: object, outdir: Path, options: BackendOptions) -> Artifact:
        """Write ``outdir/<stage>.pt``.

        ``target`` and ``options`` are not used: the file is portable and nothing is tuned.

        Raises:
            UnsupportedLayerError: if TorchScript cannot compile the stage.
        """
        import torch

        try:
            scripted = torch.jit.script(stage.gm)
        except Exception as err:
            raise UnsupportedLayerError(
                f"stage {stage.name}: torch.jit.script failed: {str(err).strip().splitlines()[0]}; "
                "use backend 'onnx' or 'tvm' for this tier"
            ) from err
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        path = Path(outdir) / f"{stage.name}{self.suffix}"
        _write_atomic(path, buffer.getvalue())
        return make_artifact(stage, self.name, path)

    def load(self, artifact: Artifact) -> StageFn:
        """Load ``artifact.path`` with ``torch.jit.load``; the result maps named arrays to named arrays."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        module = torch.jit.load(str(artifact.path), map_location="cpu").eval()
        inputs, outputs = artifact.inputs, artifact.outputs

        def run(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            args = [torch.from_numpy(np.ascontiguousarray(tensors[t.name])) for t in inputs]
            with torch.no_grad():
                result = module(*args)
            return {t.name: r.numpy() for t, r in zip(outputs, result, strict=True)}

        return run


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


BACKEND = TorchScriptBackend()
