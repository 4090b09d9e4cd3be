import math

import models
import pytest
import torch

from partc.errors import ModelError, TraceError
from partc.ir import (
    KINDS,
    META_BYTES,
    META_DTYPE,
    META_FLOPS,
    META_KIND,
    META_MACS,
    META_OP,
    META_PARAM_BYTES,
    META_SHAPE,
)
from partc.report import inspect, trace_model
from partc.trace import InputSpec, load_model, parse_input_spec, trace

# Every torchvision model the issue names, with its input size.
TORCHVISION = {
    "alexnet": 224, "vgg16": 224, "resnet18": 224, "resnet50": 224, "googlenet": 224, "inception_v3": 299,
    "mobilenet_v2": 224, "mobilenet_v3_large": 224, "densenet121": 224, "squeezenet1_0": 224,
    "shufflenet_v2_x1_0": 224, "efficientnet_b0": 224, "regnet_y_400mf": 224, "convnext_tiny": 224,
    "mnasnet1_0": 224, "vit_b_16": 224,
}

# Published multiply-accumulate counts (torchvision's model docs, "GFLOPS" column, which counts MACs).
PUBLISHED_GMACS = {
    "alexnet": 0.71, "vgg16": 15.47, "resnet18": 1.81, "resnet50": 4.09, "googlenet": 1.50, "inception_v3": 5.71,
    "mobilenet_v2": 0.30, "mobilenet_v3_large": 0.22, "densenet121": 2.83, "squeezenet1_0": 0.82,
    "shufflenet_v2_x1_0": 0.14, "efficientnet_b0": 0.39, "regnet_y_400mf": 0.40, "convnext_tiny": 4.46,
    "mnasnet1_0": 0.31, "vit_b_16": 17.56,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_model_traces_annotated_and_exact(name):
    size = TORCHVISION[name]
    model = load_model(f"torchvision:{name}")
    spec = parse_input_spec(f"1,3,{size},{size}")
    gm = trace(model, [spec])
    for node in gm.graph.nodes:
        assert node.meta[META_KIND] in KINDS, node.name
        for key in (META_OP, META_BYTES, META_FLOPS, META_MACS, META_PARAM_BYTES):
            assert key in node.meta, (node.name, key)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert gm.meta["partc.tracer"] == "torch.fx"
    x = spec.example()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    report = inspect(gm)
    assert report.macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.05)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.param_bytes >= params  # parameters plus BN running statistics
    assert out.meta[META_KIND] == "output"


def test_node_annotations_of_a_conv_stack():
    gm = trace_model("tests/models.py:conv_stack", ["1,3,32,32"])
    nodes = {n.name: n for n in gm.graph.nodes}
    conv = nodes["_0"]  # nn.Conv2d(3, 8, 3, padding=1)
    assert conv.meta[META_OP] == "conv2d" and conv.meta[META_KIND] == "conv"
    assert conv.meta[META_SHAPE] == (1, 8, 32, 32) and conv.meta[META_DTYPE] == "float32"
    assert conv.meta[META_BYTES] == 8 * 32 * 32 * 4
    assert conv.meta[META_MACS] == 8 * 32 * 32 * 3 * 3 * 3
    assert conv.meta[META_FLOPS] == 2 * conv.meta[META_MACS]
    assert conv.meta[META_PARAM_BYTES] == (8 * 3 * 3 * 3 + 8) * 4
    grouped = nodes["_4"]  # nn.Conv2d(8, 16, 3, padding=1, groups=2) on 16x16
    assert grouped.meta[META_MACS] == 16 * 16 * 16 * (8 // 2) * 3 * 3
    pool = nodes["_3"]  # MaxPool2d(2): 4 inputs per output
    assert pool.meta[META_KIND] == "pool" and pool.meta[META_FLOPS] == 8 * 16 * 16 * 4
    bn = nodes["_1"]
    assert bn.meta[META_KIND] == "norm"
    assert bn.meta[META_PARAM_BYTES] == 4 * 8 * 4 + 8  # weight, bias, running mean and var; int64 counter
    flatten = nodes["_7"]
    assert flatten.meta[META_KIND] == "data" and flatten.meta[META_FLOPS] == 0


def test_two_inputs():
    gm = trace_model("tests/models.py:two_inputs", ["1,3,8,8", "1,5"])
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["image", "extra"]
    assert gm.meta["partc.inputs"] == (InputSpec((1, 3, 8, 8)), InputSpec((1, 5)))


def test_export_fallback_for_shape_control_flow():
    model = models.shape_branch()
    gm = trace_model(model, ["2,8"])
    assert gm.meta["partc.tracer"] == "torch.export"
    x = torch.randn(2, 8)
    assert torch.equal(gm(x), model(x))
    assert sum(n.meta[META_MACS] for n in gm.graph.nodes) == 2 * 8 * 8


def test_untraceable_model_names_both_tracers():
    with pytest.raises(TraceError, match=r"^ValueBranch cannot be traced: torch\.fx: .*; torch\.export: "):
        trace_model(models.value_branch(), ["1,4"])


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(TraceError) as err:
        trace_model("tests/models.py:conv_stack", ["1,4,32,32"])
    assert str(err.value).startswith("layer '_0' (conv2d) rejects its input: ")
    assert "\n" not in str(err.value)


def test_wrong_number_of_inputs():
    with pytest.raises(TraceError, match=r"takes 2 input\(s\) \(image, extra\) but 1 --input-shape given"):
        trace_model("tests/models.py:two_inputs", ["1,3,8,8"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:resnet5", "model 'torchvision:resnet5': unknown torchvision model; did you mean resnet50"),
        ("resnet50", "model 'resnet50': expected torchvision:NAME, package.module:factory, path/to/file.py:factory or "
                     "path/to/model.onnx"),
        ("tests/models.py:broken", "model 'tests/models.py:broken': factory raised RuntimeError: weights file missing"),
        ("tests/models.py:not_a_module",
         "model 'tests/models.py:not_a_module': factory returned int, not a torch.nn.Module"),
        ("tests/models.py:nope", "model 'tests/models.py:nope': 'partc_model_models' has no callable 'nope'"),
        ("tests/missing.py:f", "model 'tests/missing.py:f': file 'tests/missing.py' not found"),
        ("no_such_package.mod:f", "model 'no_such_package.mod:f': cannot import module 'no_such_package.mod'"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(ModelError) as err:
        load_model(spec)
    assert str(err.value).startswith(message)


def test_module_factory_spec():
    model = load_model("torch.nn:Identity")
    assert isinstance(model, torch.nn.Identity) and not model.training


def test_models_are_seeded():
    a, b = load_model("torchvision:resnet18"), load_model("torchvision:resnet18")
    assert torch.equal(a.conv1.weight, b.conv1.weight)


@pytest.mark.parametrize(
    ("text", "message"),
    [("1,3,x", "expected comma-separated integers"), ("1,0,4", "every dimension must be positive"),
     ("1,4:int8", "unknown dtype 'int8'")],
)
def test_bad_input_shapes(text, message):
    with pytest.raises(ModelError, match=message):
        parse_input_spec(text)


def test_input_spec_round_trip():
    spec = parse_input_spec("1,128:int64")
    assert spec == InputSpec((1, 128), "int64") and str(spec) == "1,128:int64"
    assert spec.example().dtype == torch.int64 and math.prod(spec.example().shape) == 128
