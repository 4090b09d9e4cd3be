"""TorchScript backend: real DAG models split into three tiers, run from the .pt files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from partc.context import BackendOptions
from partc.targets import BACKENDS, backend
from partc.targets.torchscript import BACKEND, TorchScriptBackend

MODELS = ["resnet50", "googlenet", "inception_v3", "mobilenet_v2", "densenet121"]


def test_backend_is_registered():
    assert backend("torchscript") is BACKEND is BACKENDS["torchscript"]
    assert (BACKEND.name, BACKEND.suffix) == ("torchscript", ".pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_three_tier_split_equals_the_model(name, model_case, emit_and_run, assert_close_to_scale, tmp_path):
    case = model_case(name)
    artifacts, outputs = emit_and_run(BACKEND, case, None, tmp_path)

    assert [a.path.name for a in artifacts] == ["device.0.pt", "edge.0.pt", "cloud.0.pt"]
    for artifact, stage in zip(artifacts, case.plan.stages, strict=True):
        data = artifact.path.read_bytes()
        assert (artifact.stage, artifact.backend) == (stage.name, "torchscript")
        assert (artifact.bytes, artifact.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert (artifact.inputs, artifact.outputs) == (stage.inputs, stage.outputs)
    assert_close_to_scale(outputs["output"], case.expected)
    assert len(list(tmp_path.iterdir())) == 3  # no temporary files left behind


def test_compiling_twice_gives_identical_bytes(model_case, tmp_path):
    stage = model_case("mobilenet_v2").plan.stages[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = BACKEND.emit(stage, None, tmp_path / "a", BackendOptions())
    second = TorchScriptBackend().emit(stage, None, tmp_path / "b", BackendOptions())
    assert first.sha256 == second.sha256


def test_two_processes_with_other_hash_seeds_write_identical_bytes():
    """torch.jit.save's random serialization id and set-ordered constants do not reach the file."""
    script = (
        "import hashlib, io, torch\n"
        "from partc.targets.torchscript import _deterministic\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()\n"
        "buffer = io.BytesIO()\n"
        "torch.jit.save(torch.jit.script(m), buffer)\n"
        "data = _deterministic(buffer.getvalue())\n"
        "x = torch.randn(1, 3, 8, 8)\n"
        "assert torch.equal(torch.jit.load(io.BytesIO(data))(x), m(x))\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                                text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr[-3000:]
        digests.add(result.stdout.split()[-1])
    assert len(digests) == 1


def test_the_file_loads_with_torch_jit_load_alone(model_case, tmp_path):
    case = model_case("googlenet")
    stage = case.plan.stages[0]  # one input, four outputs
    artifact = BACKEND.emit(stage, None, tmp_path, BackendOptions())
    script = (
        "import sys, torch\n"
        "m = torch.jit.load(sys.argv[1])\n"
        f"out = m(torch.zeros({stage.inputs[0].shape}))\n"
        "print(len(out), *[tuple(t.shape) for t in out], sys.modules.get('partc'), sep=';')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(artifact.path)], capture_output=True, text=True, check=True
    )
    fields = result.stdout.strip().split(";")
    assert fields[0] == "4"
    assert fields[1:5] == [str(t.shape) for t in stage.outputs]
    assert fields[5] == "None"  # partc was never imported
