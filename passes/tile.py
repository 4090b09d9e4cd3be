"""Vertical tiling (``tile-conv-stages``): spatially local runs as parallel tiles with halos.

Each maximal run of spatially local layers (see ``partc.tiling.regions``) on a tier that can
tile is cut into consecutive parts, and each part worth tiling is rewritten into: slice
every part input into overlapping tiles -> per-tile copies of the part's layers, padding
only at true image borders -> crop each tile's outputs to its share -> stitch
(``torch.cat`` along W, then H). The copies share the original weights: norms and
activations call the same modules, and each convolution calls one padding-free twin
module (``<conv>_unpadded``) holding the same parameter objects. The result equals the
untiled one. Each tiled part is a run of its own (its index is ``META_TILE[0]``); tile t runs on
node t of the tier (stage ``<tier>.<t>``), and node 0 coordinates: it slices the inputs,
sends tiles 1.. to the other nodes, computes tile 0, gathers and stitches.

A tier can tile when it has ``nodes`` > 1 and the cluster file has a link from it to
itself (``{from: edge, to: edge, ...}``: the network between its nodes). A tier with
several nodes but no such link is not tiled and the summary says so: without one there
is no unit to price scatter and gather in, and partc does not guess bandwidths.

Cost model (``partc.tiling.split``; a tiled step is priced by
``partc.partition.price.tiled_step_seconds``). A node's seconds ``s(n)`` are its ``META_PROFILE[tier]``
when every node has one, else the cost model's prediction (``partc.costmodel``) for the
tier's target. A part tiled with an R x C grid, T = R*C tiles, on a tier whose self-link
moves ``b`` bytes in ``link(b) = latency + b / bandwidth`` seconds::

    c_t = sum of s(n) * |box_t(n)| / |map(n)| over the nodes n tile t computes
    x_t = call + link(bytes tile t reads of the part's inputs)  (META_BYTES x share of the map)
    y_t = link(bytes tile t contributes to the part's outputs)
    D_t = x_1 + ... + x_t + c_t                                (tile t >= 1 is done)
    G   = for t >= 1 by increasing D_t:  G = max(G, D_t) + y_t   (from G = 0)
    latency = max(c_0, G)

The tiles compute in parallel, one per node, as ``partc.tiling.schedule`` runs them: tile 0 on
the coordinator while it scatters, but the coordinator's link moves one tile at a time:
it sends tiles 1..T-1 their inputs one after the other (each transfer paying the link's
latency, each call ``partc.partition.price.CALL_SECONDS`` of fixed cost), and receives their
outputs one after the other, the first done first. An untiled part costs the sum of its
``s(n)``; a run costs the sum of its parts (consecutive tiled parts gather to the
coordinator and scatter again). Not counted: the crops, pads
and stitches (memory copies; on resnet18 the stitches, the coordinator's own sequential
work, come to about 1% of the tiled latency), and a layer's per-call overhead, which each
tile's copy pays in full but the model scales by the copy's share like the rest.

Splitting. Halos grow with depth, so tiling a whole network as one run multiplies its
FLOPs (e.g. resnet18 at 224x224, 1x2: +84%). ``partc.tiling.split_run`` chooses the parts
of each maximal run and the grid of each (1x1, untiled, or any R x C with R*C <= nodes,
ties to fewer tiles) that minimise the run's predicted latency: a dynamic program over
every cut point in graph order, exact under the model. Any contiguous stretch of a convex
run is convex, so every part is a valid run; a cut may cross several tensors (inside a
residual block, both the block input and the branch), each gathered and scattered.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import fx, nn

from partc.context import CompileContext
from partc.costmodel import load_calibration, predict_graph
from partc.errors import PartcError, UnsupportedLayerError
from partc.ir import (
    META_BYTES,
    META_FLOPS,
    META_OP,
    META_PARALLEL,
    META_PROFILE,
    META_TIER,
    META_TILE,
    clone,
    compute_nodes,
)
from partc.partition.model import link_price
from partc.pipeline import PassResult
from partc.targets import target
from partc.tiling.regions import (
    Box,
    TileRegions,
    Window,
    find_runs,
    hw,
    is_inplace,
    plan_regions,
    reentry,
    run_outputs,
    spatial_op,
    tile_flops,
)
from partc.tiling.split import Grid, node_seconds, split_run
from partc.trace import annotate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TiledRun:
    """One tiled run: what was tiled, how, and what the halos cost.

    Attributes:
        index: the run's index, the first element of ``META_TILE`` on its nodes.
        tier: the tier of its nodes (None when the nodes carry no ``META_TIER``).
        nodes: names of the run's original nodes, in graph order.
        grid: (rows, cols); tile t is row t // cols, column t % cols.
        flops: FLOPs of the untiled run.
        tile_flops: FLOPs of each tile, halo included.
    """

    index: int
    tier: str | None
    nodes: tuple[str, ...]
    grid: Grid
    flops: int
    tile_flops: tuple[int, ...]

    @property
    def overhead(self) -> float:
        """FLOPs of all tiles over those of the untiled run, minus one (0.1: 10% more)."""
        return sum(self.tile_flops) / self.flops - 1 if self.flops else 0.0


def tile_conv_stages(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Split and tile the spatially local runs of every tier that can tile (module docstring).

    For each tier with more than one node and a link to itself, finds the maximal runs
    among its nodes, cuts each into the parts ``partc.tiling.split_run`` predicts fastest
    and rewrites every part it tiles. When no node carries a tier and the cluster has one
    tier, every node is on it.

    Reads meta[META_TIER], meta[META_PROFILE], meta[META_FLOPS], meta[META_BYTES],
    meta[META_SHAPE]. Writes meta[META_TILE] on every node it adds; re-annotates the
    graph (``partc.trace.annotate``); gives new nodes the run's META_TIER, and each
    per-tile copy of a layer the layer's META_PROFILE scaled by its share of the FLOPs,
    and, when the graph has profiles, the glue (slices, pads, crops, stitches) the cost
    model's (``partc.costmodel``) prediction for every tier. Appends one entry per tiled part
    to gm.meta[META_PARALLEL] (kind "tiles"). Leaves nodes that already carry META_TILE
    (``distribute-branches``) alone.

    The summary reads ``K run(s) tiled, U left untiled; <tier>: predicted A ms untiled,
    B ms as planned; ...; run I (<tier>, N nodes): RxC, halo +P% FLOPs; ...`` (U counts
    the parts left untiled), with ``<tier> not tiled: ...`` for a tier that has several
    nodes but no link to itself, and starts ``no run worth tiling (U left untiled)`` or
    ``nothing tiled`` when it tiles nothing.
    """
    tiers = [t for t in ctx.tiers if t.nodes > 1]
    if not tiers:
        return PassResult(gm, "no tier has more than one node; nothing tiled")
    gm = clone(gm)
    untiered = len(ctx.tiers) == 1 and all(META_TIER not in n.meta for n in compute_nodes(gm))
    notes, plans, prices, untiled = [], [], [], 0
    for tier in tiers:
        link = ctx.link(tier.name, tier.name)
        if link is None:
            notes.append(
                f"{tier.name} not tiled: its {tier.nodes} nodes have no link {tier.name} -> {tier.name} "
                "to scatter tiles over; add one to the cluster file's links"
            )
            continue
        runs = find_runs(gm, partial(_on_tier, tier=tier.name, untiered=untiered))
        if not runs:
            notes.append(f"{tier.name}: no spatially local run")
            continue
        seconds = node_seconds(gm, tier)
        before = after = 0.0
        for run in runs:
            for part in split_run(run, gm, tier.nodes, seconds, link_price(ctx, link)):
                after += part.latency
                if part.grid == (1, 1):
                    untiled += 1
                else:
                    plans.append((list(part.nodes), part.grid, plan_regions(part.nodes, gm, part.grid)))
                    prices.append((sum(seconds[n] for n in part.nodes), part.latency))
            before += sum(seconds[n] for n in run)
        notes.append(f"{tier.name}: predicted {before * 1e3:.2f} ms untiled, {after * 1e3:.2f} ms as planned")
    if not plans:
        head = f"no run worth tiling ({untiled} left untiled)" if untiled else "nothing tiled"
        return PassResult(gm, "; ".join([head, *notes]))
    tiled = _rewrite(gm, plans)
    if any(META_PROFILE in n.meta for n in compute_nodes(gm)):
        _profile_glue(gm, ctx)
    gm.meta[META_PARALLEL] = [*gm.meta.get(META_PARALLEL, ()), *(
        {"kind": "tiles", "run": r.index, "tier": r.tier, "nodes": r.grid[0] * r.grid[1], "grid": list(r.grid),
         "layers": [r.nodes[0], r.nodes[-1], len(r.nodes)], "halo": r.overhead, "sequential_s": before,
         "parallel_s": after}
        for r, (before, after) in zip(tiled, prices, strict=True))]
    parts = [
        f"run {r.index} ({r.tier or 'untiered'}, {len(r.nodes)} nodes): {r.grid[0]}x{r.grid[1]}, "
        f"halo +{r.overhead:.1%} FLOPs"
        for r in tiled
    ]
    return PassResult(gm, "; ".join([f"{len(tiled)} run(s) tiled, {untiled} left untiled", *notes, *parts]))


