"""A cloud tier on Ray Serve (replicas, batching) fed by simulated devices over partc's gRPC frames.

One local Ray cluster for the module (2 CPUs, no dashboard, no HTTP proxy); at the end no
Ray process of ours may be left.
"""

import threading
import time

import pytest
from conftest import bounded

from partc.build import compile_model
from partc.cli import main
from partc.manifest import manifest_stages, read_manifest
from partc.runtime.fleet import RTOL, device_driver, device_inputs, relative_error, run_fleet
from partc.runtime.local import load, load_programs

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from partc.runtime.rayserve import TierServing, accepts_batches, ray_cluster, serve_tier  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pydantic, in Ray

CLUSTER = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: cloud, bandwidth: 1Gbit/s, latency: 1ms}
constraints:
  pin: {device: ["_0"], cloud: ["_4"]}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rayserve")
    (folder / "cluster.yaml").write_text(CLUSTER)
    return compile_model("tests/models.py:conv_stack", ["1,3,32,32"], folder / "cluster.yaml", folder / "b").path


def _ray_processes():
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.name() in ("raylet", "gcs_server")]


@pytest.fixture(scope="module")
def cloud(build):
    """The cloud tier on a local Ray cluster: 2 replicas, batches of up to 4."""
    with ray_cluster(None, "cloud", cpus=2):
        tier = serve_tier(build, "cloud", TierServing(min_replicas=2, max_replicas=2, max_batch=4, cpus=1))
        try:
            yield tier
        finally:
            tier.stop()
    deadline = time.monotonic() + 20
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ray_processes() == []


def test_both_backends_run_a_batch_as_their_requests_one_by_one(build):
    stages = manifest_stages(read_manifest(build), build)
    fns = load_programs(stages, ["device.0", "cloud.0"], None, None)
    for stage in stages:  # torchscript on the device, onnx (symbolic batch axis) in the cloud
        assert accepts_batches(fns[stage.name], stage.programs[stage.name])
    device = stages[0].programs["device.0"]
    mixes = lambda tensors: {n: v + v.sum(0, keepdims=True) for n, v in fns["device.0"](tensors).items()}  # noqa: E731
    assert not accepts_batches(mixes, device)


def test_eight_devices_through_two_batching_replicas_get_exact_results(build, cloud):
    report = bounded(lambda: run_fleet(build, {"cloud.0": cloud.address}, devices=8, rate=20.0, requests=6,
                                       verify=True, timeout=60.0), 300)
    assert (report.requests, report.delivered, report.lost) == (48, 48, 0)
    assert report.worst_error <= RTOL


def test_a_replica_killed_mid_run_loses_nothing(build, cloud):
    box = {}
    runner = threading.Thread(target=lambda: box.update(report=run_fleet(
        build, {"cloud.0": cloud.address}, devices=4, rate=8.0, requests=24, verify=True, timeout=60.0)))
    runner.start()
    time.sleep(1.5)
    (victim, *_) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    runner.join(300)
    assert not runner.is_alive()
    report = box["report"]
    assert (report.delivered, report.lost, report.failures) == (96, 0, ())
    assert report.worst_error <= RTOL  # each device's results in its requests' order


def test_a_device_that_disconnects_and_comes_back_keeps_working(build, cloud):
    inputs = device_inputs(read_manifest(build), 0, 8)
    local = load(build)
    with device_driver(build, {"cloud.0": cloud.address}, window=4) as driver:
        for i, _ in enumerate(driver.run(inputs)):
            if i == 1:
                break  # gone with requests in flight
    with device_driver(build, {"cloud.0": cloud.address}, window=4) as driver:
        results = bounded(lambda: list(driver.run(inputs)), 120)
    for request, result in zip(inputs, results, strict=True):
        assert relative_error(result["output"], local(request)["output"]) <= RTOL


def test_engine_flags_are_checked(build, capsys):
    assert main(["serve", str(build), "--engine", "ray"]) == 2
    assert main(["serve", str(build), "--stage", "cloud.0", "--max-batch", "4"]) == 2
    assert main(["serve", str(build), "--engine", "ray", "--tier", "cloud", "--replicas", "2",
                 "--max-replicas", "3"]) == 2
    assert main(["serve", str(build), "--engine", "ray", "--tier", "edge"]) == 2
    assert main(["run", str(build), "--devices", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "partc: error: --engine ray needs --tier",
        "partc: error: --max-batch needs --engine ray",
        "partc: error: give either a replica count or autoscaling bounds (min and max replicas), not both",
        "partc: error: no tier 'edge' in this build; tiers are: device, cloud",
        "partc: error: --devices needs --distributed",
    ]


def test_devices_against_grpc_workers_verify_every_result(build, capsys):
    assert main(["run", str(build), "--distributed", "--devices", "3", "--rate", "10", "--requests", "4",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "3 devices: 12 of 12 requests" in out and "0 lost" in out and "verified" in out
