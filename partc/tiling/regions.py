"""Region arithmetic for vertical tiling: which part of each feature map every tile needs.

A *run* is a set of spatially local nodes (convolutions, pooling, batch norm, element-wise
activations, same-shape element-wise arithmetic, channel concatenation) through which each
output pixel depends only on a bounded window of input pixels. Tiling a run splits its
outputs into an R x C grid and walks the run backwards: a layer with kernel k, stride s,
padding p and dilation d needs, for output rows [a, b), the input rows

    [a*s - p, (b-1)*s - p + (k-1)*d + 1)

clamped to the real map; what lies outside is implicit padding that the tile must add
itself, and only at true image borders. A node read by several consumers in the run is
computed over the union (bounding box) of what they read, so one tile goes through the
whole run without exchanging halos.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from partc.ir import META_FLOPS, META_SHAPE


class Box(NamedTuple):
    """A half-open rectangle ``[h0, h1) x [w0, w1)`` of a feature map's H and W."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def area(self) -> int:
        """Number of pixels in the box."""
        return (self.h1 - self.h0) * (self.w1 - self.w0)

    def union(self, other: Box | None) -> Box:
        """Return the bounding box of ``self`` and ``other`` (``self`` when ``other`` is None)."""
        if other is None:
            return self
        return Box(min(self.h0, other.h0), max(self.h1, other.h1), min(self.w0, other.w0), max(self.w1, other.w1))


@dataclass(frozen=True)
class Window:
    """How a spatially local node maps output pixels to input pixels, per (H, W).

    Attributes:
        kind: "conv", "max", "avg" (sliding windows) or "pointwise" (a 1x1 window that
            reads every input at the output's own pixels: norms, activations, add, cat).
        kernel, stride, dilation: per dimension.
        padding: implicit padding before the first row and column; the padding after is
            whatever the last window reaches beyond the map (ceil_mode, 'same').
        ceil_mode: pooling only; a tile re-derives it from the output size it must produce.
        count_include_pad, divisor_override: average pooling only.
    """

    kind: str
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    def input_box(self, out: Box, size: tuple[int, int]) -> tuple[Box, tuple[int, int, int, int]]:
        """Return the input box that output box ``out`` reads, clamped to a map of ``size``
        (H, W), and the implicit padding left at true borders as (top, bottom, left, right)."""
        (h0, h1), (w0, w1) = (self._span(0, out.h0, out.h1), self._span(1, out.w0, out.w1))
        height, width = size
        pads = (max(0, -h0), max(0, h1 - height), max(0, -w0), max(0, w1 - width))
        return Box(max(h0, 0), min(h1, height), max(w0, 0), min(w1, width)), pads

    def _span(self, dim: int, start: int, end: int) -> tuple[int, int]:
        s, p, k, d = self.stride[dim], self.padding[dim], self.kernel[dim], self.dilation[dim]
        return start * s - p, (end - 1) * s - p + (k - 1) * d + 1

    def divisors(self, out: Box, size: tuple[int, int]) -> list[list[int]]:
        """Return, for average pooling, the divisor of every output pixel in ``out`` exactly as
        ``torch.nn.functional.avg_pool2d`` computes it on a map of ``size`` (H, W)."""
        rows = [self._divisor(0, i, size[0]) for i in range(out.h0, out.h1)]
        cols = [self._divisor(1, j, size[1]) for j in range(out.w0, out.w1)]
        if self.divisor_override:
            return [[self.divisor_override] * len(cols) for _ in rows]
        return [[r * c for c in cols] for r in rows]

    def _divisor(self, dim: int, index: int, size: int) -> int:
        start = index * self.stride[dim] - self.padding[dim]
        end = min(start + self.kernel[dim], size + self.padding[dim])
        if self.count_include_pad:
            return end - start
        return min(end, size) - max(start, 0)


POINTWISE = Window("pointwise")

