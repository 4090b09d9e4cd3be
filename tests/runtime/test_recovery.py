"""A worker killed and restarted mid-stream: the driver falls back, asks the dead stage again with back-off, and
returns to the primary plan once it answers; nothing is lost and results stay in order (issue 17, item 7)."""

import math
import os
import signal
import time

import numpy as np
import torch
from clusters import two_tier

from partc.build import compile_model
from partc.manifest import read_manifest
from partc.runtime.deploy import LocalWorkers, connect_build, spawn_worker, wait_ready
from partc.trace import load_model

REQUESTS = 1000


def test_a_restarted_worker_brings_the_driver_back_to_the_primary_plan(tmp_path):
    (tmp_path / "cluster.yaml").write_text(two_tier("bandwidth: 1Gbit/s, latency: 1ms"))
    build = compile_model("tests/models.py:residual", ["1,8,64,64"], tmp_path / "cluster.yaml", tmp_path / "b").path
    plans = read_manifest(build).plans  # at 1 Gbit/s the cloud computes; a fallback runs on the device alone
    assert plans[0].stages == ("device.0", "cloud.0") and ("device.0",) in [p.stages for p in plans]
    rng = np.random.default_rng(0)
    distinct = [{"x": rng.standard_normal((1, 8, 64, 64), dtype=np.float32)} for _ in range(20)]
    model = load_model("tests/models.py:residual")
    with torch.no_grad():
        wanted = [model(torch.from_numpy(x["x"])).numpy() for x in distinct]
    (tmp_path / "restart").mkdir()
    # margin inf: no switch on measured bandwidth (loopback measures gRPC's per-call cost, not a link)
    options = {"timeout": 20.0, "margin": math.inf}
    with LocalWorkers(build) as workers, connect_build(build, workers.addresses, **options) as driver:
        address = workers.addresses["cloud.0"]

        def stream():
            deadline = time.monotonic() + 60
            for i in range(REQUESTS):
                if i == 300:
                    os.kill(workers.processes["cloud.0"].pid, signal.SIGKILL)
                    workers.processes["cloud.0"].wait()
                if i == 400:  # the same stage on the same address, as systemd's Restart=always would
                    started = spawn_worker(build, "cloud.0", tmp_path / "restart", listen=address,
                                           processes=workers.processes)
                    wait_ready(*started, "the restarted cloud.0")
                if i > 400 and driver.selector.current != 0 and time.monotonic() < deadline:
                    time.sleep(0.05)  # a camera's pace until the driver is back: its probes come with requests
                yield distinct[i % len(distinct)]

        results = list(driver.run(stream()))
    assert len(results) == REQUESTS  # every request answered, in order
    for i, result in enumerate(results):
        want = wanted[i % len(wanted)]
        np.testing.assert_allclose(result["output"], want, atol=1e-4 * np.abs(want).max())
    first, last = driver.switches[0], driver.switches[-1]
    assert first.old == "p0" and "degrading to a plan without cloud.0" in first.reason and 296 <= first.request < 304
    assert last.new == "p0" and last.reason == "cloud.0 answer again; returning to the plan run before the fault"
    assert last.request > 400 and driver.selector.current == 0 and not driver.selector.down
