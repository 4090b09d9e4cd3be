"""Region arithmetic: windows read back exactly, pooling divisors as torch computes them, runs."""

from __future__ import annotations

import operator

import models
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from partc.ir import META_SHAPE
from partc.tiling.regions import Box, Window, find_runs, plan_regions, spatial_op, split
from partc.trace import InputSpec, trace


def _gm(model: nn.Module, shape=(1, 4, 16, 16)):
    torch.manual_seed(0)
    return trace(model.eval(), [InputSpec(shape)])


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


@st.composite
def windows(draw):
    kernel = draw(st.integers(1, 7))
    dilation = draw(st.integers(1, 3))
    return Window(
        "conv",
        (kernel, draw(st.integers(1, 7))),
        (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        (draw(st.integers(0, kernel)), draw(st.integers(0, 3))),
        (dilation, draw(st.integers(1, 3))),
    )


@settings(max_examples=200, deadline=None)
@given(windows(), st.integers(1, 40), st.integers(1, 40), st.data())
def test_input_box_is_exactly_the_pixels_the_outputs_read(window, height, width, data):
    start, end = sorted(data.draw(st.lists(st.integers(0, 12), min_size=2, max_size=2, unique=True)))
    out = Box(start, end, start, end)
    box, (top, bottom, left, right) = window.input_box(out, (height, width))

    def read(dim, size):
        s, p, k, d = window.stride[dim], window.padding[dim], window.kernel[dim], window.dilation[dim]
        return sorted({o * s - p + i * d for o in range(start, end) for i in range(k)})

    rows, cols = read(0, height), read(1, width)
    assert [r for r in rows if 0 <= r < height] == [r for r in range(box.h0, box.h1) if r in rows]
    assert (box.h0 - top, box.h1 + bottom) == (rows[0], rows[-1] + 1)
    assert (box.w0 - left, box.w1 + right) == (cols[0], cols[-1] + 1)


def test_input_box_of_a_same_padded_3x3_conv_has_a_halo_of_one():
    conv = Window("conv", (3, 3), (1, 1), (1, 1))
    assert conv.input_box(Box(0, 4, 4, 8), (8, 8)) == (Box(0, 5, 3, 8), (1, 0, 0, 1))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 1, 5]),
    st.integers(5, 17),
)
def test_avg_pool_divisors_match_torch(kernel, stride, padding, ceil_mode, count_include_pad, override, size):
    padding = min(padding, kernel // 2)
    ones = torch.ones(1, 1, size, size + 1, dtype=torch.float64)
    kwargs = {"ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    sums = F.avg_pool2d(ones, kernel, stride, padding, divisor_override=1, **kwargs)
    averages = F.avg_pool2d(ones, kernel, stride, padding, divisor_override=override, **kwargs)
    window = Window("avg", (kernel, kernel), (stride, stride), (padding, padding), (1, 1), ceil_mode,
                    count_include_pad, override)  # fmt: skip
    divisors = window.divisors(Box(0, sums.shape[2], 0, sums.shape[3]), (size, size + 1))
    assert torch.equal(torch.tensor(divisors, dtype=torch.float64), (sums / averages)[0, 0].round())


def test_split_is_balanced_and_covers_the_map():
    assert split(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert split(224, 1) == [(0, 224)]


def test_squeeze_excite_splits_runs_so_that_no_path_leaves_a_run_and_comes_back():
    gm = _gm(models.squeeze_excite())
    runs = [[n.name for n in run] for run in find_runs(gm, lambda n: True)]
    assert runs == [["conv1", "relu"], ["conv2", "add"]]  # fc + sigmoid on a 1x1 map: nothing to tile


def test_find_runs_respects_the_selection():
    gm = _gm(nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()))
    runs = find_runs(gm, lambda n: n.name != "_1")
    assert [[n.name for n in run] for run in runs] == [["_0"], ["_2", "_3"]]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.cat([self.conv(x), self.bn(x)], dim=1)
        z = torch.cat([x, x], dim=3)
        return self.fc(x), y * y.mean(dim=(2, 3), keepdim=True), self.reflect(x), z, F.max_pool2d(x, 3, 2, 1, 1, True)


def test_spatial_op_describes_local_layers_and_says_why_others_are_not():
    gm = _gm(Mixed())
    bn = gm.get_submodule("bn")
    assert spatial_op(_node(gm, "conv"), gm) == Window("conv", (3, 3), (1, 1), (2, 2), (2, 2))
    assert spatial_op(_node(gm, "bn"), gm).kind == "pointwise"
    assert spatial_op(_node(gm, "cat"), gm).kind == "pointwise"
    assert spatial_op(_node(gm, "max_pool2d"), gm) == Window("max", (3, 3), (2, 2), (1, 1), (1, 1), True)
    assert "not a spatially local layer" in spatial_op(_node(gm, "fc"), gm)
    assert "broadcasts" in spatial_op(_node(gm, "mul"), gm)
    assert "padding_mode='reflect'" in spatial_op(_node(gm, "reflect"), gm)
    assert "dim 3" in spatial_op(_node(gm, "cat_1"), gm)
    bn.train()
    assert "training mode" in spatial_op(_node(gm, "bn"), gm)


def test_plan_regions_grows_halos_backwards_and_refuses_grids_finer_than_the_map():
    gm = _gm(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)))
    run = find_runs(gm, lambda n: True)[0]
    top, bottom = plan_regions(run, gm, (2, 1))
    conv0, pool, conv2 = run
    assert top.stitched[conv2] == Box(0, 4, 0, 8) and bottom.stitched[conv2] == Box(4, 8, 0, 8)
    assert top.computed[pool] == Box(0, 5, 0, 8)  # one halo row for the 3x3 conv
    assert top.computed[conv0] == Box(0, 10, 0, 16)  # the 2x2 pool doubles it
    assert bottom.inputs[_node(gm, "input_1")] == Box(5, 16, 0, 16)  # and the first conv adds one more
    assert conv0.meta[META_SHAPE] == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="8x8 map cannot be split into 9x1 tiles"):
        plan_regions(run, gm, (9, 1))


def test_arithmetic_with_scalars_is_pointwise():
    class AddScalar(nn.Module):
        def forward(self, x):
            return operator.add(F.relu(x), 1.0)

    gm = _gm(AddScalar())
    assert spatial_op(_node(gm, "add"), gm).kind == "pointwise"
