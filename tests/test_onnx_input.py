"""An ONNX file as the MODEL: converted with onnx2torch, compiled, and checked against ONNX Runtime."""

import warnings

import numpy as np
import pytest
from clusters import two_tier

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")
pytest.importorskip("onnx_graphsurgeon")

import torch  # noqa: E402

from partc.build import compile_model  # noqa: E402
from partc.cli import main  # noqa: E402
from partc.runtime.local import load  # noqa: E402
from partc.trace import load_model, parse_input_spec, trace  # noqa: E402

SHAPE = "1,3,64,64"
# rpi4 (torchscript) -> cloud-cpu (onnx); the pins give each tier a share, so a cut crosses the link
CLUSTER = two_tier("bandwidth: 100Mbit/s, latency: 5ms") + """\
constraints:
  pin: {device: ["layer1*"], cloud: ["fc*"]}
"""


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    """torchvision resnet18 (weights=None, seeded) exported by PyTorch's ONNX exporter at 64x64."""
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    model = load_model("torchvision:resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter says it is deprecated
        torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), path, dynamo=False, input_names=["input"],
                          output_names=["logits"])
    return path


def test_converted_model_traces_into_the_ir(resnet18_onnx):
    gm = trace(load_model(str(resnet18_onnx)), [parse_input_spec(SHAPE)])
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert all(n.target == n.name and n.name.isidentifier() for n in modules)  # no ONNX paths like conv1/Conv
    ops = {n.name: (n.meta["partc.op"], n.meta["partc.kind"]) for n in gm.graph.nodes}
    assert ops["conv1_conv"] == ("conv2d", "conv") and ops["fc_gemm"] == ("linear", "matmul")
    assert ops["maxpool_max_pool"] == ("maxpool2d", "pool")
    assert sum(kind == "conv" for _, kind in ops.values()) == 20  # resnet18's convolutions, downsamples included


@pytest.mark.slow
def test_compiled_onnx_model_matches_onnx_runtime(resnet18_onnx, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    build = compile_model(str(resnet18_onnx), [SHAPE], cluster, tmp_path / "b", depfile=tmp_path / "b.d")
    assert str(resnet18_onnx) in (tmp_path / "b.d").read_text()  # make and ninja rebuild when the file changes
    manifest = build.manifest.to_json()
    assert [(s["name"], s["backend"]) for s in manifest["stages"]] == [("device.0", "torchscript"), ("cloud.0", "onnx")]
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    (name,) = [t["name"] for t in manifest["model"]["inputs"]]
    got = load(build.path)({name: x})["output"]
    session = ort.InferenceSession(str(resnet18_onnx), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_broken_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    assert main(["inspect", str(bad), "--input-shape", SHAPE]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"partc: error: model '{bad}': not a valid ONNX file: ") and err.count("\n") == 1


def test_unconvertible_node_is_named(resnet18_onnx, tmp_path, capsys):
    proto = onnx.load(resnet18_onnx)
    proto.graph.node[0].op_type = "NoSuchOp"  # the first Conv
    proto.graph.node[0].domain = "org.example"
    proto.opset_import.add(domain="org.example", version=1)
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    assert main(["inspect", str(path), "--input-shape", SHAPE]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1  # onnx-graphsurgeon's printed warnings are held back
    assert err.startswith(f"partc: error: model '{path}': node ") and "cannot be converted to PyTorch" in err


def test_wrong_shape_names_the_input_and_the_declared_shape(resnet18_onnx, capsys):
    assert main(["inspect", str(resnet18_onnx), "--input-shape", "1,3,112,112"]) == 2
    assert capsys.readouterr().err == (
        f"partc: error: model '{resnet18_onnx}': input 'input' is declared 1,3,64,64 in the file, but "
        "--input-shape gives 1,3,112,112; use --input-shape 1,3,64,64\n"
    )