def _profile_glue(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Give the slices, pads, crops and stitches the cost model's META_PROFILE on every tier."""
    calibration = load_calibration()
    predicted = {tier.target: predict_graph(calibration, gm, target(tier.target)) for tier in ctx.tiers}
    for node in gm.graph.nodes:
        if META_TILE in node.meta and META_PROFILE not in node.meta:
            node.meta[META_PROFILE] = {tier.name: predicted[tier.target][node.name] for tier in ctx.tiers}


def _on_tier(node: fx.Node, tier: str, untiered: bool) -> bool:
    """Whether ``node`` is on ``tier`` and not already run in parallel (``distribute-branches``)."""
    return META_TILE not in node.meta and (untiered or node.meta.get(META_TIER) == tier)


def tile_graph(
    gm: fx.GraphModule, grid: Grid, select: Callable[[fx.Node], bool] | None = None
) -> tuple[fx.GraphModule, list[TiledRun]]:
    """Tile every maximal spatially local run among the nodes ``select`` accepts (default:
    all) with ``grid``, whatever the cost model would choose. Runs with an output map
    smaller than ``grid`` are left untiled. ``gm`` is not changed.
    """
    gm = clone(gm)
    plans = []
    for run in find_runs(gm, select or (lambda node: True)):
        try:
            plans.append((run, grid, plan_regions(run, gm, grid)))
        except ValueError as err:
            log.info("run ending at %s left untiled: %s", run[-1].name, err)
    return gm, _rewrite(gm, plans)


def tile_nodes(gm: fx.GraphModule, names: Sequence[str], grid: Grid) -> tuple[fx.GraphModule, TiledRun]:
    """Tile exactly the nodes ``names`` as one run with ``grid``. ``gm`` is not changed.

    Raises:
        UnsupportedLayerError: naming every node that is not spatially local, or if the
            nodes are not a convex set (a path leaves them and comes back), or an output
            map is smaller than ``grid``.
        PartcError: if a name is not a node of ``gm``.
    """
    gm = clone(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise PartcError(f"cannot tile {', '.join(unknown)}: no such node; see `partc inspect` for node names")
    if not names:
        raise PartcError("cannot tile an empty set of nodes; name the layers to tile")
    members = {by_name[name] for name in names}
    run = [n for n in gm.graph.nodes if n in members]
    reasons = [(n, spatial_op(n, gm)) for n in run]
    bad = [f"{n.name} ({n.meta.get(META_OP, n.op)}): {why}" for n, why in reasons if isinstance(why, str)]
    if bad:
        raise UnsupportedLayerError("cannot tile: " + "; ".join(bad) + "; leave these layers out of the tiled run")
    outside = reentry(run)
    if outside is not None:
        raise UnsupportedLayerError(
            f"cannot tile {', '.join(names)} as one run: {outside.name} is outside it but on a path from it back "
            "into it; include it or split the run"
        )
    try:
        regions = plan_regions(run, gm, grid)
    except ValueError as err:
        raise UnsupportedLayerError(f"cannot tile with a {grid[0]}x{grid[1]} grid: {err}; use fewer tiles") from None
    return gm, _rewrite(gm, [(run, grid, regions)])[0]


def _rewrite(gm: fx.GraphModule, plans: Sequence[tuple[list[fx.Node], Grid, list[TileRegions]]]) -> list[TiledRun]:
    """Rewrite every planned run of ``gm`` in place, then re-annotate ``gm``. Run indices follow
    those already in ``gm`` (``distribute-branches``)."""
    tiled, origins, stitches = [], {}, []
    first = 1 + max((n.meta[META_TILE][0] for n in gm.graph.nodes if META_TILE in n.meta), default=-1)
    for index, (run, grid, regions) in enumerate(plans, start=first):
        flops = sum(n.meta[META_FLOPS] for n in run)
        tier = run[0].meta.get(META_TIER)
        tiled.append(TiledRun(index, tier, tuple(n.name for n in run), grid, flops, tile_flops(run, regions)))
        stitches.append((set(run), _RunRewriter(gm, index, run, grid, regions, origins).rewrite()))
    for members, outputs in stitches:  # later runs read the original outputs until every run is rewritten
        for output, stitch in outputs.items():
            output.replace_all_uses_with(stitch, delete_user_cb=lambda user, members=members: user not in members)
    replaced = set().union(*(members for members, _ in stitches))
    for node in reversed([n for n in gm.graph.nodes if n in replaced]):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    annotate(gm)
    for node, (profile, flops, nbytes) in origins.items():
        share = node.meta[META_FLOPS] / flops if flops else node.meta[META_BYTES] / max(nbytes, 1)
        node.meta[META_PROFILE] = {tier: seconds * share for tier, seconds in profile.items()}
    return tiled


class _RunRewriter:
    """Replaces one run of a graph with its tiles; ``values[t][n]`` is tile t's copy of n."""

    def __init__(self, gm, index: int, run: list[fx.Node], grid: Grid, regions: list[TileRegions], origins: dict):
        self.gm, self.graph, self.index, self.run, self.grid, self.regions = gm, gm.graph, index, run, grid, regions
        self.origins = origins  # per-tile copy -> (original META_PROFILE, FLOPs, bytes)
        self.tier = run[0].meta.get(META_TIER)
        self.values: list[dict[fx.Node, fx.Node]] = [{} for _ in regions]
        self.slices: dict[tuple[int, fx.Node], fx.Node] = {}
        self.inplace_read = {s for n in run if is_inplace(n, gm) for s in n.all_input_nodes}

    def rewrite(self) -> dict[fx.Node, fx.Node]:
        """Insert the tiles and stitches of the run; return each run output's stitch.

        The original nodes stay, still read by everything outside the run, for the caller
        to redirect to the stitches and erase once every run is rewritten.
        """
        outputs = set(run_outputs(self.run))
        stitches = {}
        for n in self.run:
            with self.graph.inserting_before(n):
                for t, tile in enumerate(self.regions):
                    if n in tile.computed:
                        self.values[t][n] = self._copy(n, t)
                if n in outputs:
                    stitches[n] = self._stitch(n)
        return stitches

    def _new(self, tile: int | None, op: str, target, args: tuple, kwargs: dict | None = None, name=None) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {}, name=name)
        node.meta = {META_TILE: (self.index, tile)}
        if self.tier is not None:
            node.meta[META_TIER] = self.tier
        return node

    def _crop(self, tile: int, value: fx.Node, have: Box, want: Box) -> fx.Node:
        if want == have:
            return value
        rows = slice(want.h0 - have.h0, want.h1 - have.h0)
        cols = slice(want.w0 - have.w0, want.w1 - have.w0)
        return self._new(tile, "call_function", operator.getitem, (value, (slice(None), slice(None), rows, cols)))

    def _read(self, tile: int, source: fx.Node, box: Box) -> fx.Node:
        """Return ``source`` restricted to ``box``, as tile ``tile`` sees it."""
        if source in self.values[tile]:
            return self._crop(tile, self.values[tile][source], self.regions[tile].computed[source], box)
        if (tile, source) not in self.slices:
            height, width = hw(source)
            value = self._crop(tile, source, Box(0, height, 0, width), self.regions[tile].inputs[source])
            if source in self.inplace_read:  # a layer overwrites its input: keep the input intact for other tiles
                value = self._new(tile, "call_method", "clone", (value,))
            self.slices[tile, source] = value
        return self._crop(tile, self.slices[tile, source], self.regions[tile].inputs[source], box)

    def _copy(self, n: fx.Node, tile: int) -> fx.Node:
        window = spatial_op(n, self.gm)
        out = self.regions[tile].computed[n]
        name = f"{n.name}_tile{tile}"
        if window.kind == "pointwise":
            inputs = {source: self._read(tile, source, out) for source in n.all_input_nodes}
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: inputs[a])
            return self._layer(n, self._new(tile, n.op, n.target, args, kwargs, name))
        (source,) = n.all_input_nodes
        box, (top, bottom, left, right) = window.input_box(out, hw(source))
        pads = (left, right, top, bottom)  # F.pad's order
        crop = x = self._read(tile, source, box)
        if any(pads):
            x = self._new(
                tile, "call_function", F.pad, (x, pads), {"value": -math.inf if window.kind == "max" else 0.0}
            )
        if window.kind == "conv":
            return self._layer(n, self._new(tile, "call_module", self._unpadded(n.target), (x,), name=name))
        if window.kind == "max":
            args = (x, window.kernel, window.stride, 0, window.dilation)
            return self._layer(n, self._new(tile, "call_function", F.max_pool2d, args, name=name))
        full = {d for row in window.divisors(out, hw(source)) for d in row} == {math.prod(window.kernel)}
        if window.divisor_override or full:  # one divisor for every window: avg_pool2d applies it
            args = (x, window.kernel, window.stride, 0, False, True, window.divisor_override)
            return self._layer(n, self._new(tile, "call_function", F.avg_pool2d, args, name=name))
        args = (x, window.kernel, window.stride, 0, False, True, 1)  # window sums
        sums = self._layer(n, self._new(tile, "call_function", F.avg_pool2d, args, name=name))
        return self._new(tile, "call_function", operator.truediv, (sums, self._divisor(tile, crop, pads, window)))

    def _unpadded(self, target: str) -> str:
        """Return the target of a padding-free twin of conv ``target`` that shares its parameters."""
        name = f"{target.replace('.', '_')}_unpadded"
        if not hasattr(self.gm, name):
            conv = self.gm.get_submodule(target)
            twin = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                             conv.groups, conv.bias is not None, device="meta")  # fmt: skip
            twin.weight, twin.bias = conv.weight, conv.bias
            self.gm.add_submodule(name, twin.train(conv.training))
        return name

    def _divisor(self, tile: int, crop: fx.Node, pads: tuple[int, int, int, int], window: Window) -> fx.Node:
        """Return, as a graph value, what avg_pool2d divides each window's sum by: the sum
        of a mask that is 1 on the map (and on its implicit padding, when that counts)."""
        channel = self._new(tile, "call_function", operator.getitem, (crop, (slice(None), slice(0, 1))))
        mask = self._new(tile, "call_function", torch.ones_like, (channel,))
        counted = (0, 0, 0, 0)
        if window.count_include_pad:
            (ph, pw), (left, right, top, bottom) = window.padding, pads
            counted = (min(left, pw), min(right, pw), min(top, ph), min(bottom, ph))
            mask = self._new(tile, "call_function", F.pad, (mask, counted), {"value": 1.0})
        rest = tuple(pad - done for pad, done in zip(pads, counted, strict=True))
        if any(rest):  # beyond the implicit padding: ceil_mode's last windows
            mask = self._new(tile, "call_function", F.pad, (mask, rest), {"value": 0.0})
        return self._new(tile, "call_function", F.avg_pool2d, (mask, window.kernel, window.stride, 0, False, True, 1))

    def _layer(self, original: fx.Node, copy: fx.Node) -> fx.Node:
        if META_PROFILE in original.meta:
            self.origins[copy] = (original.meta[META_PROFILE], original.meta[META_FLOPS], original.meta[META_BYTES])
        return copy

    def _stitch(self, output: fx.Node) -> fx.Node:
        rows, cols = self.grid
        pieces = [
            self._crop(t, self.values[t][output], tile.computed[output], tile.stitched[output])
            for t, tile in enumerate(self.regions)
        ]
        strips = []
        for r in range(rows):
            row = pieces[r * cols : (r + 1) * cols]
            strips.append(row[0] if cols == 1 else self._new(None, "call_function", torch.cat, (row,), {"dim": 3}))
        return strips[0] if rows == 1 else self._new(None, "call_function", torch.cat, (strips,), {"dim": 2})
