"""Three stages as separate worker processes (``python -m partc.runtime.worker``) on 127.0.0.1.

The tests share one set of processes (starting one imports torch: seconds each); the last
test kills one of them.
"""

import signal

import numpy as np
import pytest
import stagefns
from conftest import bounded

from partc.errors import RunError
from partc.runtime.driver import connect, in_process
from partc.runtime.plans import RuntimePlan
from partc.runtime.transport import Security

pytest.importorskip("grpc")  # the 'runtime' extra

TOKEN = "pipeline-token"


@pytest.fixture(scope="module")
def workers(worker_processes):
    return worker_processes(token=TOKEN)


def drive(workers, token=TOKEN, **options):
    plans = [RuntimePlan.single(workers.specs)]
    return connect(plans, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS, Security(token=token), **options)


def test_three_processes_equal_the_in_process_run(workers):
    items = stagefns.inputs(100)
    plans = [RuntimePlan.single(stagefns.STAGES)]
    with in_process(plans, stagefns.FNS, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS) as here:
        expected = list(here.run(items))
    with drive(workers, window=6) as driver:
        bounded(driver.check, 30)
        outputs = bounded(lambda: list(driver.run(items)), 90)
    assert len(outputs) == 100, workers.log_tail()
    for want, got in zip(expected, outputs, strict=True):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert {key: b.count for key, b in driver.links.items()} == {
        "driver->device.0": 100,
        "device.0->edge.0": 100,
        "edge.0->cloud.0": 100,
    }


def test_processes_refuse_a_wrong_token(workers):
    with drive(workers, token="guess") as driver:
        with pytest.raises(RunError, match=r"^request 0 failed: stage 'device.0' refused a call with a wrong token"):
            bounded(lambda: driver.run_one(stagefns.inputs(1)[0]), 30)


def test_killing_a_worker_mid_stream_names_the_stage(workers):
    edge = workers.procs["edge.0"]
    items = stagefns.inputs(100)
    delivered = []

    def stream():
        with drive(workers, timeout=10) as driver:
            for out in driver.run(iter(items)):
                delivered.append(out)
                if len(delivered) == 10:
                    edge.send_signal(signal.SIGKILL)
                    edge.wait(10)

    address = workers.specs[1].address
    with pytest.raises(
        RunError,
        match=rf"failed: stage 'edge.0' at {address} is unreachable: .*\(after 3 attempts\); "
        r"\d+ results were delivered before it, \d+ later requests in flight",
    ):
        bounded(stream, 60)
    assert 10 <= len(delivered) < 100
    for item, out in zip(items, delivered, strict=False):
        np.testing.assert_array_equal(out["output.0"], stagefns.reference(item)["output.0"])
    with drive(workers) as driver:
        with pytest.raises(
            RunError,
            match=rf"^1 of 3 stages failed the health check: stage 'edge.0' at {address} "
            r"is unreachable",
        ):
            bounded(driver.check, 30)
