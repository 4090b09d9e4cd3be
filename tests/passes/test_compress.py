"""compress-cut-tensors: the cut and each link's codec chosen together, lossy codecs held to the budget."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from clusters import three_tier
from models import conv_stack, sparse
from torch import nn

from partc.cluster import load_cluster
from partc.codec import NO_CODEC, LinkCodec
from partc.compression import calibration_inputs, run_pipeline, top1_agreement
from partc.context import CompileContext, Link, Tier
from partc.ir import META_LINK_CODECS, META_PROFILE, META_TIER
from partc.passes import DEFAULT_PIPELINE, PASSES, passes_named
from partc.passes.compress import compress_cut_tensors
from partc.passes.cut import select_cuts
from partc.pipeline import run_passes
from partc.report import trace_model


def _tiers(gm) -> dict[str, str]:
    return {n.name: n.meta[META_TIER] for n in gm.graph.nodes}


def _indices(gm, ctx) -> dict[str, int]:
    return {name: ctx.tier_names.index(tier) for name, tier in _tiers(gm).items()}


def _two_tier(tmp_path, bandwidth: str, codecs: str, pin: str, compression: str = "") -> CompileContext:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"""\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: cloud, bandwidth: {bandwidth}, latency: 5ms, codecs: {codecs}}}
constraints:
  pin: {pin}
"""
        + (f"compression: {compression}\n" if compression else "")
    )
    return load_cluster(path)


def test_registered_after_select_cuts():
    assert PASSES["compress-cut-tensors"].run is compress_cut_tensors
    assert DEFAULT_PIPELINE.names[1:3] == ("select-cuts", "compress-cut-tensors")


def test_only_none_changes_nothing(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(three_tier())
    ctx = load_cluster(path)
    gm = run_passes(trace_model(conv_stack(), ["1,3,32,32"]), passes_named(["annotate-profile", "select-cuts"]), ctx)
    out = compress_cut_tensors(gm, ctx)
    assert _tiers(out.gm) == _tiers(gm)
    # nothing measured: the model was not run
    assert out.gm.meta[META_LINK_CODECS] == dict.fromkeys(("device->edge", "edge->cloud"), NO_CODEC)
    assert META_LINK_CODECS not in gm.meta
    assert out.summary == "every link allows only codec none: tensors cross raw"


# --- a CNN trained on scikit-learn's 8x8 digits ------------------------------------------------------

CONV = ["conv1", "relu1", "conv2", "relu2", "pool"]
HEAD = ["fc1", "relu3", "fc2"]


@pytest.fixture(scope="module")
def digits():
    """(traced model, test images, test labels): a small CNN trained for a few seconds, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(512, 64),
            relu3=nn.ReLU(), fc2=nn.Linear(64, 10),
        )
    )
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    order = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is as fast, and 6x faster than two on a busy machine
    try:
        for _ in range(6):
            perm = torch.randperm(len(xs), generator=order)
            for start in range(0, len(xs), 64):
                batch = perm[start : start + 64]
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return trace_model(model.eval(), ["1,1,8,8"]), x_test, y_test


def _accuracy(outputs, labels) -> float:
    return float(np.mean([int(out.argmax()) == label for out, label in zip(outputs, labels, strict=True)]))


def test_digits_int8_zstd_keeps_top1_and_shrinks_the_cut(tmp_path, digits, record_property):
    gm, images, labels = digits
    np.save(tmp_path / "calib.npy", images)
    pin = f"{{device: [{', '.join(CONV)}], cloud: [{', '.join(HEAD)}]}}"
    ctx = _two_tier(
        tmp_path, "100kbit/s", "[none, int8+zstd-1]", pin, "{budget: 0.99, calibration: calib.npy}"
    )
    out = run_passes(gm, passes_named(["annotate-profile", "select-cuts", "compress-cut-tensors"]), ctx)
    entry = out.meta[META_LINK_CODECS]["device->cloud"]
    assert isinstance(entry, LinkCodec)
    assert entry.codec == "int8+zstd-1"
    assert entry.ratio >= 4  # the 32x4x4 float32 cut tensor: 2,048 bytes, int8 alone gives 3.94x
    assert entry.agreement >= 0.99 and entry.samples == len(images) == 450
    assert [n for n, t in _tiers(out).items() if t == "device"][:6] == ["input_1", *CONV]  # (+ flatten, free)
    assert {t for n, t in _tiers(out).items() if n in HEAD} == {"cloud"}
    calls = calibration_inputs(out, ctx.compression, ctx.source)
    reference = run_pipeline(out, _indices(out, ctx), ["none"], calls)
    compressed = run_pipeline(out, _indices(out, ctx), [entry.codec], calls)
    assert top1_agreement(reference, compressed) == entry.agreement
    accuracy = (_accuracy(reference, labels), _accuracy(compressed, labels))
    record_property("digits_accuracy_uncompressed_vs_int8_zstd", accuracy)
    print(f"digits: test accuracy {accuracy[0]:.4f} uncompressed, {accuracy[1]:.4f} with int8+zstd-1; "
          f"top-1 agreement {entry.agreement:.4f}; cut tensor {entry.ratio:.2f}x smaller")
    assert accuracy[0] > 0.9 and abs(accuracy[0] - accuracy[1]) <= 0.01


# --- a model with an outlier feature: per-tensor int8 cannot keep top-1 -----------------------------


