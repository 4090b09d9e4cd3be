"""What a worker holds for hostile bytes is bounded (issue 17, items 1, 2 and 6): the frame decoder checks sizes
before it allocates, a call without the token is refused before its message is read, a frame larger than the
build's largest is refused unread, a codec the link does not use is refused, and the driver checks its inputs."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import lz4.frame
import numpy as np
import pytest
import stagefns
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partc.errors import ManifestError, RunError
from partc.plan import TensorSpec
from partc.runtime import wire
from partc.runtime.driver import in_process
from partc.runtime.plans import RuntimePlan
from partc.runtime.routes import Route
from partc.runtime.transport import HEALTH, RUN, TOKEN_KEY, Rejected
from partc.runtime.wire import Frame, decode, encode
from partc.runtime.worker import Worker

HERE = Path(__file__).parent
MIB = 2**20
BOUND = 64 * MIB  # what a worker may grow by, over its peak after an honest request, under any attack below
GIB_OF_ZEROS = 2**30
TOKEN = "pipeline-token"
H1 = np.zeros((4, 16), np.float32)  # what edge.0 of stagefns reads: 256 bytes


def frame_claiming(name: str, shape: tuple, codec: str, payload: bytes, dtype_code: int = 1) -> bytes:
    """A one-tensor frame whose header claims ``shape`` and ``codec``, with any ``payload``."""
    name_b, codec_b = name.encode(), codec.encode()
    return b"".join([
        wire._FRAME.pack(wire.MAGIC, wire.VERSION, 0, 1, 7, 0.0, 0, 0),
        wire._TENSOR.pack(len(name_b), len(codec_b), dtype_code, len(shape), len(payload)),
        *(wire._DIM.pack(d) for d in shape), name_b, codec_b, bytes(-(len(name_b) + len(codec_b)) % 8),
        payload, bytes(-len(payload) % 8),
    ])


def zstd_bomb(size: int = GIB_OF_ZEROS) -> bytes:
    """``size`` zeros as one zstd frame (about 32 KB for 1 GiB) that states its content size, made in chunks."""
    packer = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = bytes(MIB)
    return b"".join(packer.compress(chunk) for _ in range(size // MIB)) + packer.flush()


def lz4_bomb(size: int = GIB_OF_ZEROS) -> bytes:
    """``size`` zeros as one lz4 frame (about 4 MB for 1 GiB), made in chunks."""
    packer = lz4.frame.LZ4FrameCompressor()
    chunk = bytes(MIB)
    return packer.begin() + b"".join(packer.compress(chunk) for _ in range(size // MIB)) + packer.flush()


# --- the decoder ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("codec", "bomb"), [("none+zstd-1", zstd_bomb), ("none+lz4", lz4_bomb)])
def test_a_decompression_bomb_is_refused_at_the_size_its_header_claims(codec, bomb):
    data = frame_claiming("h1", (4, 16), codec, bomb(64 * MIB))
    with pytest.raises(RunError, match=rf"tensor 0 \('h1'\), float32\[4, 16\]: codec {codec.replace('+', '.')}: "
                                       r"payload decompresses to more than the 256 bytes the tensor needs"):
        decode(data)


def test_a_frame_claiming_huge_tensors_is_refused_before_decoding():
    data = frame_claiming("h1", (2**20, 2**20), "none+zstd-1", zstd_bomb(MIB))
    with pytest.raises(RunError, match=r"\[1048576, 1048576\]: the frame's tensors take more than 1000000 bytes"):
        decode(data, max_bytes=1_000_000)
    with pytest.raises(RunError, match=r"take more than 2147483647 bytes"):
        decode(data)  # the default: gRPC's ceiling


def test_a_codec_the_link_does_not_use_is_refused():
    data = encode(Frame(0, {"h1": H1}), {"h1": "none+zstd-1"})
    assert decode(data, {"none+zstd-1"}).tensors["h1"].shape == (4, 16)
    with pytest.raises(RunError, match=r"tensor 0 \('h1'\) comes with codec 'none\+zstd-1'; this link carries "
                                       r"'none' only"):
        decode(data, {"none"})
    worker = Worker({0: Route("edge.0", ("h1",), ("h2",), results=("h2",))}, {0: stagefns.edge})
    with pytest.raises(Rejected, match=r"stage 'edge\.0': malformed frame: .*comes with codec 'none\+zstd-1'"):
        worker.run(data, None, time.monotonic() + 5)
    assert "h2" in decode(worker.run(encode(Frame(0, {"h1": H1})), None, time.monotonic() + 5)).tensors


_VALID = encode(Frame(3, {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 3, 4), np.float32),
                          "n": np.arange(5)}, (wire.Measurement("link", "device.0", "edge.0", 0.1, 10, 20),)),
                {"a": "int8c+zstd-1", "b": "fp16+lz4"})


@st.composite
def _frames(draw):
    """Frames near valid ones: bytes flipped, cut, spliced, or a header with random fields."""
    kind = draw(st.sampled_from(["flip", "cut", "splice", "header", "random"]))
    data = bytearray(_VALID)
    if kind == "flip":
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[i] = draw(st.integers(0, 255))
    elif kind == "cut":
        del data[draw(st.integers(0, len(data))):]
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    elif kind == "header":
        shape = draw(st.lists(st.integers(0, 2**64 - 1), max_size=5))
        codec = draw(st.sampled_from(["none", "fp16", "int8", "int8c", "int8c+zstd", "none+lz4", "none+zstd-22", "x"]))
        return frame_claiming(draw(st.text(max_size=4)), tuple(shape), codec, draw(st.binary(max_size=64)),
                              draw(st.integers(0, 255)))
    else:
        return draw(st.binary(max_size=256))
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames())
def test_the_frame_decoder_raises_only_run_errors(data):
    try:
        frame = decode(data, max_bytes=64 * MIB)
    except RunError:
        return
    assert sum(a.nbytes for a in frame.tensors.values()) <= 64 * MIB


# --- worker processes -----------------------------------------------------------------------------------------

def peak_mib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of process ``pid``, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))


@pytest.fixture
def worker(tmp_path):
    """edge.0 of ``stagefns`` as the last stage, in its own process, with a token; yields (process, call)."""
    processes = []

    def start(*flags):
        (tmp_path / "token").write_text(TOKEN + "\n")
        ready = tmp_path / f"w{len(processes)}.ready"
        argv = [sys.executable, "-m", "partc.runtime.worker", "--stage", "edge.0", "--fn", "stagefns:make",
                "--reads", "h1", "--writes", "h2", "--results", "h2", "--threads", "4",
                "--token-file", str(tmp_path / "token"), "--ready-file", str(ready), *flags]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        channel = grpc.insecure_channel(json.loads(ready.read_text())["address"],
                                        options=[("grpc.max_send_message_length", -1)])

        def call(payload, token=TOKEN, method=RUN):
            metadata = ((TOKEN_KEY, token),) if token else ()
            try:
                return channel.unary_unary(method)(payload, timeout=60, metadata=metadata)
            except grpc.RpcError as err:
                return err

        assert "h2" in decode(call(encode(Frame(0, {"h1": H1})))).tensors  # an honest request first
        return process, call

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def at_once(calls):
    """Run the ``calls`` (functions of no argument) in threads, all at once; return their results."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_a_worker_stays_bounded_under_decompression_bombs(worker):
    process, call = worker("--receive-codec", "none", "--receive-codec", "none+zstd-1", "--receive-codec", "none+lz4")
    before, _ = peak_mib(process.pid)
    zstd = frame_claiming("h1", (4, 16), "none+zstd-1", zstd_bomb())
    lz4_ = frame_claiming("h1", (4, 16), "none+lz4", lz4_bomb())
    assert len(zstd) < 40_000 and len(lz4_) < 5 * MIB  # 1 GiB of zeros each
    errors = at_once([lambda: call(zstd)] * 4 + [lambda: call(lz4_)] * 2)
    after, _ = peak_mib(process.pid)
    assert all(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "decompresses to more than the 256 bytes" in e.details()
               for e in errors), [e.details() for e in errors]
    assert after - before < BOUND, f"peak grew by {(after - before) / MIB:.0f} MiB"


