"""Hostile and broken input to the command line and its parsers: one line naming the culprit, exit 2, never a
traceback (issue 17, items 4 and 5; the cluster parser fuzzed)."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from clusters import three_tier, two_tier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partc.build import compile_model
from partc.cli import main
from partc.cluster import cluster_from_dict, load_cluster
from partc.errors import ManifestError, PartcError
from partc.manifest import MANIFEST, read_manifest
from partc.runtime.local import load

MLP = "tests/models.py:mlp"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, start: str) -> bool:
    return err.startswith(f"partc: error: {start}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "cluster.yaml").write_text(two_tier("bandwidth: 20Mbit/s, latency: 5ms"))
    return compile_model(MLP, ["1,16"], folder / "cluster.yaml", folder / "b").path


# --- cluster files --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    (bytes(range(256)) * 4, "not a text file (byte 128 is not UTF-8)"),
    (b"[" * 5000, "nested too deeply to be a cluster file"),
    (three_tier(uplink="1e999Mbit/s, latency: 5ms").encode(), "links[0].bandwidth: '1e999Mbit/s' is out of range"),
    (three_tier(uplink="20Mbit/s, latency: 1e-300s").encode(), "links[0].latency: '1e-300s' is out of range"),
    (three_tier().replace("backend: onnx}", "backend: onnx, nodes: 1000000}", 1).encode(),
     "tiers[1].nodes: 1000000 nodes; a tier has at most 16"),
])
def test_a_broken_cluster_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "c.yaml").write_bytes(content)
    code, out, err = run(capsys, "plan", MLP, "--input-shape", "1,16", "--cluster", tmp_path / "c.yaml")
    assert code == 2 and out == ""
    assert one_line(err, f"{tmp_path / 'c.yaml'}: {message}"), err


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.floats(), st.text(max_size=12),
                     st.sampled_from(["device", "edge", "cloud", "rpi4", "onnx", "torchscript", "5ms", "1e999Mbit/s",
                                      "20Mbit/s", "0s", "2MB", "nan MB", "none+zstd-1", "int8", "latency",
                                      "device->edge", "*", "conv1"]))
_KEYS = st.sampled_from(["tiers", "links", "objective", "constraints", "compression", "name", "target", "backend",
                         "nodes", "from", "to", "bandwidth", "latency", "codecs", "pin", "forbid", "max_link_bytes",
                         "max_memory", "budget", "calibration", "device", "edge", "device->edge", "x"])
_TREES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=30)


def _replace_somewhere(data, steps, value):
    """``data`` with the value that ``steps`` lead to (each picks a child, modulo their count) set to ``value``."""
    node = data
    for i, step in enumerate(steps):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[step % len(keys)]
        if i == len(steps) - 1 or not isinstance(node[key], (dict, list)):
            node[key] = value
            break
        node = node[key]
    return data


def _mutations():
    """A valid cluster file with one value somewhere replaced by a random tree."""
    base = json.dumps(yaml.safe_load(three_tier(pin="{device: [conv1], edge: ['layer*']}")))
    return st.builds(lambda steps, value: _replace_somewhere(json.loads(base), steps, value),
                     st.lists(st.integers(0, 7), min_size=1, max_size=4), _TREES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_TREES, _mutations()))
def test_the_cluster_parser_raises_only_its_own_errors(data):
    try:
        cluster_from_dict(data, source="fuzz.yaml")
    except PartcError as err:
        assert str(err).startswith("fuzz.yaml: ")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_a_cluster_file_of_any_bytes_is_refused_cleanly(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    try:
        load_cluster(path)
    except PartcError as err:
        assert str(err).startswith(f"{path}: ")


# --- models, shapes, flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "message"), [
    ("1,3,100000,100000", "--input-shape 1,3,100000,100000: an example input of 112 GiB does not fit in this host"),
    ("1,99999999999999999999", "--input-shape '1,99999999999999999999': 99999999999999999999 elements are more"),
    ("1,9999999999,9999999999", "--input-shape '1,9999999999,9999999999': 99999999980000000001 elements"),
])
def test_an_input_shape_too_large_is_one_line(capsys, shape, message):
    code, out, err = run(capsys, "inspect", MLP, "--input-shape", shape)
    assert code == 2 and one_line(err, message), err


def test_a_factory_that_calls_sys_exit_is_a_model_error(tmp_path, capsys):
    (tmp_path / "m.py").write_text("import sys\n\n\ndef build():\n    sys.exit(3)\n")
    code, out, err = run(capsys, "inspect", f"{tmp_path / 'm.py'}:build", "--input-shape", "1,3")
    assert code == 2 and one_line(err, f"model '{tmp_path / 'm.py'}:build': factory called sys.exit(3)"), err


def test_a_binary_profile_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(two_tier("bandwidth: 20Mbit/s, latency: 5ms"))
    (tmp_path / "p.json").write_bytes(bytes(range(128, 256)))
    code, out, err = run(capsys, "plan", MLP, "--input-shape", "1,16", "--cluster", tmp_path / "c.yaml",
                         "--profile", f"rpi4={tmp_path / 'p.json'}")
    assert code == 2 and one_line(err, f"--profile 'rpi4={tmp_path / 'p.json'}': "), err


def test_compile_onto_a_file_is_one_line(build, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(two_tier("bandwidth: 20Mbit/s, latency: 5ms"))
    (tmp_path / "out").write_text("not a folder")
    code, out, err = run(capsys, "compile", MLP, "--input-shape", "1,16", "--cluster", tmp_path / "c.yaml",
                         "-o", tmp_path / "out")
    assert code == 2 and one_line(err.splitlines(keepends=True)[-1], f"{tmp_path / 'out'}: exists and is not a"), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]  # no staging folder left


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_bundle_onto_a_folder_or_under_a_file_is_one_line(build, tmp_path, capsys, where):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a folder")
    output = tmp_path / "dir" if where == "folder" else tmp_path / "file" / "edge.tar.gz"
    code, out, err = run(capsys, "bundle", build, "--tier", "device", "-o", output)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not any((tmp_path / "dir").iterdir())


def test_a_bad_certificate_is_blamed_on_the_certificate(build, tmp_path, capsys):
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    code, out, err = run(capsys, "serve", build, "--stage", "device.0", "--cert", tmp_path / "bad.pem",
                         "--key", tmp_path / "bad.pem")
    assert code == 2 and one_line(err, f"--cert {tmp_path / 'bad.pem'} --key {tmp_path / 'bad.pem'}: not a PEM"), err


# --- run ------------------------------------------------------------------------------------------------------

def _huge_header(path):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**15,)})
        f.write(b"x" * 64)


@pytest.mark.parametrize(("make", "argv", "message"), [
    (lambda p: p.write_bytes(b""), ["--input", "{f}"], "--input {f}: cannot read a .npy array (No data left in file)"),
    (_huge_header, ["--input", "{f}"], "--input {f}: cannot read a .npy array (mmap length is greater than file size)"),
    (lambda p: np.save(p, np.ones((2, 16), np.float32)), ["--input", "{f}"],
     "input 'input_1': got 2x16 float32, but the build was compiled for 1x16 float32"),
    (lambda p: np.save(p, np.ones((1, 16), np.float64)), ["--input", "{f}", "--distributed"],
     "input 'input_1': got 1x16 float64, but the build was compiled for 1x16 float32"),
    (lambda p: np.save(p, np.ones((1, 16), ">f4")), ["--input", "{f}", "--distributed"],
     "input 'input_1': big-endian float32; convert it to little-endian"),
    (lambda p: None, ["--output", "{f}/missing/y.npy"], "--output {f}/missing/y.npy: folder '{f}/missing' does not"),
    (lambda p: None, ["--distributed", "--requests", "0"], "--requests 0: must be at least 1"),
])
def test_bad_run_input_is_one_line_before_any_worker_starts(build, tmp_path, capsys, make, argv, message):
    path = tmp_path / "x.npy"
    make(path)
    code, out, err = run(capsys, "run", build, *(a.format(f=path if "--input" in argv else tmp_path) for a in argv))
    expected = message.format(f=path if "--input" in argv else tmp_path)
    assert code == 2 and out == "" and one_line(err, expected), err
    assert "starting one worker" not in err


# --- manifests ------------------------------------------------------------------------------------------------

def _edit(build, tmp_path, change):
    copy = tmp_path / "b"
    shutil.copytree(build, copy, symlinks=True)
    manifest = json.loads((copy / MANIFEST).read_text())
    change(manifest, copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_an_empty_model_entry_is_one_line(build, tmp_path, capsys):
    copy = _edit(build, tmp_path, lambda m, _: m.update(model={}))
    code, out, err = run(capsys, "run", copy)
    assert code == 2 and one_line(err, f"{copy / MANIFEST}: model.inputs: expected a list of tensors"), err


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_an_artifact_outside_the_build_folder_is_refused(build, tmp_path, where):
    outside = tmp_path / "outside.pt"
    shutil.copy(build / "device.0.pt", outside)  # the same bytes: its sha256 matches

    def change(manifest, copy):
        program = manifest["stages"][0]["programs"][0]
        if where == "symlink":
            (copy / "device.0.pt").unlink()
            os.symlink(outside, copy / "device.0.pt")
        else:
            program["artifact"] = "../outside.pt" if where == "parent" else str(outside)

    copy = _edit(build, tmp_path, change)
    message = ": .*: a symbolic link to .*, outside the build folder" if where == "symlink" else (
        " is not a path inside the build folder")
    with pytest.raises(ManifestError, match=r"stages\[0\]\.programs\[0\]\.artifact: '[^']+'" + message):
        load(copy)


def test_a_symlink_inside_the_build_folder_is_fine(build, tmp_path):
    def change(manifest, copy):
        (copy / "device.0.pt").rename(copy / "real.pt")
        os.symlink("real.pt", copy / "device.0.pt")

    x = {"input_1": np.ones((1, 16), np.float32)}
    np.testing.assert_array_equal(load(_edit(build, tmp_path, change))(x)["output"], load(build)(x)["output"])


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.integers(0, 30), min_size=1, max_size=6), value=_JSON)
def test_the_manifest_reader_raises_only_manifest_errors(build, tmp_path, path, value):
    manifest = _replace_somewhere(json.loads((build / MANIFEST).read_text()), path, value)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    try:
        read_manifest(tmp_path)
    except ManifestError:
        pass
