import time

import numpy as np
import pytest
import stagefns
from conftest import bounded

from partc.errors import PartcError, RunError
from partc.runtime.driver import Driver, in_process
from partc.runtime.plans import RuntimePlan
from partc.runtime.routes import StageSpec, plan_routes
from partc.runtime.transport import InProcessChannel
from partc.runtime.worker import Worker


def pipeline(fns=None, **options):
    plans = [RuntimePlan.single(stagefns.STAGES)]
    return in_process(plans, fns or stagefns.FNS, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS, **options)


def test_routes_forward_what_later_stages_read():
    device, edge, cloud = plan_routes(stagefns.STAGES, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS)
    assert device.forward == ("b", "h1", "skip") and device.results == ("output.1",)
    assert device.next_stage == "edge.0"
    assert edge.forward == ("b", "h2", "skip") and edge.results == () and edge.receives == ("h1", "b", "skip")
    assert cloud.forward == () and cloud.results == ("output.0",) and cloud.next_stage is None


def test_routes_reject_a_tensor_nobody_writes():
    stages = (StageSpec("a.0", "", ("x",), ("y",)), StageSpec("b.0", "", ("y", "ghost"), ("output",)))
    with pytest.raises(
        PartcError,
        match=r"stage 'b.0' reads 'ghost', which no earlier stage writes; "
        r"no stage writes the model output 'missing'",
    ):
        plan_routes(stages, ("x",), ("output", "missing"))


@pytest.mark.parametrize("window", [1, 4])
def test_outputs_equal_the_model_in_order(window):
    items = stagefns.inputs(50)
    with pipeline(window=window) as driver:
        outputs = bounded(lambda: list(driver.run(items)), 30)
    assert len(outputs) == 50
    for item, out in zip(items, outputs, strict=True):
        ref = stagefns.reference(item)
        assert set(out) == set(ref)
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])
    assert set(driver.links) == {"driver->device.0", "device.0->edge.0", "edge.0->cloud.0"}
    assert all(b.count == 50 and b.bytes_per_second > 0 for b in driver.links.values())
    assert set(driver.compute) == {"device.0", "edge.0", "cloud.0"}


def test_a_failing_stage_function_is_named():
    def broken(t):
        raise ValueError("shape mismatch in layer3")

    with pipeline({**stagefns.FNS, "cloud.0": broken}) as driver:
        with pytest.raises(
            RunError,
            match=r"request 0 failed: stage 'cloud.0' \(request 0, plan 0\) failed: "
            r"ValueError: shape mismatch in layer3; 0 results were delivered",
        ):
            bounded(lambda: list(driver.run(stagefns.inputs(3))), 30)


def test_a_stage_that_forgets_an_output_is_named():
    with pipeline({**stagefns.FNS, "edge.0": lambda t: {}}) as driver:
        with pytest.raises(
            RunError, match=r"stage 'edge.0' \(request 0, plan 0\): the stage function returned no array for h2"
        ):
            driver.run_one(stagefns.inputs(1)[0])


def test_missing_model_input_is_bad_input():
    with pipeline() as driver:
        with pytest.raises(PartcError, match=r"input 0 lacks model input 'b'; it has \['x'\]"):
            driver.run_one({"x": np.zeros((1, 8), np.float32)})


def test_in_process_workers_check_the_token_too():
    driver = pipeline(token="secret")
    driver.check()
    assert set(driver.run_one(stagefns.inputs(1)[0])) == {"output.0", "output.1"}
    routes = plan_routes(stagefns.STAGES, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS)
    last = Worker({0: routes[2]}, {0: stagefns.cloud}, token="secret")
    plans = [RuntimePlan.single(stagefns.STAGES[2:])]
    with pytest.raises(RunError, match=r"stage 'cloud.0' refused a call with a wrong token"):
        Driver([InProcessChannel(last, token="guess")], plans, ("h2", "skip", "b"), ("output.0",)).check()


def test_a_closed_pipeline_is_unreachable_not_hung():
    driver = pipeline()
    driver.close()
    with pytest.raises(
        RunError,
        match=r"stage 'device.0' at in-process is unreachable: the channel is closed "
        r"\(after 3 attempts\)",
    ):
        bounded(lambda: driver.run_one(stagefns.inputs(1)[0]), 30)


def test_links_carry_tensors_with_their_codec():
    items = stagefns.inputs(5, batch=64)
    with pipeline() as exact, pipeline(hop_codecs=["fp16", "int8+zstd"], codecs={"x": "fp16"}) as lossy:
        want, got = list(exact.run(items)), list(lossy.run(items))
    for w, g in zip(want, got, strict=True):  # h2, skip and b cross the second hop as int8: 1/255 of their range
        np.testing.assert_allclose(g["output.0"], w["output.0"], atol=0.5)
        assert not np.array_equal(g["output.0"], w["output.0"])
    for link in ("driver->device.0", "device.0->edge.0", "edge.0->cloud.0"):
        assert lossy.links[link].total_bytes < exact.links[link].total_bytes


def test_unknown_codec_is_bad_input():
    with pytest.raises(PartcError, match="unknown codec 'gzip'"):
        pipeline(hop_codecs=["none", "gzip"])


def test_stages_work_on_different_requests_at_once():
    def slow(fn):
        def run(t):
            time.sleep(0.1)
            return fn(t)

        return run

    items = stagefns.inputs(10)
    with pipeline({name: slow(fn) for name, fn in stagefns.FNS.items()}, window=4) as driver:
        start = time.monotonic()
        outputs = bounded(lambda: list(driver.run(items)), 30)
        seconds = time.monotonic() - start
    assert len(outputs) == 10
    # One request at a time would take 10 x 3 x 0.1 = 3 s; a full pipeline about (10 + 2) x 0.1.
    assert seconds < 2.2, f"{seconds:.2f} s: the stages did not overlap"
