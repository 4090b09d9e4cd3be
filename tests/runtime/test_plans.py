"""Choosing among a build's plans from measured bandwidth, and degrading when a stage dies."""

import dataclasses

import pytest

from partc.codec import LinkCodec
from partc.manifest import LinkEntry, Manifest, PlanEntry, ProgramEntry, ScheduleEntry, StageEntry, TierEntry
from partc.partition.price import LinkPrice, Prediction
from partc.plan import TensorSpec
from partc.runtime.bandwidth import BandwidthEstimator
from partc.runtime.plans import Hop, PlanSelector, RuntimePlan, from_manifest
from partc.runtime.routes import StageSpec

MBIT = 1e6 / 8
DEVICE, CLOUD = StageSpec("device.0", "", ("x",), ("h",)), StageSpec("cloud.0", "", ("h",), ("y",))
PRICES = (LinkPrice("device->cloud", 40 * MBIT, 0.002),)
HOPS = [Hop("device.0", "cloud.0", ("device->cloud",), 40 * MBIT, 0.002)]
# p0 sends the 150 KB input to the cloud; p1 computes longer on the device and sends 20 KB; p2 is device only.
PLANS = [
    RuntimePlan("p0", "primary", (DEVICE, CLOUD), {"device.0": "a", "cloud.0": "b"},
                Prediction({"device": 0.010, "cloud": 0.048}, {"device->cloud": 150_000}, ("device->cloud",))),
    RuntimePlan("p1", "adaptive", (DEVICE, CLOUD), {"device.0": "c", "cloud.0": "d"},
                Prediction({"device": 0.140, "cloud": 0.008}, {"device->cloud": 20_000}, ("device->cloud",))),
    RuntimePlan("p2", "fallback", (StageSpec("device.0", "", ("x",), ("y",)),), {"device.0": "e"},
                Prediction({"device": 0.350, "cloud": 0.0}, {"device->cloud": 0})),
]


def estimate(bandwidth, samples=3):
    est = BandwidthEstimator()
    for _ in range(samples):
        est.add(100_000, 100_000 / bandwidth)
    return est


def test_switches_only_on_enough_samples_and_a_clear_gain():
    selector = PlanSelector(PLANS, HOPS, PRICES)
    assert selector.select(0, {}) == 0  # nothing measured: the cluster file's 40 Mbit/s
    assert selector.select(1, {"device.0->cloud.0": estimate(3 * MBIT, samples=2)}) == 0  # too few samples
    assert selector.select(2, {"device.0->cloud.0": estimate(3 * MBIT)}) == 1
    (switch,) = selector.switches
    assert (switch.request, switch.old, switch.new) == (2, "p0", "p1")
    assert "device.0->cloud.0 3 Mbit/s (planned 40)" in switch.reason
    # p0 would be faster again at 40 Mbit/s, but not by the 10% margin at 11 Mbit/s
    assert selector.select(3, {"device.0->cloud.0": estimate(11 * MBIT)}) == 1
    assert selector.select(4, {"device.0->cloud.0": estimate(40 * MBIT)}) == 0
    assert len(selector.switches) == 2


def test_a_dead_stage_leaves_the_plans_that_stop_before_it():
    selector = PlanSelector(PLANS, HOPS, PRICES)
    assert selector.degrade(7, {"cloud.0"}, "request 7 failed: cloud.0 unreachable", {})
    assert selector.current == 2 and selector.switches[-1].new == "p2"
    assert "degrading to a plan without cloud.0" in selector.switches[-1].reason
    assert selector.select(8, {"device.0->cloud.0": estimate(400 * MBIT)}) == 2  # never back to a dead stage
    assert not selector.degrade(9, {"device.0"}, "device.0 unreachable", {})


def _tensor(name):
    return TensorSpec(name, (1, 8), "float32")


def _program(pid, reads, writes):
    return ProgramEntry(pid, f"{pid}.pt", "0" * 64, 1, tuple(map(_tensor, reads)), tuple(map(_tensor, writes)),
                        0.001, {})


CODEC = LinkCodec("int8+zstd-1", 4.0, 200e6, 400e6, 0.99, 8)


