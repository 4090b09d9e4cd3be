"""A compiled build served by real worker processes over gRPC on loopback."""

import logging
import math
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from clusters import TILED, three_tier, two_tier

from partc.build import compile_model
from partc.cli import main
from partc.errors import ManifestError, PartcError, RunError
from partc.manifest import read_manifest
from partc.runtime.deploy import LocalWorkers, connect_build, serve, spawn_worker, wait_ready
from partc.runtime.driver import PROBE_BACKOFF
from partc.runtime.local import load
from partc.trace import load_model

CLUSTER = three_tier(pin="{device: [conv1], edge: [conv2], cloud: [relu_1]}")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    (folder / "cluster.yaml").write_text(CLUSTER)
    # residual block: the skip connection crosses both cuts
    return compile_model("tests/models.py:residual", ["1,8,16,16"], folder / "cluster.yaml", folder / "b").path


def test_three_worker_processes_match_the_in_process_run(build):
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1, 8, 16, 16), dtype=np.float32)} for _ in range(100)]
    local = load(build)
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, window=6) as driver:
        assert list(workers.addresses) == ["cloud.0", "edge.0", "device.0"]
        results = list(driver.run(requests))
    assert len(results) == 100
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["output"], local(request)["output"])
    assert {"device.0->edge.0", "edge.0->cloud.0"} <= set(driver.links)


def test_killed_worker_is_a_clear_error_naming_the_stage(build):
    x = {"x": np.zeros((1, 8, 16, 16), np.float32)}
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, timeout=20.0) as driver:
        driver.run_one(x)
        os.kill(workers.processes["edge.0"].pid, signal.SIGKILL)
        workers.processes["edge.0"].wait()
        with pytest.raises(RunError, match=r"stage 'edge\.0' at 127\.0\.0\.1:\d+ is unreachable"):
            list(driver.run([x] * 5))


TWO_TIER = two_tier("bandwidth: 1Gbit/s, latency: 1ms")


def test_a_killed_worker_degrades_to_a_plan_that_stops_before_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="partc.runtime")  # plan switches are logged at INFO
    (tmp_path / "cluster.yaml").write_text(TWO_TIER)
    build = compile_model("tests/models.py:residual", ["1,8,64,64"], tmp_path / "cluster.yaml", tmp_path / "b").path
    plans = read_manifest(build).plans  # at 1 Gbit/s the cloud computes, below 626 Mbit/s the device alone
    assert plans[0].stages == ("device.0", "cloud.0") and ("device.0",) in [p.stages for p in plans]
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1, 8, 64, 64), dtype=np.float32)} for _ in range(30)]
    model = load_model("tests/models.py:residual")
    results = []
    # margin inf: no switch on measured bandwidth (loopback measures gRPC's per-call cost, not a link)
    options = {"timeout": 20.0, "window": 4, "margin": math.inf}
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, **options) as driver:
        for i, result in enumerate(driver.run(requests)):
            results.append(result)
            if i == 9:
                os.kill(workers.processes["cloud.0"].pid, signal.SIGKILL)
                workers.processes["cloud.0"].wait()
    assert len(results) == 30  # every request answered, in order
    for request, result in zip(requests, results, strict=True):
        with torch.no_grad():
            want = model(torch.from_numpy(request["x"])).numpy()
        np.testing.assert_allclose(result["output"], want, atol=1e-4 * np.abs(want).max())
    (switch,) = driver.switches
    assert switch.old == "p0" and plans[[p.name for p in plans].index(switch.new)].stages == ("device.0",)
    assert 10 <= switch.request < 14 and "degrading to a plan without cloud.0" in switch.reason
    assert "degrading to a plan without cloud.0" in caplog.text


