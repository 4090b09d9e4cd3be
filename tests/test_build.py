"""partc compile / partc run end to end: real models, real artifacts, real ONNX Runtime."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clusters import three_tier

import partc.targets
import partc.version
from partc.build import compile_model
from partc.cli import main
from partc.errors import ManifestError, PartcError
from partc.manifest import read_manifest
from partc.runtime.local import load
from partc.trace import load_model, parse_input_spec

CLUSTER = three_tier(pin='{device: ["layer1*"], edge: ["layer2*"]}')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "plain.yaml"
    path.write_text(three_tier())
    return path


@pytest.fixture(scope="module")
def build(tmp_path_factory, cluster):
    out = tmp_path_factory.mktemp("builds") / "resnet18"
    depfile = out.parent / "resnet18.d"
    return compile_model("torchvision:resnet18", ["1,3,224,224"], cluster, out, depfile=depfile)


def test_three_tier_build_runs_exactly_through_its_artifacts(build):
    assert read_manifest(build.path) == build.manifest
    manifest = build.manifest.to_json()  # as manifest.json holds it
    assert [s["name"] for s in manifest["stages"]] == ["device.0", "edge.0", "cloud.0"]
    assert [s["backend"] for s in manifest["stages"]] == ["torchscript", "onnx", "onnx"]
    programs = [p for s in manifest["stages"] for p in s["programs"]]
    assert all((build.path / p["artifact"]).is_file() for p in programs)
    assert all(p["predicted_s"] > 0 for p in programs) and "measured_s" not in programs[0]
    assert all(build.measured[p["id"]] > 0 for p in programs)  # timed here, kept out of the manifest
    primary = manifest["plans"][0]
    assert primary["kind"] == "primary"
    assert primary["programs"] == {"device.0": "device.0", "edge.0": "edge.0", "cloud.0": "cloud.0"}
    assert primary["assignment"]["layer1_0_conv1"] == "device"
    assert primary["assignment"]["layer2_0_conv1"] == "edge"
    # the residual skip crosses the layer1 -> layer2 boundary with the block input: the transfers say so
    assert {t["to"] for t in primary["transfers"]} >= {"edge.0", "cloud.0"}
    pipeline = load(build.path)
    x = parse_input_spec("1,3,224,224").example()
    with torch.no_grad():
        want = load_model("torchvision:resnet18")(x).numpy()
    got = pipeline({"x": x.numpy()})["output"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert manifest["verification"]["max_abs_diff"] <= 1e-4 * manifest["verification"]["output_scale"]


def test_every_plan_is_verified_and_identical_stages_are_stored_once(build):
    manifest = build.manifest.to_json()
    plans = manifest["plans"]
    assert len(plans) >= 2 and all(p["kind"] in ("primary", "adaptive", "fallback") for p in plans[1:])
    assert len({json.dumps(p["assignment"], sort_keys=True) for p in plans}) == len(plans)
    scale = manifest["verification"]["output_scale"]
    assert all(p["max_abs_diff"] <= 1e-4 * scale for p in plans)
    used = {(stage, pid) for p in plans for stage, pid in p["programs"].items()}
    stored = {(s["name"], p["id"]) for s in manifest["stages"] for p in s["programs"]}
    assert used == stored  # every program is used, and one used by several plans is stored once
    artifacts = [p["artifact"] for s in manifest["stages"] for p in s["programs"]]
    on_disk = [*build.path.glob("*.onnx"), *build.path.glob("*.pt")]
    assert len(artifacts) == len(set(artifacts)) == len(on_disk)
    # a fallback for a dead cloud worker: a plan stops on the edge (the pins keep layer2 there, so none
    # can stop on the device)
    assert any(p["stages"] == ["device.0", "edge.0"] for p in plans)
    assert not any(p["stages"] == ["device.0"] for p in plans)


def test_manifest_records_plan_and_links(build):
    manifest = build.manifest.to_json()
    predicted = manifest["plans"][0]["predicted"]
    assert set(predicted["link_bytes"]) == {"device->edge", "edge->cloud"}
    total = sum(predicted["compute"].values()) + sum(predicted["transfer"].values())
    assert predicted["latency"] == pytest.approx(total)
    transfers = manifest["plans"][0]["transfers"]
    crossing = sum(t["bytes"] for t in transfers if t["to"] == "edge.0" and t["from"] == "device.0")
    assert crossing == predicted["link_bytes"]["device->edge"]
    assert manifest["model"]["inputs"] == [{"name": "x", "shape": [1, 3, 224, 224], "dtype": "float32"}]
    text = (build.path / "manifest.json").read_text()
    assert json.loads(text) == manifest and text == json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def test_depfile_names_every_input_as_the_build_system_does(build, cluster, tmp_path, monkeypatch):
    from partc.build import _write_depfile

    target, deps = (build.path.parent / "resnet18.d").read_text().split(": ", 1)
    assert target == str(build.path / "manifest.json")  # as given to compile, so make and ninja match it by name
    deps = [Path(d).resolve() for d in deps.replace("\\\n", " ").split()]  # relative ones: to this folder
    assert [d.parts[-2:] for d in deps[:2]] == [("torchvision", "__init__.py"), ("models", "resnet.py")]
    shipped = Path(partc.targets.__file__).resolve().parent
    assert deps[2:] == [cluster.resolve(), *(shipped / "descriptions" / f"{name}.yaml"
                                             for name in ("cloud-cpu", "jetson-nano", "rpi4")),
                        shipped / "calibration.json", Path(partc.version.__file__).resolve()]
    monkeypatch.chdir(tmp_path)  # inside the folder a build runs in: relative; outside: absolute; escaped
    (tmp_path / "my model.py").touch()
    _write_depfile(Path("out/b.d"), Path("out/b #1/manifest.json"), [tmp_path / "my model.py", Path("/x/$y.yaml")])
    assert (tmp_path / "out/b.d").read_text() == "out/b\\ \\#1/manifest.json: my\\ model.py \\\n  /x/$$y.yaml\n"


def test_tampered_and_missing_artifacts_are_refused(build, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(build.path, copy)
    with open(copy / "edge.0.onnx", "ab") as f:
        f.write(b"\0")
    where = r"stages\[1\]\.programs\[0\]\.artifact: 'edge.0.onnx'"
    with pytest.raises(ManifestError, match=where + " does not match its sha256"):
        load(copy)
    (copy / "edge.0.onnx").unlink()
    with pytest.raises(ManifestError, match=where + " not found"):
        load(copy)


def test_malformed_manifest_names_the_key(build, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(build.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["stages"][2]["programs"][0]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"manifest.json: stages\[2\]\.programs\[0\]\.sha256: missing$"):
        load(copy)


def test_failed_compile_leaves_previous_build_intact(build, tmp_path, cluster):
    out = tmp_path / "b"
    shutil.copytree(build.path, out)
    before = sorted(p.name for p in out.iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER.replace('edge: ["layer2*"]', 'edge: ["no_such_layer*"]'))
    with pytest.raises(PartcError, match="no_such_layer"):
        compile_model("torchvision:resnet18", ["1,3,224,224"], bad, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_build(tmp_path, plain_cluster):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PartcError, match="exists and is not a partc build"):
        compile_model("tests/models.py:conv_stack", ["1,3,32,32"], plain_cluster, tmp_path)


def test_cli_run_reads_and_writes_npy(build, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = main(["run", str(build.path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")])
    assert code == 0
    with torch.no_grad():
        want = load_model("torchvision:resnet18")(torch.from_numpy(x)).numpy()
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert capsys.readouterr().out.startswith("output: 1x1000 float32")


def test_cli_run_wrong_input_shape(build, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 64, 64), dtype=np.float32))
    code = main(["run", str(build.path), "--input", str(tmp_path / "x.npy")])
    assert code == 2
    assert capsys.readouterr().err == (
        "partc: error: input 'x': got 1x3x64x64 float32, but the build was compiled for 1x3x224x224 float32; "
        "recompile with --input-shape 1,3,64,64\n"
    )


def test_cli_compile_prints_stage_table(tmp_path, plain_cluster, capsys):
    code = main(["compile", "tests/models.py:conv_stack", "--input-shape", "1,3,32,32", "--cluster",
                 str(plain_cluster), "-o", str(tmp_path / "b")])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.splitlines()[0].split() == ["stage", "program", "backend", "target", "artifact", "MB", "predicted",
                                           "ms", "measured", "ms"]
    assert "partc: tracing tests/models.py:conv_stack" in err and "partc: pass select-cuts" in err
    assert f"wrote {tmp_path / 'b'}/manifest.json" in out


def test_deployment_files_are_rendered_from_the_manifest(build):
    import configparser
    import subprocess

    manifest = build.manifest.to_json()
    for i, stage in enumerate(manifest["stages"]):
        name = stage["name"]
        script = build.path / f"serve-{name}.sh"
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert f'stage="{name}"' in text and text.startswith("#!/bin/sh\n")
        assert ("PARTC_NEXT" in text) == (i + 1 < len(manifest["stages"]))
        settings = subprocess.run(["sh", "-c", '. "$0" && echo "$PARTC_LISTEN $PARTC_THREADS ${PARTC_NEXT-unset}"',
                                   str(build.path / f"{name}.env")], capture_output=True, text=True, check=True)
        cores = partc.targets.target(stage["target"]).cores
        assert settings.stdout.split() == ["0.0.0.0:50051", str(cores), *(["unset"] if i == 2 else [])]
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read_string((build.path / f"partc-{name}.service").read_text())
        service = unit["Service"]
        assert service["ExecStart"] == f'"/opt/partc/resnet18/serve-{name}.sh" "/etc/partc/{name}.env"'
        assert (service["User"], service["Restart"], service["ProtectSystem"]) == ("partc", "always", "strict")
    readme = (build.path / "README.md").read_text()
    for stage in manifest["stages"]:
        assert f'- "{stage["name"]}": tier "{stage["tier"]}", target "{stage["target"]}"' in readme
    bytes_ = manifest["plans"][0]["predicted"]["link_bytes"]["device->edge"]
    assert f'- from "device" to "edge": {bytes_} bytes per inference' in readme


def test_a_cross_compiled_stage_is_verified_eagerly_and_not_timed(tmp_path):
    import shutil as sh

    pytest.importorskip("tvm")
    if sh.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross compiler: apt-get install gcc-aarch64-linux-gnu")
    cluster = tmp_path / "pi.yaml"
    cluster.write_text("tiers:\n  - {name: device, target: rpi4, backend: tvm}\n")
    build = compile_model("tests/models.py:conv_stack", ["1,3,32,32"], cluster, tmp_path / "b")
    manifest = build.manifest.to_json()
    (stage,) = manifest["stages"]
    (program,) = stage["programs"]
    assert program["info"]["arch"] == "aarch64" and build.measured[program["id"]] is None
    assert manifest["verification"]["max_abs_diff"] == 0.0  # the eager stand-in, not the artifact
