"""TVM backend: DAG models split into three tiers, an aarch64 cross-compile, MetaSchedule reuse."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest

pytest.importorskip("tvm")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from partc.context import BackendOptions, CompileContext, Tier  # noqa: E402
from partc.errors import PartcError, RunError  # noqa: E402
from partc.ir import META_TIER, compute_nodes  # noqa: E402
from partc.plan import build_plan, run_plan  # noqa: E402
from partc.targets import BACKENDS, backend, runs_here, target  # noqa: E402
from partc.targets.tvm import BACKEND, elf_machine, host_arch  # noqa: E402
from partc.trace import InputSpec, trace  # noqa: E402


def test_backend_is_registered():
    assert backend("tvm") is BACKEND is BACKENDS["tvm"]
    assert (BACKEND.name, BACKEND.suffix, BACKEND.cross_compiles) == ("tvm", ".so", True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_three_tier_split_equals_the_model(
    name, model_case, emit_and_run, assert_close_to_scale, x86_target, tmp_path, caplog
):
    case = model_case(name)
    with caplog.at_level(logging.WARNING, logger="partc.targets.tvm"):
        artifacts, outputs = emit_and_run(BACKEND, case, x86_target, tmp_path)

    assert [a.path.name for a in artifacts] == ["device.0.so", "edge.0.so", "cloud.0.so"]
    for artifact in artifacts:
        assert elf_machine(artifact.path) == 62
        assert artifact.info["tuned"] is False and artifact.info["arch"] == "x86_64"
        assert runs_here(artifact)
    untuned = [r.getMessage() for r in caplog.records]
    assert untuned == [
        f"stage {s.name} is untuned: expect ~50x slower than ONNX Runtime (tune with trials > 0)"
        for s in case.plan.stages
    ]
    assert_close_to_scale(outputs["output"], case.expected)
    assert len(list(tmp_path.iterdir())) == 3


def test_aarch64_stage_is_cross_compiled_and_refused_on_this_host(model_case, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip(
            "aarch64 cross compiler not installed: apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
        )
    rpi4 = target("rpi4")
    assert (rpi4.triple, rpi4.mcpu) == ("aarch64-linux-gnu", "cortex-a72")
    stage = model_case("resnet18", 64).plan.stages[1]
    artifact = BACKEND.emit(stage, rpi4, tmp_path, BackendOptions())

    assert elf_machine(artifact.path) == 183  # EM_AARCH64
    assert artifact.info["arch"] == "aarch64" and artifact.info["triple"] == "aarch64-linux-gnu"
    assert artifact.path.read_bytes()[4] == 2  # ELFCLASS64
    assert runs_here(artifact) == (host_arch() == "aarch64")
    if host_arch() != "aarch64":
        with pytest.raises(RunError, match=r"edge\.0 was compiled for aarch64 and cannot run on this x86_64"):
            BACKEND.load(artifact)


def test_a_missing_cross_compiler_or_unknown_architecture_is_named(model_case, tmp_path):
    stage = model_case("resnet18", 64).plan.stages[0]
    riscv = dataclasses.replace(target("rpi4"), name="riscv-board", triple="riscv64-linux-gnu", mcpu="", mattr="")
    if shutil.which("riscv64-linux-gnu-gcc") is None:
        with pytest.raises(PartcError, match=r"cross compiler 'riscv64-linux-gnu-gcc' for target 'riscv-board'"):
            BACKEND.emit(stage, riscv, tmp_path, BackendOptions())
    mips = dataclasses.replace(riscv, name="mips-board", triple="mips-linux-gnu")
    with pytest.raises(PartcError, match=r"target 'mips-board': triple 'mips-linux-gnu': unknown architecture"):
        BACKEND.emit(stage, mips, tmp_path, BackendOptions())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tuning_records_are_kept_and_reused_across_builds(x86_target, tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    spec = InputSpec((1, 3, 16, 16))
    gm = trace(model, [spec])
    for node in compute_nodes(gm):
        node.meta[META_TIER] = "cloud"
    plan = build_plan(gm, CompileContext(tiers=(Tier("cloud", "edge-x86", "tvm"),)))
    database = tmp_path / "tuning"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()

    tuning = BackendOptions(tvm_trials=2, tuning_db=database)
    tuned = BACKEND.emit(plan.stages[0], x86_target, tmp_path / "first", tuning)
    assert tuned.info["tuned"] is True and tuned.info["tuned_tasks"] == tuned.info["tasks"] > 0
    assert any(database.iterdir())
    with caplog.at_level(logging.INFO, logger="partc.targets.tvm"):
        again = BACKEND.emit(plan.stages[0], x86_target, tmp_path / "second", BackendOptions(tuning_db=database))
    assert again.info["tuned"] is True
    assert not [r for r in caplog.records if "tuning" in r.getMessage() or "untuned" in r.getMessage()]

    x = spec.example()
    with torch.no_grad():
        expected = model(x).numpy()
    for artifact in (tuned, again):
        inputs = {plan.model_inputs[0].name: x.numpy()}
        out = run_plan(plan, {artifact.stage: BACKEND.load(artifact)}, inputs)["output"]
        assert abs(out - expected).max() <= 1e-4 * abs(expected).max()