def manifest() -> Manifest:
    """Three tiers; p0 relays through edge.0, p1 runs a tiled program on the cloud, p2 stops on the device."""
    stages = (
        StageEntry("device.0", "device", 0, "torchscript", "rpi4",
                   (_program("device.0", ["x"], ["h"]), _program("device.0~all", ["x"], ["y"])), ()),
        StageEntry("edge.0", "edge", 0, "onnx", "jetson-nano", (_program("edge.0", ["h"], ["g"]),), ()),
        StageEntry("cloud.0", "cloud", 0, "onnx", "x86", (_program("cloud.0", ["h"], ["y"]),),
                   (ScheduleEntry("cloud.0~t", (_tensor("g"),), (_tensor("y"),), (("cloud.0",),),
                                  (("y", "y"),), 0.002),)),
    )
    plans = (
        PlanEntry("p0", "primary", ("device.0", "edge.0", "cloud.0"), {"device.0": "device.0", "cloud.0": "cloud.0"},
                  {}, Prediction({"device": 0.005, "edge": 0.0, "cloud": 0.010},
                                 {"device->edge": 150_000, "edge->cloud": 150_000}, ("device->edge", "edge->cloud")),
                  (), 0.0),
        PlanEntry("p1", "adaptive", ("device.0", "edge.0", "cloud.0"),
                  {"device.0": "device.0", "edge.0": "edge.0", "cloud.0": "cloud.0~t"},
                  {}, Prediction({"device": 0.005, "edge": 0.040, "cloud": 0.002},
                                 {"device->edge": 150_000, "edge->cloud": 20_000}, ("device->edge", "edge->cloud")),
                  (), 0.0),
        PlanEntry("p2", "fallback", ("device.0",), {"device.0": "device.0~all"}, {},
                  Prediction({"device": 0.300, "edge": 0.0, "cloud": 0.0}, {}), (), 0.0),
    )
    return Manifest(
        "0", "tests/models.py:mlp", "fx", (_tensor("x"),), (_tensor("y"),), "cluster.yaml", "latency",
        (TierEntry("device", "rpi4", "torchscript", 1), TierEntry("edge", "jetson-nano", "onnx", 1),
         TierEntry("cloud", "x86", "onnx", 1)),
        (LinkEntry("device", "edge", 10 * MBIT, 0.001, 2e-3, CODEC),
         LinkEntry("edge", "cloud", 50 * MBIT, 0.020, 2e-3, LinkCodec())),
        stages, plans, 0.0, 1.0,
    )


def test_plans_and_hops_come_from_the_typed_manifest():
    m = manifest()
    plans, hops = from_manifest(m, {"edge.0": "10.0.0.3:50051"})
    assert [(h.name, h.links, h.bandwidth, h.latency, h.codec) for h in hops] == [
        ("device.0->edge.0", ("device->edge",), 10 * MBIT, 0.001, "int8+zstd-1"),
        ("edge.0->cloud.0", ("edge->cloud",), 50 * MBIT, 0.020, "none"),
    ]
    relay, tiled = plans[0].stages[1], plans[1].stages[2]
    assert (relay.address, relay.inputs, relay.outputs) == ("10.0.0.3:50051", (), ())  # p0 only relays on the edge
    assert (tiled.inputs, tiled.outputs) == (("g",), ("y",))  # a tiled program's tensors
    assert [s.name for s in plans[2].stages] == ["device.0"] and plans[2].predicted is m.plans[2].predicted


def test_unmeasured_the_selector_ranks_plans_as_the_manifest_does():
    m = manifest()
    plans, hops = from_manifest(m)
    written = [p["predicted"]["latency"] for p in m.to_json()["plans"]]
    assert PlanSelector(plans, hops, m.prices).predicted({}) == dict(enumerate(written))
    # too few samples count as none
    selector = PlanSelector(plans, hops, m.prices)
    assert selector.predicted(selector.measured({"device.0->edge.0": estimate(MBIT, samples=2)})) == dict(
        enumerate(written))


def test_a_measured_hop_prices_every_link_it_crosses_with_the_links_codec():
    m = manifest()
    plans, hops = from_manifest(m)
    selector = PlanSelector(plans, hops, m.prices)
    measured = selector.measured({"device.0->edge.0": estimate(2 * MBIT)})
    assert measured == {"device.0->edge.0": pytest.approx(2 * MBIT)}
    p0 = selector.predicted(measured)[0]
    stream = 150_000 / (1 / (1 / (4.0 * measured["device.0->edge.0"]) + 1 / 200e6 + 1 / 400e6))
    assert p0 == pytest.approx(0.015 + 0.001 + stream + 0.020 + 150_000 / (50 * MBIT))
    # without the edge stage, device.0 -> cloud.0 crosses both links: the narrowest, summed latency
    direct = dataclasses.replace(m, stages=(m.stages[0], m.stages[2]), plans=(
        dataclasses.replace(m.plans[0], stages=("device.0", "cloud.0")),))
    plans, (hop,) = from_manifest(direct)
    assert (hop.links, hop.bandwidth, hop.latency) == (("device->edge", "edge->cloud"), 10 * MBIT, pytest.approx(0.021))
    selector = PlanSelector(plans, [hop], direct.prices)
    bandwidth = {"device->edge": 3 * MBIT, "edge->cloud": 3 * MBIT}
    assert selector.predicted({hop.name: 3 * MBIT}) == {0: plans[0].predicted.latency(direct.prices, bandwidth)}
