"""TorchScript backend: a stage as a ``.pt`` file that ``torch.jit.load`` alone runs.

The stage's GraphModule is compiled with ``torch.jit.script`` (not ``trace``): the fx code
is already plain, static Python, scripting needs no example inputs, and ``trace`` warns
that it is deprecated. The file embeds the weights and no Python class of the model.
``emit`` makes ``torch.jit.save``'s archive reproducible: the same stage gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

from partc.context import BackendOptions
from partc.errors import UnsupportedLayerError
from partc.plan import Artifact, Stage, StageFn, make_artifact, module_stage_fn


@contextlib.contextmanager
def _without_jit_warnings() -> Iterator[None]:
    """Keep PyTorch's deprecation of ``torch.jit`` (and its scripting notes) off the user's screen:
    partc uses TorchScript while PyTorch ships it, which the backend's users chose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support instance-level", UserWarning)
        yield


ALIGNMENT = 64  # bytes; PyTorch aligns stored tensor data so that it can be mapped


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
            with _without_jit_warnings():
                scripted = torch.jit.script(stage.gm)
        except Exception as err:
            raise UnsupportedLayerError(
                f"stage {stage.name}: torch.jit.script failed: {str(err).strip().splitlines()[0]}; "
                "use backend 'onnx' or 'tvm' for this tier"
            ) from err
        buffer = io.BytesIO()
        with _without_jit_warnings():
            torch.jit.save(scripted, buffer)
        path = Path(outdir) / f"{stage.name}{self.suffix}"
        _write_atomic(path, _deterministic(buffer.getvalue()))
        return make_artifact(stage, self.name, path)

    def load(self, artifact: Artifact) -> StageFn:
        """Load ``artifact.path`` with ``torch.jit.load``; the result maps named arrays to named arrays."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with _without_jit_warnings():
            module = torch.jit.load(str(artifact.path), map_location="cpu").eval()
        return module_stage_fn(module, artifact.inputs, artifact.outputs)


def _deterministic(archive: bytes) -> bytes:
    """``archive`` as the same stage always gives it, for reproducible builds.

    ``torch.jit.save`` writes a random ``.data/serialization_id``, and lists a module's
    ``Final`` constants in set order, which changes with Python's hash seed. The archive is
    rewritten member by member, in order, with the constants sorted (TorchScript reads them by
    name; the block keeps its length, so debug source ranges still point right), the id
    derived from the other members, and stored members' data aligned to 64 bytes as PyTorch
    aligns them.
    """
    with zipfile.ZipFile(io.BytesIO(archive)) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    members = [(i, _sorted_constants(c) if "/code/" in i.filename and i.filename.endswith(".py") else c)
               for i, c in members]
    digest = hashlib.sha256()
    for info, content in members:
        if not info.filename.endswith("/.data/serialization_id"):
            digest.update(info.filename.encode() + b"\0" + content)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info, content in members:
            if info.filename.endswith("/.data/serialization_id"):
                content = str(int.from_bytes(digest.digest())).encode()[: len(content)].rjust(len(content), b"0")
            member = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = info.compress_type
            if info.compress_type == zipfile.ZIP_STORED:
                pad = -(out.tell() + 30 + len(info.filename.encode()) + 4) % ALIGNMENT
                member.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # PyTorch's "FB" padding field
            dst.writestr(member, content)
    return out.getvalue()


def _sorted_constants(code: bytes) -> bytes:
    """``code`` with each run of class-level ``name : Final[...] = value`` lines sorted."""
    out, run = [], []
    for line in code.split(b"\n"):
        if line.startswith(b"  ") and not line.startswith(b"   ") and b" : Final[" in line:
            run.append(line)
            continue
        out += sorted(run) + [line]
        run = []
    return b"\n".join(out + sorted(run))


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
