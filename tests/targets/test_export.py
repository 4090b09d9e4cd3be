"""torch.export backend: real DAG models split into three tiers, run from the .pt2 files."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from clusters import three_tier

from partc.build import compile_model
from partc.context import BackendOptions
from partc.errors import ManifestError, UnsupportedLayerError
from partc.runtime.local import load
from partc.targets import BACKENDS, backend, runs_here, target
from partc.targets.export import BACKEND, ExportBackend
from partc.targets.tvm import host_arch

# a three-tier chain whose edge tier saves ExportedPrograms; the pins give every tier a share
CLUSTER = three_tier(pin='{device: ["_0", "_1"], cloud: ["_8"]}').replace(
    "target: jetson-nano, backend: onnx", "target: edge-x86, backend: export")


def test_backend_is_registered():
    assert backend("export") is BACKEND is BACKENDS["export"]
    assert (BACKEND.name, BACKEND.suffix, BACKEND.cross_compiles) == ("export", ".pt2", False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_three_tier_split_equals_the_model(name, model_case, emit_and_run, assert_close_to_scale, tmp_path):
    case = model_case(name, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        artifacts, outputs = emit_and_run(BACKEND, case, None, tmp_path)

    assert [str(w.message) for w in caught] == []  # nothing for the user to see
    assert [a.path.name for a in artifacts] == ["device.0.pt2", "edge.0.pt2", "cloud.0.pt2"]
    for artifact, stage in zip(artifacts, case.plan.stages, strict=True):
        data = artifact.path.read_bytes()
        assert (artifact.stage, artifact.backend, artifact.info) == (stage.name, "export", {"aoti": False})
        assert (artifact.bytes, artifact.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert (artifact.inputs, artifact.outputs) == (stage.inputs, stage.outputs)
        assert runs_here(artifact)
    assert_close_to_scale(outputs["output"], case.expected)
    assert len(list(tmp_path.iterdir())) == 3  # no temporary files left behind


def test_compiling_twice_gives_identical_bytes(model_case, tmp_path):
    stage = model_case("resnet18", 64).plan.stages[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = BACKEND.emit(stage, None, tmp_path / "a", BackendOptions())
    second = ExportBackend().emit(stage, None, tmp_path / "b", BackendOptions())
    assert first.sha256 == second.sha256


@pytest.mark.slow
def test_the_file_loads_in_a_fresh_process_with_torch_alone(model_case, tmp_path):
    stage = model_case("googlenet", 64).plan.stages[0]  # one input, four outputs
    artifact = BACKEND.emit(stage, None, tmp_path, BackendOptions())
    x = np.random.default_rng(0).standard_normal(stage.inputs[0].shape, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, torch\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "with torch.no_grad():\n"
        "    out = m(torch.from_numpy(np.load(sys.argv[2])))\n"
        "np.savez(sys.argv[3], *[t.numpy() for t in out])\n"
        "print(sys.modules.get('partc'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(artifact.path), str(tmp_path / "x.npy"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "None"  # partc was never imported
    here = BACKEND.load(artifact)({stage.inputs[0].name: x})
    there = np.load(tmp_path / "out.npz")
    assert len(there.files) == len(stage.outputs) == 4
    for i, spec in enumerate(stage.outputs):
        np.testing.assert_array_equal(there[f"arr_{i}"], here[spec.name])


@pytest.mark.slow
def test_a_cluster_tier_selects_it_and_a_tampered_artifact_is_refused(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    build = compile_model("tests/models.py:conv_stack", ["1,3,32,32"], cluster, tmp_path / "b")
    assert [(s["name"], s["backend"]) for s in build.manifest.to_json()["stages"]] == [
        ("device.0", "torchscript"), ("edge.0", "export"), ("cloud.0", "onnx")]
    verification = build.manifest.to_json()["verification"]
    assert verification["max_abs_diff"] <= 1e-4 * verification["output_scale"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    assert load(build.path)({"input_1": x})["output"].shape == (1, 10)
    copy = tmp_path / "copy"
    shutil.copytree(build.path, copy)
    for artifact in copy.glob("edge.0*.pt2"):  # every program of the edge stage (plans share stages)
        with open(artifact, "ab") as f:
            f.write(b"\0")
    with pytest.raises(ManifestError, match=r"'edge\.0-p\d+\.pt2' does not match its sha256"):
        load(copy)


def test_aoti_refuses_a_target_of_another_architecture(model_case, tmp_path):
    if host_arch() == "aarch64":
        pytest.skip("this machine is aarch64 like rpi4")
    stage = model_case("googlenet", 64).plan.stages[2]
    with pytest.raises(UnsupportedLayerError, match=r"AOTInductor compiles for this machine \(x86_64\), but target "
                                                    r"'rpi4' is aarch64"):
        BACKEND.emit(stage, target("rpi4"), tmp_path, BackendOptions(aoti=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_aoti_package_is_exact_and_runs_only_here(x86_target, tmp_path, split_in_thirds, assert_close_to_scale):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    import torch

    from partc.plan import run_plan
    from partc.trace import load_model, parse_input_spec, trace

    model = load_model("tests/models.py:conv_stack")
    spec = parse_input_spec("1,3,32,32")
    plan = split_in_thirds(trace(model, [spec]))
    artifacts = [BACKEND.emit(stage, x86_target, tmp_path, BackendOptions(aoti=True)) for stage in plan.stages]
    assert all(a.info == {"aoti": True, "arch": host_arch()} and runs_here(a) for a in artifacts)
    x = spec.example()
    outputs = run_plan(plan, {a.stage: BACKEND.load(a) for a in artifacts}, {"input_1": x.numpy()})
    with torch.no_grad():
        assert_close_to_scale(outputs["output"], model(x).numpy())
