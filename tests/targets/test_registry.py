"""The registry in ``partc.targets``: backend lookup, and which artifacts run on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from partc.errors import ClusterError
from partc.plan import Artifact
from partc.targets import BACKENDS, backend, runs_here
from partc.targets.tvm import host_arch


def artifact(info: dict) -> Artifact:
    return Artifact("edge.0", "tvm", Path("edge.0.so"), "0" * 64, 0, (), (), info)


def test_every_backend_is_registered_under_its_name():
    assert sorted(BACKENDS) == ["export", "onnx", "torchscript", "tvm"]
    assert all(backend(name).name == name for name in BACKENDS)
    with pytest.raises(ClusterError) as info:
        backend("tensorrt")
    assert str(info.value) == "unknown backend 'tensorrt'; known backends are: export, onnx, torchscript, tvm"


def test_runs_here_only_for_portable_files_and_this_architecture():
    other = "riscv64" if host_arch() != "riscv64" else "aarch64"
    assert runs_here(artifact({}))
    assert runs_here(artifact({"opset": 18}))
    assert runs_here(artifact({"arch": host_arch(), "triple": f"{host_arch()}-linux-gnu"}))
    assert not runs_here(artifact({"arch": other, "triple": f"{other}-linux-gnu"}))