class Outlier(nn.Module):
    """A CNN whose channel 0 after conv1 is 1000x larger than the others (and scaled back down by conv2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.conv1.weight[0] *= 1000
            self.conv1.bias[0] = 1000
            self.conv2.weight[:, 0] /= 1000

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv2(self.relu(self.conv1(x))))))


def test_a_budget_the_codec_cannot_meet_is_refused(tmp_path):
    torch.manual_seed(0)
    gm = trace_model(Outlier().eval(), ["1,3,8,8"])
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32))
    compression = "{budget: 0.99, calibration: calib.npy}"
    pin = "{device: [conv1, relu], cloud: [conv2, pool, flatten, fc]}"
    ctx = _two_tier(tmp_path, "10kbit/s", "[none, none+zstd-1, int8]", pin, compression)
    cut = run_passes(gm, passes_named(["annotate-profile", "select-cuts"]), ctx)
    out = compress_cut_tensors(cut, ctx)
    # Per tensor, the outlier channel takes all 255 steps: the other channels round to a few levels.
    entry = out.gm.meta[META_LINK_CODECS]["device->cloud"]
    assert entry.codec in ("none", "none+zstd-1") and entry.agreement is None
    assert _tiers(out.gm) == _tiers(cut)
    assert "; refused: device->cloud int8 (4.0x): agreement 0.8550 < 0.99" in out.summary
    # Per channel, the outlier has its own scale: int8c keeps top-1 and is taken.
    ctx = _two_tier(tmp_path, "10kbit/s", "[none, int8, int8c]", pin, compression)
    out = compress_cut_tensors(cut, ctx)
    entry = out.gm.meta[META_LINK_CODECS]["device->cloud"]
    assert entry.codec == "int8c" and entry.agreement == 1.0 and entry.samples == 200
    assert "refused: device->cloud int8 (4.0x): agreement 0.8550 < 0.99" in out.summary


# --- the joint choice: a slow link moves the cut to a compressible tensor ---------------------------


def _sparse():
    """The traced model with profiles: conv2 costs 100 ms on the device, every other node 1 ms; 0.1 ms in the cloud."""
    gm = trace_model(sparse(), ["1,4,32,32"])
    for node in gm.graph.nodes:
        free = node.op in ("placeholder", "output")
        node.meta[META_PROFILE] = {"device": 0.0 if free else 0.1 if node.name == "conv2" else 1e-3,
                                   "cloud": 0.0 if free else 1e-4}
    return gm


@pytest.mark.parametrize(
    ("bandwidth", "codec", "device_nodes"),
    [
        (1e6 / 8, "none+zstd-1", ["x", "conv1", "relu"]),  # 1 Mbit/s: send the sparse ReLU output, compressed
        (1e9 / 8, "none", ["x"]),  # 1 Gbit/s: send the input raw; encoding would cost more than it saves
    ],
)
def test_the_link_speed_decides_cut_and_codec_together(bandwidth, codec, device_nodes):
    ctx = CompileContext(
        (Tier("device", "rpi4", "torchscript"), Tier("cloud", "cloud-cpu", "onnx")),
        (Link("device", "cloud", bandwidth, 1e-3, ("none", "none+zstd-1")),),
    )
    gm = _sparse()
    cut = select_cuts(gm, ctx).gm
    out = compress_cut_tensors(cut, ctx)
    assert [n for n, t in _tiers(out.gm).items() if t == "device"] == device_nodes
    entry = out.gm.meta[META_LINK_CODECS]["device->cloud"]
    assert entry.codec == codec and entry.agreement is None and entry.samples == 1
    if codec == "none":
        assert _tiers(out.gm) == _tiers(cut) and "cut kept" in out.summary
    else:  # uncompressed, the 64 kB ReLU output costs 0.5 s: select-cuts kept conv2 on the device
        assert _tiers(cut)["conv2"] == "device" and "cut moved" in out.summary
        assert entry.ratio > 5
    assert all(META_TIER not in n.meta for n in gm.graph.nodes)
    x = calibration_inputs(gm, None)
    assert torch.equal(run_pipeline(out.gm, _indices(out.gm, ctx), [codec], x)[0], gm(*x[0]))


# --- resnet18 through the default pipeline ---------------------------------------------------------


@pytest.mark.slow
def test_resnet18_three_tiers(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    gm = trace_model(resnet18(weights=None).eval(), ["1,3,64,64"])
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32))
    # the stem on the device, layer1 on the edge: the maxpool output (64 kB) crosses the 2 Mbit/s uplink
    text = three_tier(pin="{device: [conv1, bn1, relu, maxpool], edge: [layer1.0.conv1]}",
                      uplink="2Mbit/s, latency: 5ms")
    text = text.replace("latency: 20ms}", "latency: 20ms, codecs: [none, none+zstd-1, fp16+zstd-1, int8+zstd-1]}")
    text = text.replace("latency: 5ms}", "latency: 5ms, codecs: [none, int8+zstd-1]}")
    path = tmp_path / "cluster.yaml"
    path.write_text(text + "compression: {budget: 0.75, calibration: calib.npy}\n")
    ctx = load_cluster(path)
    out = run_passes(gm, DEFAULT_PIPELINE.model, ctx)
    entries = out.meta[META_LINK_CODECS]
    assert set(entries) == {"device->edge", "edge->cloud"}
    assert all(isinstance(e, LinkCodec) for e in entries.values())
    codecs = [entries[link].codec for link in ("device->edge", "edge->cloud")]
    calls = calibration_inputs(out, ctx.compression, ctx.source)
    reference = run_pipeline(out, _indices(out, ctx), ["none", "none"], calls)
    agreement = top1_agreement(reference, run_pipeline(out, _indices(out, ctx), codecs, calls))
    if any(e.agreement is not None for e in entries.values()):
        assert agreement == entries["device->edge"].agreement >= 0.75
    else:
        assert agreement == 1.0
    assert entries["device->edge"].codec == "int8+zstd-1" and entries["device->edge"].ratio > 4
