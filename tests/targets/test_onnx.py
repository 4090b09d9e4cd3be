"""ONNX backend: real DAG models split into three tiers, checked by onnx and run by ORT."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from partc.context import BackendOptions  # noqa: E402
from partc.targets import BACKENDS, backend  # noqa: E402
from partc.targets.onnx import BACKEND, OPSET, OnnxBackend  # noqa: E402

MODELS = ["resnet50", "googlenet", "inception_v3", "mobilenet_v2", "densenet121"]


def test_backend_is_registered():
    assert backend("onnx") is BACKEND is BACKENDS["onnx"]
    assert (BACKEND.name, BACKEND.suffix, OPSET) == ("onnx", ".onnx", 18)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_three_tier_split_equals_the_model(name, model_case, emit_and_run, assert_close_to_scale, tmp_path):
    case = model_case(name)
    artifacts, outputs = emit_and_run(OnnxBackend(threads=2), case, None, tmp_path)

    assert [a.path.name for a in artifacts] == ["device.0.onnx", "edge.0.onnx", "cloud.0.onnx"]
    for artifact, stage in zip(artifacts, case.plan.stages, strict=True):
        proto = onnx.load(artifact.path)
        onnx.checker.check_model(proto)
        assert [i.name for i in proto.graph.input] == [t.name for t in stage.inputs]
        assert [o.name for o in proto.graph.output] == [t.name for t in stage.outputs]
        assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
        assert artifact.info == {"opset": 18}
    assert_close_to_scale(outputs["output"], case.expected)
    assert len(list(tmp_path.iterdir())) == 3  # one self-contained file per stage, no .data
    if name == "densenet121":  # the transition's output skips the edge stage: routed device -> cloud
        transfers = {(t.tensor.name, t.src, t.dst) for t in case.plan.transfers}
        assert ("features_transition2_pool", "device.0", "cloud.0") in transfers
        assert "features_transition2_pool" not in [t.name for t in case.plan.stage("edge.0").outputs]


def test_compiling_twice_gives_identical_bytes(model_case, tmp_path):
    stage = model_case("googlenet").plan.stages[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = BACKEND.emit(stage, None, tmp_path / "a", BackendOptions())
    second = OnnxBackend().emit(stage, None, tmp_path / "b", BackendOptions())
    assert first.sha256 == second.sha256
