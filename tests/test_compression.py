"""partc.compression: codec measurements, effective bandwidth, calibration inputs, the compressed pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import conv_stack, residual

from partc.codec import NO_CODEC, LinkCodec, parse_codec
from partc.compression import (
    MEASURE_SAMPLES,
    calibration_inputs,
    measure_codecs,
    run_pipeline,
    top1_agreement,
)
from partc.context import Compression
from partc.errors import ClusterError
from partc.report import trace_model


def calibration_batch() -> np.ndarray:
    """A MODULE:FUNCTION calibration loader (this module is importable as test_compression)."""
    return np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)


def _conv_stack():
    return trace_model(conv_stack(), ["1,3,32,32"])


def test_effective_bandwidth():
    assert NO_CODEC.effective_bandwidth(1e6) == 1e6
    codec = LinkCodec("int8+zstd-1", ratio=5.0, encode_bytes_per_s=1e8, decode_bytes_per_s=2e8)
    assert codec.effective_bandwidth(1e6) == pytest.approx(1 / (1 / 5e6 + 1 / 1e8 + 1 / 2e8))
    assert LinkCodec("int8+zstd-1", ratio=5.0).effective_bandwidth(1e6) == 5e6
    assert LinkCodec.from_json(codec.to_json()) == codec


def test_measurements_give_ratios_per_node_and_per_cut():
    gm = _conv_stack()
    measured = measure_codecs(gm, calibration_inputs(gm, None), ["fp16", "int8", "none+zstd-1"])
    assert measured.samples == 1
    assert measured.names == tuple(n.name for n in gm.graph.nodes if n.op != "output")
    conv = measured.names.index("_0")  # 1x8x32x32 float32
    assert measured.raw[conv] == 8 * 32 * 32 * 4
    assert measured.wire["fp16"][conv] == measured.raw[conv] / 2
    assert measured.wire["int8"][conv] == measured.raw[conv] / 4 + 8  # one scale and zero point
    mask = np.arange(len(measured.names)) == conv
    entry = measured.entry("int8", mask)
    assert entry.codec == "int8" and entry.ratio == pytest.approx(8192 * 4 / (8192 + 8))
    assert entry.encode_bytes_per_s > 0 and entry.decode_bytes_per_s > 0
    assert entry.agreement is None and entry.samples == 1
    assert measured.entry("none", mask) == LinkCodec(samples=1)
    assert measured.entry("int8", np.zeros(len(mask), dtype=bool)).codec == "none"  # nothing crosses


def test_lossless_codecs_are_bit_exact_across_two_links():
    gm = trace_model(residual(), ["1,8,16,16"])
    names = [n.name for n in gm.graph.nodes]
    # x stays on tier 0 and its skip connection crosses both links to the add on tier 2.
    tiers = {name: 0 if name == "x" else 1 if name in ("conv1", "relu") else 2 for name in names}
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = gm(x)
    for codec in ("none", "none+zstd-1", "none+zstd-3", "none+lz4"):
        (out,) = run_pipeline(gm, tiers, [codec, codec], [(x,)])
        assert torch.equal(out, expected), codec
    (lossy,) = run_pipeline(gm, tiers, ["int8", "none"], [(x,)])
    assert not torch.equal(lossy, expected)


def test_lossy_crossing_stays_within_the_codec_bound():
    gm = _conv_stack()
    tiers = {n.name: int(n.op == "output") for n in gm.graph.nodes}  # the result itself crosses the link
    x = calibration_inputs(gm, None)[0]
    expected = gm(*x).detach().numpy()
    for name in ("fp16", "int8", "int8c+zstd-1", "int8+lz4"):
        (out,) = run_pipeline(gm, tiers, [name], [x])
        error = float(np.abs(out.numpy() - expected).max())
        assert error <= parse_codec(name).max_error(expected), name
        assert error > 0 or name.startswith("int8c")  # per channel: each of the 10 scores is its own channel


def test_top1_agreement_counts_rows():
    ref = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[3.0, 2.0]])]
    out = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[3.0, 2.5]])]
    assert top1_agreement(ref, out) == pytest.approx(2 / 3)


def test_calibration_from_npy_and_loader(tmp_path):
    gm = _conv_stack()
    batch = calibration_batch()
    np.save(tmp_path / "calib.npy", batch)
    calls = calibration_inputs(gm, Compression(0.99, str(tmp_path / "calib.npy")))
    assert len(calls) == 6 and calls[0][0].shape == (1, 3, 32, 32)
    assert torch.equal(calls[5][0], torch.from_numpy(batch[5:6]))
    loaded = calibration_inputs(gm, Compression(0.99, "test_compression:calibration_batch"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calls, loaded, strict=True))
    assert len(measure_codecs(gm, calls * 4, ["int8"]).names) == len(gm.graph.nodes) - 1
    assert measure_codecs(gm, calls * 4, ["int8"]).samples == MEASURE_SAMPLES == 8


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((4, 3, 16, 16), np.float32), "input 0 has shape (4, 3, 16, 16); expected (SAMPLES, 3, 32, 32)"),
        (np.zeros((0, 3, 32, 32), np.float32), "0 samples is not a positive multiple of the traced batch size 1"),
    ],
)
def test_calibration_that_does_not_fit(tmp_path, batch, message):
    np.save(tmp_path / "calib.npy", batch)
    with pytest.raises(ClusterError) as info:
        calibration_inputs(_conv_stack(), Compression(0.99, str(tmp_path / "calib.npy")), "cluster.yaml")
    assert str(info.value).startswith(f"cluster.yaml: compression.calibration: {message}")
    with pytest.raises(ClusterError, match="cluster.yaml: compression.calibration: cannot import nope:f"):
        calibration_inputs(_conv_stack(), Compression(0.99, "nope:f"), "cluster.yaml")
