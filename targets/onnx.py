"""ONNX backend: a stage as one self-contained ``.onnx`` file (opset ``OPSET``), run by ONNX Runtime.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
It takes ~0.2-0.7 s per resnet50 third where the dynamo exporter takes ~2-3 s, gives the
same ORT numbers, names graph inputs and outputs exactly as asked, and its output is
byte-for-byte reproducible. It warns that it is deprecated; the warning is silenced here,
and moving to ``dynamo=True`` is a one-line change once the legacy exporter goes.
Weights live inside the file (no external data; stages are far below the 2 GB limit).
When every input and output of a stage leads with a dimension of 1 (a batch of one), that
dimension is exported as the symbolic ``batch``: ORT then runs a batch of several requests
concatenated on axis 0 (Ray Serve's dynamic batching, ``partc.runtime.rayserve``, which checks
that the numbers match one by one before it batches). Every other dimension stays fixed.
Every file passes ``onnx.checker.check_model(full_check=True)`` before it is kept.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from partc.context import BackendOptions
from partc.errors import UnsupportedLayerError
from partc.plan import Artifact, Stage, StageFn, make_artifact

OPSET = 18


class OnnxBackend:
    """Emit ONNX stages and run them with ONNX Runtime's CPU execution provider.

    Attributes:
        threads: ``intra_op_num_threads`` of the ORT session; 0 lets ORT choose.
    """

    name = "onnx"
    suffix = ".onnx"
    dynamic_shapes = False
    cross_compiles = False  # the file is portable; the target only needs onnxruntime
    opset = OPSET

    def __init__(self, threads: int = 0):
        self.threads = threads

    def emit(self, stage: Stage, target: object, outdir: Path, options: BackendOptions) -> Artifact:
        """Write ``outdir/<stage>.onnx``.

        ``target`` and ``options`` are not used: the file is portable and nothing is tuned.

        Graph inputs and outputs are named after ``stage.inputs`` / ``stage.outputs``.

        Raises:
            UnsupportedLayerError: if the exporter or the checker rejects the stage.
        """
        import onnx
        import torch

        path = Path(outdir) / f"{stage.name}{self.suffix}"
        args = tuple(torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in stage.inputs)
        tensors = (*stage.inputs, *stage.outputs)
        batch = {t.name: {0: "batch"} for t in tensors} if all(t.shape[:1] == (1,) for t in tensors) else None
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=self.suffix)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    stage.gm,
                    args,
                    tmp,
                    dynamo=False,
                    opset_version=self.opset,
                    input_names=[t.name for t in stage.inputs],
                    output_names=[t.name for t in stage.outputs],
                    dynamic_axes=batch,
                    do_constant_folding=True,
                )
            onnx.checker.check_model(tmp, full_check=True)
            os.replace(tmp, path)
        except Exception as err:
            Path(tmp).unlink(missing_ok=True)
            raise UnsupportedLayerError(
                f"stage {stage.name}: ONNX export (opset {self.opset}) failed: "
                f"{str(err).strip().splitlines()[0]}; use backend 'torchscript' for this tier"
            ) from err
        return make_artifact(stage, self.name, path, {"opset": self.opset})

    def load(self, artifact: Artifact) -> StageFn:
        """Open ``artifact.path`` in an ONNX Runtime CPU session."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
        names = [t.name for t in artifact.outputs]

        def run(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feed = {t.name: np.ascontiguousarray(tensors[t.name]) for t in artifact.inputs}
            return dict(zip(names, session.run(names, feed), strict=True))

        return run


BACKEND = OnnxBackend()
