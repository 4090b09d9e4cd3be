"""Every command's ``--json``: it parses, carries ``schema_version`` first, and every time key says its unit."""

import json

import pytest

from partc.cli import main
from partc.output import SCHEMA_VERSION
from tests.clusters import two_tier

MODEL = ["tests/models.py:mlp", "--input-shape", "1,16"]
BARE_UNITS = {"latency", "bottleneck", "compute", "transfer", "memory", "bandwidth", "seconds", "low", "high"}


def _keys(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def run_json(capsys, command, *argv):
    code = main([command, *argv, "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc)[:2] == ["schema_version", "command"]
    assert doc["schema_version"] == SCHEMA_VERSION and doc["command"] == command
    names = {key for key in _keys(doc) if isinstance(key, str)} - {"assignment"}
    unitless = sorted(k for k in names if (k.endswith(("_s", "seconds")) and not k.endswith(("_per_s", "_mbit_s")))
                      or k in BARE_UNITS)
    assert unitless == [], f"{command}: keys without a unit suffix"
    return doc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(two_tier("bandwidth: 20Mbit/s, latency: 5ms"))
    return path


@pytest.fixture(scope="module")
def build(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "mlp"
    assert main(["compile", *MODEL, "--cluster", str(cluster), "-o", str(out), "-q"]) == 0
    return out


@pytest.mark.slow
def test_model_commands(capsys, cluster, build, tmp_path):
    assert run_json(capsys, "inspect", *MODEL)["totals"]["macs"] == 16 * 32 + 32 * 32 + 32 * 4
    profile = run_json(capsys, "profile", *MODEL, "-o", str(tmp_path / "p.json"), "--repeats", "2", "--warmup", "1")
    assert profile["layers"] == 5 and profile["whole_model_median_ms"] > 0
    plan = run_json(capsys, "plan", *MODEL, "--cluster", str(cluster), "--sweep", "device->cloud",
                    "--plot", str(tmp_path / "sweep.png"))
    assert plan["cost"]["latency_ms"] > 0 and sum(t["layers"] for t in plan["layers"]) == len(plan["assignment"])
    assert plan["sweep"]["plans"] and "low_mbit_s" in plan["sweep"]
    compiled = run_json(capsys, "compile", *MODEL, "--cluster", str(cluster), "-o", str(tmp_path / "b"))
    assert compiled["plans"][0]["predicted_latency_ms"] > 0 and compiled["max_abs_diff"] < 1e-4
    targets = run_json(capsys, "targets")
    assert {b["name"] for b in targets["backends"]} >= {"torchscript", "onnx"}
    assert "rpi4" in {t["name"] for t in targets["targets"]}


@pytest.mark.slow
def test_run_bundle_unpack(capsys, build, tmp_path):
    ran = run_json(capsys, "run", str(build), "--requests", "3")
    assert ran["requests"] == 3 and ran["outputs"][0]["shape"] == [1, 4] and ran["latency_median_ms"] > 0
    bundled = run_json(capsys, "bundle", str(build), "--tier", "device", "-o", str(tmp_path / "device.tar.gz"))
    assert "manifest.json" in bundled["members"]
    unpacked = run_json(capsys, "unpack", str(tmp_path / "device.tar.gz"), "-o", str(tmp_path / "device"))
    assert unpacked["folder"] == str(tmp_path / "device")


@pytest.mark.slow
def test_distributed_run_and_ping(capsys, build):
    from partc.runtime.deploy import LocalWorkers

    ran = run_json(capsys, "run", str(build), "--distributed", "--requests", "4")
    assert ran["requests"] == 4 and {s["stage"] for s in ran["stages"]} <= {"device.0", "cloud.0"}
    with LocalWorkers(build) as workers:
        connect = [f"--connect={stage}={address}" for stage, address in workers.addresses.items()]
        pinged = run_json(capsys, "ping", str(build), *connect)
    assert all(s["ok"] and s["elapsed_ms"] >= 0 for s in pinged["stages"])
