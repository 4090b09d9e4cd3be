"""The Python API: the README's snippet, partc.load of a build, the inputs a loaded build takes, lazy
submodules, no torch.jit warnings, and constraints by module path."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import partc
from partc.errors import ClusterError, ManifestError, PartcError
from tests.clusters import three_tier, two_tier

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    (folder / "cluster.yaml").write_text(two_tier("bandwidth: 20Mbit/s, latency: 5ms"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build = partc.compile("tests/models.py:mlp", ["1,16"], folder / "cluster.yaml", folder / "b")
        pipeline = partc.load(build)  # a Build, not only a path
    jit = [str(w.message) for w in caught if "torch.jit" in str(w.message) or "TorchScript" in str(w.message)]
    assert jit == []
    return build, pipeline


def test_load_takes_a_build_or_a_path_and_tensors_or_arrays(build):
    build, pipeline = build
    assert [t.name for t in pipeline.model_inputs] == ["input_1"]  # nn.Sequential's forward(input)
    x = torch.randn(1, 16)
    with torch.no_grad():
        want = partc.load_model("tests/models.py:mlp")(x).numpy()
    loaded = partc.load(build.path)
    for got in (pipeline(x), pipeline(x.numpy()), pipeline({"input_1": x}), pipeline(input_1=x), loaded(x)):
        np.testing.assert_allclose(got["output"], want, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "named", "message"),
    [
        ((torch.randn(1, 16, dtype=torch.float64),), {}, "input 'input_1': got float64, the build takes float32; "
         "convert it (array.astype(numpy.float32) or tensor.to(torch.float32))"),
        ((torch.randn(1, 16), torch.randn(1, 16)), {}, "2 input(s) given; the model takes 1: input_1 (1x16 float32)"),
        (([0.0] * 16,), {}, "input 'input_1': got a list; give a numpy array or a torch tensor"),
        ((), {"y": torch.randn(1, 16)}, "input 'y': the model has no such input; it takes input_1 (1x16 float32)"),
        ((torch.randn(1, 16),), {"input_1": torch.randn(1, 16)}, "give the inputs in order or by name, not both"),
        ((torch.randn(2, 16),), {}, "input 'input_1': got 2x16 float32, but the build was compiled for 1x16 float32"),
    ],
)
def test_a_loaded_build_says_what_is_wrong_with_its_inputs(build, args, named, message):
    with pytest.raises(ManifestError, match=re.escape(message)):
        build[1](*args, **named)


def test_import_partc_reaches_every_submodule_without_importing_torch():
    code = ("import sys, partc; assert 'torch' not in sys.modules; "
            "print(partc.planning.__name__, partc.runtime.__name__, partc.targets.__name__, partc.errors.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["partc.planning", "partc.runtime", "partc.targets", "partc.errors"]


def test_the_api_functions_stay_functions_when_their_modules_are_imported():
    import partc.plan  # noqa: F401  (the import system sets the package's attribute: partc keeps its function)
    import partc.profile  # noqa: F401

    assert callable(partc.plan) and partc.plan.__name__ == "plan_model"
    assert callable(partc.profile) and partc.profile.__name__ == "profile_model"
    with pytest.raises(AttributeError, match="module 'partc' has no attribute 'nope'"):
        partc.nope  # noqa: B018


@pytest.mark.slow
def test_readme_python_snippet_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predicted latency" in result.stdout
    assert "Warning" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("pins", ["{device: [conv1]}", "{device: ['conv1'], cloud: ['inception3a.*']}"])
def test_pin_by_module_path_on_googlenet(tmp_path, pins):
    (tmp_path / "cluster.yaml").write_text(three_tier(pins))
    report = partc.plan("torchvision:googlenet", ["1,3,64,64"], tmp_path / "cluster.yaml", compare=False)
    assert report.assignment["conv1_conv"] == "device" and report.assignment["conv1_bn"] == "device"
    if "inception3a" in pins:
        inception = [t for name, t in report.assignment.items() if name.startswith("inception3a_")]
        assert inception and set(inception) == {"cloud"}


def test_a_pin_matching_nothing_lists_near_matches(tmp_path):
    (tmp_path / "cluster.yaml").write_text(three_tier("{device: [conv_1]}"))
    with pytest.raises(PartcError) as err:
        partc.plan("tests/models.py:residual", ["1,8,16,16"], tmp_path / "cluster.yaml", compare=False)
    assert isinstance(err.value.__cause__, ClusterError) or isinstance(err.value, ClusterError)
    assert "'conv_1' matches no node; did you mean conv1" in str(err.value)