def test_a_worker_needs_only_its_own_artifact_and_checks_it(build, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    (copy / "device.0.pt").unlink()
    server = serve(copy, "cloud.0")
    server.stop()
    with open(copy / "cloud.0.onnx", "ab") as f:
        f.write(b"x")
    where = r"stages\[2\]\.programs\[0\]\.artifact: 'cloud\.0\.onnx'"
    with pytest.raises(ManifestError, match=where + " does not match its sha256"):
        serve(copy, "cloud.0")
    with pytest.raises(PartcError, match=r"stage 'edge\.0' forwards to 'cloud\.0': give its address"):
        serve(copy, "edge.0")
    with pytest.raises(PartcError, match=r"no stage 'edge\.7' in this build; stages are: device\.0, edge\.0, cloud\.0"):
        serve(copy, "edge.7")


def test_cli_distributed_run_reports_links(build, tmp_path, capsys):
    code = main(["run", str(build), "--distributed", "--requests", "8", "--output", str(tmp_path / "y.npy")])
    out = capsys.readouterr().out
    assert code == 0
    assert "\n8 requests in " in out, out
    assert "link device.0->edge.0: " in out and "stage cloud.0: compute " in out
    x = np.load(tmp_path / "y.npy")
    assert x.shape == (1, 8, 16, 16)


def test_a_bundle_holds_one_tier_and_serves_from_where_it_is_unpacked(build, tmp_path, capsys):
    import tarfile

    assert main(["bundle", str(build), "--tier", "cloud", "-o", str(tmp_path / "cloud.tar.gz")]) == 0
    with tarfile.open(tmp_path / "cloud.tar.gz") as archive:
        names = sorted(m.name for m in archive.getmembers())
        archive.extractall(tmp_path / "node", filter="data")
    assert names == sorted(f"b/{n}" for n in ("SHA256SUMS", "manifest.json", "README.md", "cloud.0.onnx",
                                              "serve-cloud.0.sh", "cloud.0.env", "partc-cloud.0.service"))
    server = serve(tmp_path / "node" / "b", "cloud.0")
    server.stop()
    assert main(["bundle", str(build), "--tier", "fog", "-o", str(tmp_path / "x.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert "no stage of this build runs on tier 'fog'; tiers with stages: device, edge, cloud" in err
    assert not (tmp_path / "x.tar.gz").exists()


def test_a_tiled_stage_runs_its_tiles_on_the_tiers_other_node(tmp_path, capsys):
    (tmp_path / "cluster.yaml").write_text(TILED)
    build = compile_model("torchvision:resnet18", ["1,3,112,112"], tmp_path / "cluster.yaml", tmp_path / "b").path
    manifest = read_manifest(build)
    assert [(s.name, s.index) for s in manifest.stages] == [("device.0", 0), ("edge.0", 0), ("edge.1", 1)]
    edge, peer = manifest.stages[1:]
    (schedule,) = [s for s in edge.schedules if s.id == manifest.plans[0].programs["edge.0"]]
    assert any(len(step) == 2 for step in schedule.steps)  # a step whose tile 1 runs on edge.1
    assert {p.id for p in peer.programs} >= {ids[1] for ids in schedule.steps if len(ids) == 2}
    assert all(p.stages[-1] != "edge.1" for p in manifest.plans)  # tile nodes are in no chain
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1, 3, 112, 112), dtype=np.float32)} for _ in range(6)]
    local = load(build)
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, margin=math.inf) as driver:
        assert set(workers.addresses) == {"device.0", "edge.0", "edge.1"}
        results = list(driver.run(requests))
        os.kill(workers.processes["edge.1"].pid, signal.SIGKILL)  # edge.0 cannot run its tiles now
        workers.processes["edge.1"].wait()
        degraded = list(driver.run(requests))
        (switch,) = driver.switches
        assert switch.old == "p0" and "degrading to a plan without edge.1" in switch.reason
        fallback = driver.selector.plans[driver.selector.current]
        assert not fallback.peers  # the build's best plan without edge.1 (one edge node, or none)
        started = spawn_worker(build, "edge.1", tmp_path, listen=workers.addresses["edge.1"],
                               processes=workers.processes)
        wait_ready(*started, "the restarted edge.1")
        deadline = time.monotonic() + 60  # the driver asks again with a doubling back-off
        back = list(driver.run(requests))
        while driver.selector.current != 0 and time.monotonic() < deadline:
            time.sleep(PROBE_BACKOFF)
            back = list(driver.run(requests))
        assert driver.switches[-1].new == "p0" and driver.selector.current == 0 and not driver.selector.down
    for request, *answers in zip(requests, results, degraded, back, strict=True):
        want = local(request)["output"]
        np.testing.assert_array_equal(answers[0]["output"], want)
        for answer in answers[1:]:
            np.testing.assert_allclose(answer["output"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(PartcError, match=r"stage 'edge\.0' runs tiles on edge\.1: give their addresses "
                                         r"\(--peer edge\.1=HOST:PORT\)"):
        serve(build, "edge.0")
    assert main(["bundle", str(build), "--tier", "edge", "-o", str(tmp_path / "edge.tar.gz")]) == 0
    import tarfile

    with tarfile.open(tmp_path / "edge.tar.gz") as archive:
        names = {m.name.split("/", 1)[1] for m in archive.getmembers()}
    assert {"serve-edge.1.sh", "partc-edge.1.service"} <= names
    assert {p.artifact for p in peer.programs} <= names
    assert 'runs tiles on ["edge.1"] (`PARTC_PEERS`)' in (build / "README.md").read_text()
    assert 'PARTC_PEERS=""' in (build / "edge.0.env").read_text()
    assert "PARTC_PEERS" not in (build / "edge.1.env").read_text()


COMPRESSED = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: cloud, bandwidth: 1Mbit/s, latency: 5ms, codecs: [none, none+zstd-1]}
constraints:
  pin: {device: [conv1], cloud: [conv2]}   # the ReLU output between them crosses
"""


def test_a_link_codec_applies_in_process_and_between_workers(tmp_path):
    (tmp_path / "cluster.yaml").write_text(COMPRESSED)
    build = compile_model("tests/models.py:sparse", ["1,4,32,32"], tmp_path / "cluster.yaml", tmp_path / "b").path
    (link,) = read_manifest(build).links
    assert link.codec.codec == "none+zstd-1" and link.codec.ratio > 2
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 32, 32), dtype=np.float32)}
    with torch.no_grad():
        want = load_model("tests/models.py:sparse")(torch.from_numpy(x["x"])).numpy()
    np.testing.assert_allclose(load(build)(x)["output"], want, rtol=1e-5, atol=1e-6)  # lossless
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, margin=math.inf) as driver:
        results = list(driver.run([x] * 3))
        estimate = driver.links["device.0->cloud.0"]
    for result in results:
        np.testing.assert_allclose(result["output"], want, rtol=1e-5, atol=1e-6)
    raw = sum(t.bytes for t in read_manifest(build).plans[0].transfers if t.dst == "cloud.0")
    assert estimate.total_bytes / estimate.count < raw / 2  # the frames carried the compressed tensor
