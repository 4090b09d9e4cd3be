"""torch.export backend: a stage as an ``ExportedProgram`` in a ``.pt2`` file.

The stage's GraphModule is exported with ``torch.export.export`` (non-strict: the fx code
is already plain) and saved with ``torch.export.save``; ``load`` runs
``torch.export.load(path).module()``. This is the artifact PyTorch recommends in place of
TorchScript. The file holds the weights and the ATen graph, no Python class of the model,
and it is byte-for-byte reproducible. It needs PyTorch to run, of the same or a newer
version than the one that wrote it.

With ``BackendOptions.aoti`` the program is compiled ahead of time by AOTInductor
(``torch._inductor.aoti_compile_and_package``) into a ``.pt2`` package of native code for
this machine, loaded with ``torch._inductor.aoti_load_package``. It needs a C++ compiler,
takes minutes per stage (about 2.5 min for a third of resnet18 on two cores), runs only
on this machine's architecture (``info["arch"]``) and is not byte-for-byte reproducible,
so it is opt-in.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from partc.context import BackendOptions
from partc.errors import UnsupportedLayerError
from partc.plan import Artifact, Stage, StageFn, make_artifact, module_stage_fn
from partc.targets.torchscript import _write_atomic
from partc.targets.tvm import host_arch, triple_arch


class ExportBackend:
    """Emit and load torch.export stages, optionally compiled by AOTInductor.

    Attributes:
        threads: intra-op threads for ``load`` (``torch.set_num_threads``); 0 keeps
            PyTorch's default. Note that the setting is per process.
    """

    name = "export"
    suffix = ".pt2"
    dynamic_shapes = False  # exported for the traced shapes only
    cross_compiles = False  # an ExportedProgram is portable; AOTInductor compiles for this machine only

    def __init__(self, threads: int = 0):
        self.threads = threads

    def emit(self, stage: Stage, target: object, outdir: Path, options: BackendOptions) -> Artifact:
        """Write ``outdir/<stage>.pt2``: an ExportedProgram, or with ``options.aoti`` an AOTInductor package.

        ``target`` is read only with ``options.aoti``, to refuse a target of another architecture.

        Raises:
            UnsupportedLayerError: if torch.export or AOTInductor cannot compile the stage, or
                AOTInductor is asked for a target of another architecture than this machine's.
        """
        import torch

        args = tuple(torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in stage.inputs)
        try:
            program = torch.export.export(stage.gm, args, strict=False)
        except Exception as err:
            raise UnsupportedLayerError(
                f"stage {stage.name}: torch.export failed: {str(err).strip().splitlines()[0]}; "
                "use backend 'torchscript' or 'onnx' for this tier"
            ) from err
        path = Path(outdir) / f"{stage.name}{self.suffix}"
        if not options.aoti:
            for node in program.graph.nodes:  # provenance holding Python object ids: differs from run to run
                node.meta.pop("from_node", None)
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            _write_atomic(path, buffer.getvalue())
            return make_artifact(stage, self.name, path, {"aoti": False})
        arch = triple_arch(target.triple)
        if arch != host_arch():
            raise UnsupportedLayerError(
                f"stage {stage.name}: AOTInductor compiles for this machine ({host_arch()}), but target "
                f"{target.name!r} is {arch}; compile on a {arch} machine or without AOTInductor"
            )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=self.suffix)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
        except Exception as err:
            raise UnsupportedLayerError(
                f"stage {stage.name}: AOTInductor failed: {str(err).strip().splitlines()[0]}; "
                "it needs a C++ compiler (g++ or clang++), or compile without AOTInductor"
            ) from err
        finally:
            Path(tmp).unlink(missing_ok=True)
        return make_artifact(stage, self.name, path, {"aoti": True, "arch": host_arch()})

    def load(self, artifact: Artifact) -> StageFn:
        """Load ``artifact.path``: ``torch.export.load(...).module()``, or the AOTInductor package."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if artifact.info.get("aoti"):
            module = torch._inductor.aoti_load_package(str(artifact.path))
        else:
            module = torch.export.load(artifact.path).module()
        return module_stage_fn(module, artifact.inputs, artifact.outputs)


BACKEND = ExportBackend()