def test_a_worker_reads_no_message_before_the_token(worker):
    process, call = worker()
    before, _ = peak_mib(process.pid)
    flood = bytes(64 * MIB)
    errors = at_once([lambda: call(flood, token=None)] * 2 + [lambda: call(flood, token="guess")] * 2)
    after, _ = peak_mib(process.pid)
    assert all(e.code() == grpc.StatusCode.UNAUTHENTICATED for e in errors)
    assert "stage 'edge.0' refused a call with no token" in errors[0].details()
    assert after - before < BOUND, f"peak grew by {(after - before) / MIB:.0f} MiB"


def test_a_worker_refuses_frames_above_its_limit_unread_and_health_reads_nothing(worker):
    process, call = worker("--max-message", str(MIB))
    before, _ = peak_mib(process.pid)
    flood = bytes(64 * MIB)
    answers = at_once([lambda: call(flood)] * 4 + [lambda: call(flood, method=HEALTH)] * 2)
    after, _ = peak_mib(process.pid)
    assert all(a.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for a in answers[:4])
    assert answers[4:] == [b"edge.0", b"edge.0"]  # Health never reads its request
    assert after - before < BOUND, f"peak grew by {(after - before) / MIB:.0f} MiB"


# --- the driver checks its inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((4, 9), np.float32), r"input 'x': got 4x9 float32, but the build was compiled for 4x8 float32"),
    (np.zeros((4, 8), np.float64), r"input 'x': got 4x8 float64, but the build was compiled for 4x8 float32"),
    (np.zeros((4, 8), ">f4"), r"input 'x': big-endian float32; convert it to little-endian"),
])
def test_the_driver_checks_inputs_before_sending_them(x, message):
    specs = [TensorSpec("x", (4, 8), "float32"), TensorSpec("b", (6,), "float32")]
    plans = [RuntimePlan.single(stagefns.STAGES)]
    with in_process(plans, stagefns.FNS, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS, specs=specs) as driver:
        good = stagefns.inputs(1)[0]
        assert set(driver.run_one(good)) == {"output.0", "output.1"}
        with pytest.raises(ManifestError, match=message):
            driver.run_one({**good, "x": x})