_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
)  # fmt: skip
_POINTWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, F.hardtanh, F.silu, F.gelu, F.leaky_relu,
    F.elu, F.mish, torch.sigmoid, torch.tanh, F.dropout,
)  # fmt: skip
_ARITHMETIC = (
    operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
    operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
)  # fmt: skip
_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def spatial_op(node: fx.Node, gm: fx.GraphModule) -> Window | str:
    """Return how ``node`` maps output to input pixels, or why it is not spatially local.

    Reads meta[META_SHAPE] of the node and its inputs.
    """
    shape = node.meta.get(META_SHAPE)
    if node.op not in ("call_module", "call_function"):
        return f"a {node.op} node is not a layer"
    if shape is None or len(shape) != 4:
        return f"its output is not one 4-d (N, C, H, W) tensor but {shape}"
    inputs = node.all_input_nodes
    if not inputs or any(len(i.meta.get(META_SHAPE) or ()) != 4 or i.meta[META_SHAPE][0] != shape[0] for i in inputs):
        return "its inputs are not all 4-d feature maps of the same batch"
    window = _module_window(gm.get_submodule(node.target)) if node.op == "call_module" else _function_window(node)
    if isinstance(window, str):
        return window
    if window.kind != "pointwise":
        return window if len(inputs) == 1 else "it reads more than one feature map"
    if node.target in _ARITHMETIC and any(i.meta[META_SHAPE] != shape for i in inputs):
        return "it broadcasts one operand over another (not an element-wise op of same-shape maps)"
    if any(i.meta[META_SHAPE][2:] != shape[2:] for i in inputs):
        return "its inputs differ from its output in height or width"
    return window


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Return whether ``node`` overwrites its input (``inplace=True`` or ``+=``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    return node.target in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace", False))


def _module_window(mod: nn.Module) -> Window | str:
    name = type(mod).__name__
    if type(mod) in _POINTWISE_MODULES:
        if mod.training and isinstance(mod, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)):
            return f"{name} in training mode mixes pixels; call model.eval()"
        if isinstance(mod, nn.BatchNorm2d) and mod.running_mean is None:
            return f"{name} without running statistics normalises over the whole map"
        return POINTWISE
    if type(mod) is nn.Conv2d:
        if mod.padding_mode != "zeros":
            return f"Conv2d with padding_mode={mod.padding_mode!r} is not supported; only 'zeros'"
        return Window("conv", mod.kernel_size, mod.stride, _conv_padding(mod), mod.dilation)
    if type(mod) is nn.MaxPool2d:
        if mod.return_indices:
            return "MaxPool2d with return_indices=True is not supported"
        return _pool_window("max", mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    if type(mod) is nn.AvgPool2d:
        return _pool_window(
            "avg", mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode,
            mod.count_include_pad, mod.divisor_override,
        )  # fmt: skip
    return f"{name} is not a spatially local layer"


def _function_window(node: fx.Node) -> Window | str:
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in _ARITHMETIC:
        scalars = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
        ok = all(isinstance(a, (int, float)) for a in scalars)
        return POINTWISE if ok else f"{name} with non-scalar constant operands is not supported"
    if node.target is F.dropout:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return "dropout with training=True mixes randomness per call" if training else POINTWISE
    if node.target in _POINTWISE_FUNCTIONS:
        return POINTWISE
    if node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return POINTWISE if dim in (1, -3) else f"cat along dim {dim} (only channels, dim=1, is supported)"
    if node.target in (F.max_pool2d, F.avg_pool2d):
        kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        if node.target is F.max_pool2d:
            if kw["return_indices"]:
                return "max_pool2d with return_indices=True is not supported"
            return _pool_window("max", kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"], kw["ceil_mode"])
        return _pool_window(
            "avg", kw["kernel_size"], kw["stride"], kw["padding"], 1, kw["ceil_mode"],
            kw["count_include_pad"], kw["divisor_override"],
        )  # fmt: skip
    return f"{name} is not a spatially local operation"


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        return tuple((d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return _pair(conv.padding)


def _pool_window(kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad=True, divisor=None) -> Window:
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, [], ()) else kernel
    return Window(kind, kernel, stride, _pair(padding), _pair(dilation), bool(ceil_mode), count_include_pad, divisor)


def split(size: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(size)`` into ``parts`` contiguous, balanced, half-open intervals."""
    bounds = [i * size // parts for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def hw(node: fx.Node) -> tuple[int, int]:
    """Return the (H, W) of a 4-d node's output. Reads meta[META_SHAPE]."""
    return node.meta[META_SHAPE][2], node.meta[META_SHAPE][3]


def run_outputs(run: Sequence[fx.Node]) -> list[fx.Node]:
    """Return the nodes of ``run`` whose value is read outside it, in graph order."""
    members = set(run)
    return [n for n in run if any(u not in members for u in n.users)]


@dataclass(frozen=True)
class TileRegions:
    """What one tile of a run computes.

    Attributes:
        computed: run node -> box of its output the tile computes (absent: not needed).
        inputs: node outside the run -> box of it the tile reads.
        stitched: run output -> the box of it this tile contributes to the stitched map.
    """

    computed: dict[fx.Node, Box]
    inputs: dict[fx.Node, Box]
    stitched: dict[fx.Node, Box]


def plan_regions(run: Sequence[fx.Node], gm: fx.GraphModule, grid: tuple[int, int]) -> list[TileRegions]:
    """Return the regions of every tile of ``run`` (in graph order) for an R x C ``grid``,
    tiles in row-major order. Every run output is split into the same balanced grid.

    Raises:
        ValueError: if a run output is smaller than the grid, or a node is not spatially local.
    """
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"a {rows}x{cols} grid has no tiles")
    members = set(run)
    outputs = run_outputs(run)
    windows = {}
    for n in run:
        windows[n] = spatial_op(n, gm)
        if isinstance(windows[n], str):
            raise ValueError(f"{n.name}: {windows[n]}")
    for o in outputs:
        if hw(o)[0] < rows or hw(o)[1] < cols:
            raise ValueError(f"{o.name}: its {hw(o)[0]}x{hw(o)[1]} map cannot be split into {rows}x{cols} tiles")
    tiles = []
    for i in range(rows):
        for j in range(cols):
            stitched = {}
            for o in outputs:
                (h0, h1), (w0, w1) = split(hw(o)[0], rows)[i], split(hw(o)[1], cols)[j]
                stitched[o] = Box(h0, h1, w0, w1)
            need: dict[fx.Node, Box] = dict(stitched)
            for n in reversed(run):
                if n in need:
                    for source in n.all_input_nodes:
                        box = windows[n].input_box(need[n], hw(source))[0]
                        need[source] = box.union(need.get(source))
            computed = {n: need[n] for n in run if n in need}
            inputs = {n: box for n, box in need.items() if n not in members}
            tiles.append(TileRegions(computed, inputs, stitched))
    return tiles


def tile_flops(run: Sequence[fx.Node], regions: Sequence[TileRegions]) -> tuple[int, ...]:
    """Return each tile's FLOPs: every node's META_FLOPS scaled by the share of its map computed.

    Reads meta[META_FLOPS] and meta[META_SHAPE].
    """
    return tuple(
        round(sum(n.meta[META_FLOPS] * box.area / math.prod(hw(n)) for n, box in tile.computed.items()))
        for tile in regions
    )


def reentry(run: Sequence[fx.Node]) -> fx.Node | None:
    """Return a node outside ``run`` on a path that leaves ``run`` and comes back into it,
    or None when there is none (``run`` is convex and can be replaced as one block)."""
    members = set(run)
    frontier = [u for n in run for u in n.users if u not in members]
    seen = set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user in members:
                return node
            frontier.append(user)
    return None


def find_runs(gm: fx.GraphModule, select: Callable[[fx.Node], bool]) -> list[list[fx.Node]]:
    """Return the maximal convex runs of spatially local nodes among those ``select`` accepts.

    Convex: no path leaves a run and comes back into it, so each run can be replaced by
    one scatter -> tiles -> gather block. Nodes are taken in graph order; a node joins the
    runs of its local inputs unless a path from that run reaches it through a node
    outside the run. Runs without a convolution or pooling window over a map larger
    than 1x1 are dropped: tiling them only adds copies. Each run is in graph order;
    runs are ordered by their first node.
    """
    parent: list[int] = []
    left_by_run: list[set[int]] = []  # runs with a path into this run that leaves them first
    run_of: dict[fx.Node, int] = {}
    left: dict[fx.Node, set[int]] = {}  # runs with a path to this node that leaves them first

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    def canonical(runs: set[int]) -> set[int]:
        return {find(r) for r in runs}

    for n in gm.graph.nodes:
        entering = canonical(set().union(*(left[i] for i in n.all_input_nodes)))
        joined: list[int] = []
        local = select(n) and isinstance(spatial_op(n, gm), Window)
        for source in n.all_input_nodes:
            if source not in run_of:
                continue
            r = find(run_of[source])
            if (
                local
                and r not in entering
                and r not in joined
                and all(r not in canonical(left_by_run[q]) and q not in canonical(left_by_run[r]) for q in joined)
            ):
                joined.append(r)
            elif r not in joined:
                entering.add(r)
        left[n] = entering
        if not local:
            continue
        if not joined:
            parent.append(len(parent))
            left_by_run.append(set())
            joined.append(parent[-1])
        for r in joined[1:]:
            parent[r] = joined[0]
            left_by_run[joined[0]] |= left_by_run[r]
        left_by_run[joined[0]] |= entering
        run_of[n] = joined[0]
    runs: dict[int, list[fx.Node]] = {}
    for n, r in run_of.items():
        runs.setdefault(find(r), []).append(n)
    return [run for run in runs.values() if any(spatial_op(n, gm).kind != "pointwise" and hw(n) != (1, 1) for n in run)]
