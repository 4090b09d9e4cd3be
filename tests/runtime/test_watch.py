"""Slow nodes of a tier: judged against their prediction relative to the coordinator, and avoided."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from clusters import TILED

from partc.build import compile_model
from partc.runtime import watch
from partc.runtime.deploy import LocalWorkers, connect_build
from partc.runtime.local import load
from partc.runtime.watch import NodeWatch


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_node_is_slow_relative_to_the_coordinator_after_enough_calls_and_forgiven_after_hold():
    clock = Clock()
    nodes = NodeWatch({0: "edge.0", 1: "edge.1", 2: "edge.2"}, {"a": 0.010, "b": 0.020, "c": 0.020}, clock)
    assert nodes.slow() == []  # nothing measured
    for _ in range(watch.MIN_SAMPLES):
        nodes.observe(0, "a", 0.030)  # the whole tier runs 3x its prediction (another machine than the target)
        nodes.observe(1, "b", 0.060)  # as fast as the coordinator, relative to their predictions
        assert nodes.slow() == []
        nodes.observe(2, "c", 0.150)  # 7.5x: 2.5 times the coordinator's ratio
    assert nodes.slow() == ["edge.2"]
    nodes.observe(9, "unknown", 1.0)  # a program without a prediction is not judged
    clock.now += watch.HOLD  # edge.2 is not called any more: its verdict lapses
    nodes.observe(0, "a", 0.030)
    assert nodes.slow() == []
    nodes.observe(2, "c", 0.060)  # called again, it is judged afresh: one fast call is no verdict
    assert nodes.slow() == []


@pytest.mark.slow
def test_a_slowed_down_edge_node_moves_the_driver_to_a_plan_without_it(tmp_path):
    (tmp_path / "cluster.yaml").write_text(TILED)
    build = compile_model("torchvision:resnet18", ["1,3,112,112"], tmp_path / "cluster.yaml", tmp_path / "b").path
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1, 3, 112, 112), dtype=np.float32)} for _ in range(40)]
    local = load(build)
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses) as driver:
        results = list(driver.run(requests[:4]))
        before = len(driver.switches)  # loopback is fast: a switch for bandwidth may come first
        stop = threading.Event()
        pid = workers.processes["edge.1"].pid

        def throttle():  # edge.1 runs 10 ms of every 60: a machine slowed down, not dead
            while not stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.05)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.01)

        slower = threading.Thread(target=throttle)
        slower.start()
        try:
            deadline = time.monotonic() + 120
            ran = 4
            while len(driver.switches) == before and time.monotonic() < deadline:
                results += list(driver.run(requests[ran:ran + 4]))
                ran += 4
        finally:
            stop.set()
            slower.join()
            os.kill(pid, signal.SIGCONT)
        assert any("edge.0 finds edge.1 slow or unreachable" in switch.reason for switch in driver.switches)
        fallback = driver.selector.plans[driver.selector.current]
        assert not fallback.peers  # the edge tier on its one node
        results += list(driver.run(requests[ran:ran + 4]))
    for request, answer in zip(requests, results, strict=False):  # every request answered, in order
        want = local(request)["output"]
        np.testing.assert_allclose(answer["output"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert len(results) == ran + 4
