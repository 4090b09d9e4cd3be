"""partc.compression: codec measurements, codec speeds and effective bandwidth, calibration inputs, the
compressed pipeline, and builds that compress: the same bytes every time, speeds of the link's targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from clusters import two_tier
from models import conv_stack, residual

from partc.build import compile_model
from partc.codec import NO_CODEC, LinkCodec, parse_codec
from partc.compression import (
    MEASURE_SAMPLES,
    calibration_inputs,
    measure_codecs,
    run_pipeline,
    top1_agreement,
)
from partc.context import Compression
from partc.costmodel import CodecRate, codec_rates, dispatch_scale, load_calibration
from partc.errors import ClusterError, PartcError
from partc.report import trace_model
from partc.targets import TARGETS


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
    entry = measured.entry(LinkCodec("int8", encode_bytes_per_s=1e8, decode_bytes_per_s=2e8), mask)
    assert entry.codec == "int8" and entry.ratio == pytest.approx(8192 * 4 / (8192 + 8))
    assert (entry.encode_bytes_per_s, entry.decode_bytes_per_s) == (1e8, 2e8)  # the link's, not timed
    assert entry.agreement is None and entry.samples == 1
    assert measured.entry(NO_CODEC, mask) == LinkCodec(samples=1)
    assert measured.entry(LinkCodec("int8"), np.zeros(len(mask), dtype=bool)).codec == "none"  # nothing crosses


def test_codec_speeds_are_the_calibrated_stages_scaled_to_each_end():
    rpi4, x86 = TARGETS["rpi4"], TARGETS["edge-x86"]
    cal = load_calibration()
    stages = {"int8": CodecRate(4e9, 8e9), "zstd-1": CodecRate(2e8, 5e8), "lz4": CodecRate(3e8, 1e9)}
    cal = replace(cal, codecs=stages)
    ref = cal.reference
    assert codec_rates(cal, "int8+zstd", ref, ref) == pytest.approx(
        (1 / (1 / 4e9 + 0.25 / 2e8), 1 / (1 / 8e9 + 0.25 / 5e8))
    )
    encode, decode = codec_rates(cal, "int8+lz4", rpi4, x86)  # encoded on the Pi, decoded on the x86
    assert encode == pytest.approx(1 / (1 / 4e9 + 0.25 / 3e8) / dispatch_scale(ref, rpi4))
    assert decode == pytest.approx(1 / (1 / 8e9 + 0.25 / 1e9) / dispatch_scale(ref, x86))
    assert codec_rates(cal, "none", rpi4, x86) == (None, None)
    with pytest.raises(PartcError, match=r"calibration: codecs: no speed for codec stage 'fp16' \(of fp16\+zstd-1\)"):
        codec_rates(cal, "fp16+zstd", rpi4, x86)


def test_the_shipped_calibration_prices_every_codec_name():
    cal = load_calibration()
    packs = ["", "+lz4", *(f"+zstd-{level}" for level in range(1, 23))]
    for name in (
        quant + pack for quant in ("none", "fp16", "int8", "int8c") for pack in packs if quant + pack != "none"
    ):
        encode, decode = codec_rates(cal, name, TARGETS["rpi4"], TARGETS["cloud-cpu"])
        assert 0 < encode < decode < float("inf"), name  # decoding is faster, and on the faster machine


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


COMPRESSING = two_tier("bandwidth: 1Mbit/s, latency: 1ms, codecs: [none, none+zstd-1]") + (
    "constraints:\n  pin: {device: [conv1], cloud: [conv2]}\n"  # a 16x32x32 feature map crosses: compression pays
)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _link_codec(build) -> dict:
    return json.loads((build.path / "manifest.json").read_text())["cluster"]["links"][0]["codec"]


def test_compiling_a_compressing_cluster_twice_gives_identical_bytes(tmp_path):
    """Two ``partc compile`` runs, as a build system makes them (a process each, other hash seeds): the
    codec's ratio is measured, its speeds priced, nothing timed, so every file is the same."""
    (tmp_path / "cluster.yaml").write_text(COMPRESSING)
    model, cluster = f"{Path(__file__).parent / 'models.py'}:sparse", str(tmp_path / "cluster.yaml")
    for run in ("1", "2"):
        argv = ["compile", model, "--input-shape", "1,4,32,32", "--cluster", cluster, "-o", str(tmp_path / run / "b")]
        command = [sys.executable, "-m", "partc.cli", *argv, "-q"]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": run})
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = (_files(tmp_path / run / "b") for run in ("1", "2"))
    assert first.keys() == second.keys() and "manifest.json" in first
    assert [name for name in first if first[name] != second[name]] == []
    codec = json.loads(first["manifest.json"])["cluster"]["links"][0]["codec"]
    assert codec["codec"] == "none+zstd-1" and codec["encode_bytes_per_s"] > 0


def test_a_slower_sender_encodes_slower_by_its_dispatch_scale(tmp_path):
    """The same cluster, the sending tier on rpi4 or on edge-x86: the link's encode speed in the manifest
    follows the sender by exactly the cost model's single-thread ratio; decoding stays the receiver's."""
    entries = {}
    for sender in ("rpi4", "edge-x86"):
        path = tmp_path / f"{sender}.yaml"
        path.write_text(
            COMPRESSING.replace("codecs: [none, none+zstd-1]", "codecs: [none+zstd-1]").replace(
                "target: rpi4", f"target: {sender}"
            )
        )
        entries[sender] = _link_codec(compile_model("tests/models.py:sparse", ["1,4,32,32"], path, tmp_path / sender))
    assert entries["rpi4"]["codec"] == entries["edge-x86"]["codec"] == "none+zstd-1"
    reference = load_calibration().reference
    slower = dispatch_scale(reference, TARGETS["rpi4"]) / dispatch_scale(reference, TARGETS["edge-x86"])
    assert slower > 1
    assert entries["edge-x86"]["encode_bytes_per_s"] / entries["rpi4"]["encode_bytes_per_s"] == pytest.approx(slower)
    assert entries["edge-x86"]["decode_bytes_per_s"] == entries["rpi4"]["decode_bytes_per_s"]
