"""The emulated testbed: stages in network namespaces, links shaped with tc, CPU quotas (root only)."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from clusters import TILED, three_tier, two_tier

from partc.build import compile_model
from partc.cli import main
from partc.costmodel import load_calibration
from partc.errors import PartcError
from partc.manifest import read_manifest
from partc.runtime import layout
from partc.runtime import testbed as tb
from partc.runtime.netns import CGROUP_CPU

MBIT = 1e6 / 8  # bytes/s

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or not (CGROUP_CPU / "cpu.cfs_quota_us").is_file(),
    reason="the testbed needs root, iproute2 (ip, tc) and the cgroup v1 cpu controller",
)

# 1x8x64x64 float32 tensors (128 KB each): the residual block's skip and conv1's output both
# cross device -> edge (256 KB forward, the 128 KB output comes back in the reply).
CLUSTER = three_tier(pin="{device: [conv1], edge: [conv2], cloud: [relu_1]}", uplink="10Mbit/s, latency: 1ms")
SHAPE = (1, 8, 64, 64)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("testbed")
    (folder / "cluster.yaml").write_text(CLUSTER)
    return compile_model("tests/models.py:residual", [",".join(map(str, SHAPE))], folder / "cluster.yaml",
                         folder / "b").path


@pytest.fixture(scope="module")
def testbed(build):
    """One testbed for the tests below, in file order; the last one exits it (exiting twice is harmless)."""
    testbed = tb.Testbed(build).__enter__()
    yield testbed
    testbed.__exit__(None, None, None)


def _ours():
    """Namespaces, cgroups and live child processes of this process that a testbed may have made."""
    prefix = f"partc-{os.getpid()}-"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            children.add(stat.parent.name)
    return ({line.split()[0] for line in namespaces.splitlines() if line.startswith(prefix)},
            {p.name for p in CGROUP_CPU.iterdir() if p.name.startswith(prefix)}, children)


def _delta(estimate, before):
    """Bytes and seconds per transfer recorded by ``estimate`` since the totals ``before``."""
    nbytes, seconds, count = (a - b for a, b in zip(
        (estimate.total_bytes, estimate.total_seconds, estimate.count), before, strict=True))
    return nbytes / count, seconds / count


def test_a_10_mbit_link_takes_the_time_its_bytes_imply(testbed):
    assert testbed.addresses["edge.0"] == "10.231.0.2:50051" and testbed.addresses["cloud.0"] == "10.231.1.2:50051"
    reference = load_calibration().reference  # jetson-nano's peak over one core of the calibration host
    assert testbed.shares["edge.0"] == pytest.approx(min(17.0 / (reference.peak_gflops / reference.cores), 2.0))
    report = testbed.measure(requests=4)
    link, second = report.links
    assert link.link == "device.0->edge.0" and link.bandwidth == pytest.approx(10 * MBIT)
    assert link.measured_bytes > 300_000  # 256 KB forward + 128 KB reply
    # measured seconds: both ways on the wire, the latency each way
    assert link.measured_s == pytest.approx(link.measured_bytes / (10 * MBIT) + 2 * link.latency_s, rel=0.2)
    assert second.measured_s == pytest.approx(second.measured_bytes / (50 * MBIT) + 0.040, rel=0.2)
    assert [s.stage for s in report.stages] == ["device.0", "edge.0", "cloud.0"]
    assert report.measured_s > link.measured_s + second.measured_s
    assert json.loads(json.dumps(report.to_json()))["links"][0]["link"] == "device.0->edge.0"
    assert "device.0->edge.0" in report.table()


@pytest.mark.slow
def test_the_calibrated_prediction_is_about_the_emulated_nodes(testbed):
    report = testbed.measure(requests=3)
    data = json.loads(json.dumps(report.to_json()))
    figures = ("predicted_ms", "calibrated_ms", "measured_ms")
    assert all(data[k] > 0 for k in figures)
    for stage in data["stages"]:  # every stage runs a program of the primary plan
        assert all(stage[k] > 0 for k in figures), stage
    cores = len(os.sched_getaffinity(0))
    for stage in data["stages"]:  # a target faster than this host's cores is not emulated, and the table says so
        needs = layout.target_cores(stage["target"])
        assert stage["emulates_target"] == (layout.MIN_SHARE <= needs <= cores)
        assert (f"{stage['stage']} ({stage['target']}): its target runs as fast as" in report.table()) == (
            not stage["emulates_target"])
    assert [k["link"] for k in data["links"]] == ["device.0->edge.0", "edge.0->cloud.0"]
    for link in data["links"]:
        assert all(link[k] > 0 for k in figures), link
        assert link["calibrated_ms"] > link["predicted_ms"]  # the reply's way back is priced too
    # the program times are this host's, under the stages' quotas: far closer than the targets' prediction
    assert 0.5 < report.measured_s / report.calibrated_s < 2.0


@pytest.mark.slow
def test_a_tiled_stage_is_priced_with_its_calls_measured_under_the_quotas(tmp_path):
    (tmp_path / "cluster.yaml").write_text(TILED)
    build = compile_model("torchvision:resnet18", ["1,3,112,112"], tmp_path / "cluster.yaml", tmp_path / "b").path
    (tile_link,) = [lk for lk in read_manifest(build).links if lk.src == lk.dst]
    with tb.Testbed(build) as testbed:
        report = testbed.measure(requests=2)
    data = json.loads(json.dumps(report.to_json()))
    (call,) = data["calls"]
    assert call["link"] == "edge->edge" and call["predicted_ms"] == pytest.approx(tile_link.call * 1e3)
    assert call["calibrated_ms"] > 0  # a round trip to edge.1's worker costs more than its program and bytes
    assert "a call over edge->edge:" in report.table()
    edge = next(s for s in data["stages"] if s["stage"] == "edge.0")
    assert edge["calibrated_ms"] > 0 and edge["measured_ms"] > 0


def test_outputs_equal_the_in_process_run(testbed, build):
    from partc.runtime.local import load

    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal(SHAPE, dtype=np.float32)} for _ in range(4)]
    with testbed.driver(window=2) as driver:
        results = list(driver.run(requests))
    local = load(build)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["output"], local(request)["output"])


def test_reshaping_mid_run_moves_the_measured_bandwidth_and_delay(testbed):
    inputs = {"x": np.ones(SHAPE, np.float32)}
    with testbed.driver(window=1, alpha=0.5, margin=math.inf) as driver:
        for i, _ in enumerate(driver.run([inputs] * 12)):
            if i == 3:
                slow = driver.links["device.0->edge.0"].bytes_per_second
                before = driver.links["edge.0->cloud.0"]
                before = (before.total_bytes, before.total_seconds, before.count)
                testbed.shape("device.0->edge.0", 40 * MBIT)
                testbed.shape("edge.0->cloud.0", 50 * MBIT, latency=0.060)
        fast = driver.links["device.0->edge.0"].bytes_per_second
        nbytes, seconds = _delta(driver.links["edge.0->cloud.0"], before)
    assert slow == pytest.approx(10 * MBIT, rel=0.2)
    assert fast == pytest.approx(40 * MBIT, rel=0.2)
    # 2 x 60 ms round trip, of which the driver takes off the 2 x 20 ms the cluster file says
    assert seconds == pytest.approx(nbytes / (50 * MBIT) + 0.080, rel=0.2)
    with pytest.raises(PartcError, match=r"no shaped link 'edge\.0->device\.0' in this testbed; links are: "):
        testbed.shape("edge.0->device.0", MBIT)


def test_exit_removes_every_namespace_cgroup_and_process(testbed):
    namespaces, cgroups, children = _ours()
    made = set(testbed.namespaces.values())
    assert made <= namespaces and made <= cgroups and len(children) >= 5  # 3 workers, 2 delay proxies
    testbed.__exit__(None, None, None)
    assert _ours() == (namespaces - made, cgroups - made, children - {str(p.pid) for p in testbed.processes.values()}
                       - {str(p.pid) for p in testbed.proxies.values()})
    assert all(p.poll() is not None for p in [*testbed.processes.values(), *testbed.proxies.values()])


def test_a_worker_that_fails_to_start_leaves_nothing_behind(build, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    with open(copy / "edge.0.onnx", "ab") as f:
        f.write(b"x")
    before = _ours()
    assert main(["testbed", str(copy)]) == 1
    assert re.fullmatch(r"partc: error: worker for stage 'edge\.0' did not start: "
                        r".*stages\[1\]\.programs\[0\]\.artifact: 'edge\.0\.onnx' does not match its sha256 "
                        r"\(tampered or rebuilt\); recompile",
                        capsys.readouterr().err.splitlines()[-1])  # after the progress lines
    assert _ours() == before


def test_inputs_cross_the_first_link_when_the_first_stage_is_not_on_the_first_tier(build):
    manifest = read_manifest(build)
    assert [h.src for h in layout.hops(manifest)] == ["device.0", "edge.0"]
    manifest = dataclasses.replace(manifest, stages=manifest.stages[1:])  # as if the plan ran nothing on the device
    assert layout.chain(manifest) == [(layout.DRIVER, "device"), ("edge.0", "edge"), ("cloud.0", "cloud")]
    first, second = layout.hops(manifest)
    transfer = manifest.plans[0].predicted.transfer(manifest.prices)  # the manifest's plans[0].predicted.transfer
    assert (first.src, first.dst, first.key, first.bandwidth, first.latency) == (
        "driver", "edge.0", "device->edge", 10 * MBIT, 0.001)
    assert first.predicted_s == transfer["device->edge"]
    assert (second.src, second.key, second.bandwidth) == ("edge.0", "edge->cloud", 50 * MBIT)
    manifest = dataclasses.replace(manifest, stages=manifest.stages[1:])  # device -> cloud: the path's narrowest
    (hop,) = layout.hops(manifest)  # link, summed latency
    assert (hop.key, hop.bandwidth, hop.latency) == ("device->edge,edge->cloud", 10 * MBIT, pytest.approx(0.021))
    assert hop.predicted_s == pytest.approx(sum(transfer.values()))


def test_cli_needs_root_and_names_bad_shares(build, capsys, monkeypatch):
    assert main(["testbed", str(build), "--cpu-share", "fog.0=0.5"]) == 2
    assert capsys.readouterr().err == (
        "partc: error: --cpu-share fog.0: no such stage; stages are: device.0, edge.0, cloud.0\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["testbed", str(build)]) == 2
    assert capsys.readouterr().err == (
        "partc: error: partc testbed needs root (network namespaces, tc and cgroups); run it with sudo\n")


TWO_TIER = two_tier("bandwidth: 40Mbit/s, latency: 2ms")


def test_a_slower_link_mid_run_switches_the_plan(tmp_path):
    # resnet18 at 112x112: the input goes to the cloud above 11.3 Mbit/s; from 1.8 to 11.3 Mbit/s the
    # device runs the first 43 nodes and sends a smaller feature map (partc plan --sweep says so)
    (tmp_path / "cluster.yaml").write_text(TWO_TIER)
    build = compile_model("torchvision:resnet18", ["1,3,112,112"], tmp_path / "cluster.yaml", tmp_path / "b").path
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 112, 112), dtype=np.float32)}
    with tb.Testbed(build) as testbed, testbed.driver(window=1) as driver:
        results = []
        for i, result in enumerate(driver.run([x] * 14)):
            results.append(result["output"])
            if i == 3:
                testbed.shape("device.0->cloud.0", 3 * MBIT)
    (switch,) = driver.switches
    assert (switch.old, switch.new) == ("p0", "p1") and 5 <= switch.request <= 9
    assert re.match(r"measured device\.0->cloud\.0 [0-9.]+ Mbit/s \(planned 40\)", switch.reason)  # smoothed: < 11
    for result in results[1:]:  # the same answer from either plan
        np.testing.assert_allclose(result, results[0], atol=1e-4 * np.abs(results[0]).max())
