"""The gRPC transport with real servers on 127.0.0.1 (threads of this process; see test_processes.py)."""

import dataclasses
import time

import numpy as np
import pytest
import stagefns
from conftest import bounded

from partc.errors import PartcError, RunError
from partc.runtime.driver import connect
from partc.runtime.plans import RuntimePlan
from partc.runtime.routes import plan_routes
from partc.runtime.transport import NO_SECURITY, GrpcChannel, InProcessChannel, RetryPolicy, Security, call_stage
from partc.runtime.worker import Worker, serve_stage

grpc = pytest.importorskip("grpc")  # the 'runtime' extra


def drive(specs, security=NO_SECURITY, **options):
    return connect([RuntimePlan.single(specs)], stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS, security, **options)


def assert_matches_reference(items, outputs):
    assert len(outputs) == len(items)
    for item, out in zip(items, outputs, strict=True):
        ref = stagefns.reference(item)
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])


def test_chain_over_grpc_matches_the_model(grpc_chain):
    items = stagefns.inputs(30)
    with drive(grpc_chain()) as driver:
        driver.check()
        outputs = bounded(lambda: list(driver.run(items)), 60)
    assert_matches_reference(items, outputs)
    link = driver.links["edge.0->cloud.0"]
    assert link.count == 30 and link.total_bytes > 30 * 4 * 16 * 4  # h2 alone is 4x16 float32 per request


def test_tensors_larger_than_grpcs_default_4mib_limit(grpc_chain):
    items = stagefns.inputs(2, batch=200_000)  # x: 6.4 MB per request
    with drive(grpc_chain(), timeout=60) as driver:
        outputs = bounded(lambda: list(driver.run(items)), 90)
    assert_matches_reference(items, outputs)
    assert driver.links["driver->device.0"].total_bytes > 2 * 6_400_000


def test_wrong_or_missing_token_is_unauthenticated(grpc_chain):
    specs = grpc_chain(security=Security(token="s3cret"))
    with drive(specs, Security(token="s3cret")) as driver:
        assert set(bounded(lambda: driver.run_one(stagefns.inputs(1)[0]), 30)) == {"output.0", "output.1"}
    with drive(specs, Security(token="guess")) as driver:
        with pytest.raises(
            RunError,
            match=r"request 0 failed: stage 'device.0' refused a call with a wrong token "
            r"\(gRPC metadata 'partc-token'\); give every stage and the driver",
        ):
            bounded(lambda: driver.run_one(stagefns.inputs(1)[0]), 30)
        with pytest.raises(RunError, match=r"3 of 3 stages failed the health check: stage 'device.0' refused"):
            bounded(driver.check, 30)
    with drive(specs) as driver:
        with pytest.raises(RunError, match=r"stage 'device.0' refused a call with no token"):
            bounded(lambda: driver.run_one(stagefns.inputs(1)[0]), 30)


def test_tls_round_trip(grpc_chain, tls_files):
    cert, key = tls_files
    security = Security.from_files(None, cert, key, root=cert)
    specs = grpc_chain(security=dataclasses.replace(security, token="t"))
    items = stagefns.inputs(5)
    with drive(specs, Security(token="t", root=cert.read_bytes())) as driver:
        driver.check()
        assert_matches_reference(items, bounded(lambda: list(driver.run(items)), 30))
    with drive(specs, Security(token="t"), retry=RetryPolicy(attempts=2)) as driver:  # plaintext to a TLS server
        with pytest.raises(
            RunError, match=r"stage 'device.0' at 127.0.0.1:\d+ is unreachable: .* \(after 2 attempts\)"
        ):
            bounded(lambda: driver.run_one(items[0]), 30)


def test_a_hung_stage_times_out_with_its_name(grpc_chain):
    specs = grpc_chain(fns={s: stagefns.make_slow_edge(s) for s in stagefns.FNS})
    with drive(specs, timeout=1.5) as driver:
        start = time.monotonic()
        with pytest.raises(
            RunError,
            match=r"request 0 failed: stage 'edge.0' at 127.0.0.1:\d+ did not answer within "
            r"1.\d+ s \(deadline exceeded\)",
        ):
            bounded(lambda: list(driver.run(stagefns.inputs(3))), 20)
        assert time.monotonic() - start < 10


def test_a_stage_failure_crosses_hops_verbatim(grpc_chain):
    def broken(t):
        raise RuntimeError("out of memory")

    specs = grpc_chain(fns={**stagefns.FNS, "cloud.0": broken})
    with drive(specs) as driver:
        with pytest.raises(
            RunError,
            match=r"request 0 failed: stage 'cloud.0' \(request 0, plan 0\) failed: "
            r"RuntimeError: out of memory;",
        ):
            bounded(lambda: list(driver.run(stagefns.inputs(2))), 30)


def test_health_check_finds_a_stage_at_the_wrong_address(grpc_chain):
    specs = grpc_chain()
    swapped = [specs[0], dataclasses.replace(specs[1], address=specs[2].address), specs[2]]
    with drive(swapped) as driver:
        with pytest.raises(
            RunError,
            match=rf"1 of 3 stages failed the health check: {specs[2].address} serves "
            r"stage 'cloud.0', expected 'edge.0'",
        ):
            bounded(driver.check, 30)


def test_a_malformed_request_is_refused_clearly():
    route = plan_routes(stagefns.STAGES[2:], ("h2", "skip", "b"), ("output.0",))[0]
    server = serve_stage({0: route}, {0: stagefns.cloud})
    try:
        channel = GrpcChannel("cloud.0", server.address)
        with pytest.raises(RunError, match=r"stage 'cloud.0': malformed frame: magic b'GET ', expected b'PCTF'"):
            call_stage(channel, b"GET / HTTP/1.1\r\n\r\n" + bytes(32), time.monotonic() + 10)
        channel.close()
    finally:
        server.stop(0)


def test_worker_rejects_a_channel_to_the_wrong_stage():
    device, _, cloud = plan_routes(stagefns.STAGES, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS)
    to_cloud = InProcessChannel(Worker({0: cloud}, {0: stagefns.cloud}))
    with pytest.raises(PartcError, match=r"stage 'device.0': next stage is 'edge.0', channel is to 'cloud.0'"):
        Worker({0: device}, {0: stagefns.device}, to_cloud)


def test_a_wrong_token_is_the_grpc_status_unauthenticated(grpc_chain):
    specs = grpc_chain(security=Security(token="s3cret"))
    with grpc.insecure_channel(specs[0].address) as channel:
        health = channel.unary_unary("/partc.Stage/Health")
        assert health(b"", timeout=10, metadata=(("partc-token", "s3cret"),)) == b"device.0"
        with pytest.raises(grpc.RpcError) as caught:
            health(b"", timeout=10, metadata=(("partc-token", "guess"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "stage 'device.0' refused a call with a wrong token" in caught.value.details()
