import json
import os

import pytest
import torch

from partc.cli import main
from partc.errors import PartcError
from partc.ir import compute_nodes
from partc.profile import SCHEMA_VERSION, check_matches, profile_model, read_profile, write_profile
from partc.report import trace_model


@pytest.fixture(scope="module")
def residual_profile():
    gm = trace_model("tests/models.py:residual", ["1,8,16,16"])
    torch.set_num_threads(2)
    return gm, profile_model(gm, model="tests/models.py:residual", warmup=1, repeats=5, threads=1)


def test_profile_covers_every_compute_node(residual_profile):
    gm, profile = residual_profile
    assert [n.name for n in profile.nodes] == [n.name for n in compute_nodes(gm)]
    assert profile.threads == 1 and profile.repeats == 5 and profile.warmup == 1
    for n in profile.nodes:
        assert 0 < n.p10_s <= n.median_s <= n.p90_s
    conv = next(n for n in profile.nodes if n.op == "conv2d")
    assert conv.shape == (1, 8, 16, 16) and conv.flops > 0 and conv.param_bytes > 0
    assert conv.input_bytes == 8 * 16 * 16 * 4
    assert profile.whole_median_s > 0
    assert profile.sum_node_median_s == pytest.approx(sum(n.median_s for n in profile.nodes))
    assert torch.get_num_threads() == 2  # restored after the measurement (the fixture sets 2 before it)


def test_file_round_trip_and_schema(residual_profile, tmp_path):
    gm, profile = residual_profile
    path = tmp_path / "host.profile.json"
    write_profile(profile, path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {
        "schema_version",
        "model",
        "inputs",
        "tracer",
        "created",
        "host",
        "settings",
        "whole_model",
        "sum_node_median_s",
        "load_average",
        "warnings",
        "nodes",
    }
    assert set(data["host"]) == {"cpu", "machine", "system", "cores", "python", "torch"}
    assert data["host"]["torch"] == torch.__version__
    assert data["settings"] == {"threads": 1, "warmup": 1, "repeats": 5}
    assert data["inputs"] == ["1,8,16,16"]
    assert set(data["nodes"][0]) == {
        "name",
        "op",
        "kind",
        "cost_class",
        "shape",
        "flops",
        "bytes",
        "input_bytes",
        "param_bytes",
        "median_s",
        "p10_s",
        "p90_s",
    }
    assert read_profile(path) == profile
    assert not list(tmp_path.glob(".*.tmp"))
    check_matches(read_profile(path), gm, path)


def test_bad_profile_files(residual_profile, tmp_path):
    _, profile = residual_profile
    path = tmp_path / "p.json"
    with pytest.raises(PartcError, match="p.json: profile file not found; write one with 'partc profile"):
        read_profile(path)
    data = profile.to_json()
    path.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(PartcError) as info:
        read_profile(path)
    assert str(info.value) == f"{path}: schema_version: expected 1, found 2"
    del data["nodes"][0]["median_s"]
    path.write_text(json.dumps(data))
    with pytest.raises(PartcError) as info:
        read_profile(path)
    assert str(info.value) == f"{path}: missing field 'median_s' (profile schema_version 1)"


def test_profile_of_another_model_is_rejected(residual_profile, tmp_path):
    _, profile = residual_profile
    other = trace_model("tests/models.py:residual", ["1,8,32,32"])
    with pytest.raises(PartcError) as info:
        check_matches(profile, other, tmp_path / "p.json")
    assert str(info.value) == (
        f"{tmp_path / 'p.json'}: node 'conv1': the profile measured it as conv2d [1, 8, 16, 16], "
        "not conv2d [1, 8, 32, 32]; it was measured on tests/models.py:residual with inputs 1,8,16,16; "
        "profile this model and input shape with 'partc profile'"
    )


def test_bad_settings():
    gm = trace_model("tests/models.py:mlp", ["1,16"])
    with pytest.raises(PartcError, match="need --warmup >= 1 and --repeats >= 1, got 0 and 0"):
        profile_model(gm, warmup=0, repeats=0)
    with pytest.raises(PartcError, match="--threads must be at least 1, got 0"):
        profile_model(gm, threads=0)


def test_cli_profile(capsys, caplog, tmp_path):
    out_file = tmp_path / "mlp.profile.json"
    code = main(
        [
            "profile",
            "tests/models.py:mlp",
            "--input-shape",
            "1,16",
            "-o",
            str(out_file),
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    progress = err.splitlines()
    assert progress[0] == "partc: tracing tests/models.py:mlp"
    assert "partc: timing every layer and the whole model" in progress
    assert any(line.startswith("partc: profiling runs: 8 in ") or line.endswith("8/8") for line in progress), err
    logged = [r.getMessage() for r in caplog.records if r.name == "partc.profile"]
    assert logged == list(read_profile(out_file).warnings)  # a busy host's warnings reach the log the CLI prints
    lines = out.splitlines()
    assert lines[0] == f"wrote {out_file}: 5 layers, 1 threads, 3 runs after 1 warm-up"
    assert lines[1].startswith("whole model (median)") and lines[2].startswith("sum of layer medians")
    assert len(lines) == 3 + 5
    assert read_profile(out_file).model == "tests/models.py:mlp"


def test_cli_profile_bad_input(capsys, tmp_path):
    code = main(
        ["profile", "tests/models.py:mlp", "--input-shape", "1,16", "-o", str(tmp_path / "p.json"), "--repeats", "0"]
    )
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines()[-1] == "partc: error: profile: need --warmup >= 1 and --repeats >= 1, got 3 and 0"
    assert "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.timing  # wall-clock medians: run alone (the README's second pytest run), not beside other tests
@pytest.mark.parametrize("name", ["resnet50", "googlenet", "mobilenet_v2"])
def test_sum_of_node_medians_matches_whole_model(name):
    gm = trace_model(f"torchvision:{name}", ["1,3,224,224"])
    profile = profile_model(gm, model=name, warmup=5, repeats=10, threads=2)
    ratio = profile.sum_node_median_s / profile.whole_median_s
    assert 0.85 <= ratio <= 1.15, (
        f"{name}: sum of layer medians {profile.sum_node_median_s * 1e3:.1f} ms vs whole model "
        f"{profile.whole_median_s * 1e3:.1f} ms (load {os.getloadavg()[0]:.1f})"
    )
