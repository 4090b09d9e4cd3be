"""Choosing among a build's plans from measured bandwidth, and degrading when a stage dies."""

import pytest

from partc.runtime.bandwidth import BandwidthEstimator
from partc.runtime.plans import Hop, PlanSelector, RuntimePlan
from partc.runtime.worker import StageSpec

MBIT = 1e6 / 8
DEVICE, CLOUD = StageSpec("device.0", "", ("x",), ("h",)), StageSpec("cloud.0", "", ("h",), ("y",))
HOPS = [Hop("device.0", "cloud.0", ("device->cloud",), 40 * MBIT, 0.002)]
# p0 sends the 150 KB input to the cloud; p1 computes longer on the device and sends 20 KB; p2 is device only.
PLANS = [
    RuntimePlan("p0", "primary", (DEVICE, CLOUD), {"device.0": "a", "cloud.0": "b"}, 0.060, (150_000,)),
    RuntimePlan("p1", "adaptive", (DEVICE, CLOUD), {"device.0": "c", "cloud.0": "d"}, 0.150, (20_000,)),
    RuntimePlan("p2", "fallback", (StageSpec("device.0", "", ("x",), ("y",)),), {"device.0": "e"}, 0.350, ()),
]


def estimate(bandwidth, samples=3):
    est = BandwidthEstimator()
    for _ in range(samples):
        est.add(100_000, 100_000 / bandwidth)
    return est


def test_latency_is_affine_in_inverse_bandwidth_with_the_codec_folded_in():
    assert PLANS[0].latency(HOPS, {"device.0->cloud.0": 40 * MBIT}) == pytest.approx(0.060 + 150_000 / (40 * MBIT))
    codec = {"codec": "int8+zstd-1", "ratio": 5.0, "encode_bytes_per_s": 200e6, "decode_bytes_per_s": 400e6}
    hop = Hop("a", "b", ("a->b",), 10 * MBIT, 0.0, codec)
    assert hop.effective(10 * MBIT) == pytest.approx(1 / (1 / (50 * MBIT) + 1 / 200e6 + 1 / 400e6))
    assert Hop("a", "b", ("a->b",), MBIT, 0.0).effective(MBIT) == MBIT


def test_switches_only_on_enough_samples_and_a_clear_gain():
    selector = PlanSelector(PLANS, HOPS)
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
    selector = PlanSelector(PLANS, HOPS)
    assert selector.degrade(7, {"cloud.0"}, "request 7 failed: cloud.0 unreachable", {})
    assert selector.current == 2 and selector.switches[-1].new == "p2"
    assert "degrading to a plan without cloud.0" in selector.switches[-1].reason
    assert selector.select(8, {"device.0->cloud.0": estimate(400 * MBIT)}) == 2  # never back to a dead stage
    assert not selector.degrade(9, {"device.0"}, "device.0 unreachable", {})
