"""Planning vertical tiling: the predicted latency of a tiled run, and where to split runs.

Implements the cost model that ``partc.passes.tile`` documents in its module docstring:
``predict_latency`` prices one run tiled one way from its ``partc.tiling.regions`` regions, and
``split_run`` cuts a maximal run into consecutive parts, each tiled with its own grid or
left untiled, minimising the sum of their predicted latencies. It is a dynamic program
over cut points in the run's graph order; every contiguous stretch of a convex run is
itself convex, so every part is a valid run. For each part end it walks the run
backwards once per grid, growing the regions as ``partc.tiling.regions.plan_regions`` does
(what a node computes does not depend on where the part starts), so it prices every
part exactly as ``predict_latency`` would, in O(len(run)**2 * grids * tiles) steps at
most; a walk stops once its slowest tile's compute alone exceeds the best plan found so
far for the prefix up to that end (no longer part can beat it: costs are not negative).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import fx

from partc.context import Tier
from partc.costmodel import load_calibration, predict_graph
from partc.ir import META_BYTES, META_PROFILE, META_SHAPE, META_SPLITS, compute_nodes
from partc.partition.price import LinkPrice, tiled_step_seconds
from partc.targets import target
from partc.tiling.regions import Box, TileRegions, Window, hw, spatial_op, split

Grid = tuple[int, int]

@dataclass(frozen=True)
class Part:
    """Consecutive nodes of a run, tiled with ``grid``, or left untiled when it is (1, 1).

    Attributes:
        nodes: the part's nodes, in graph order.
        grid: (rows, cols); tile t is row t // cols, column t % cols.
        latency: predicted seconds (untiled: the sum of the nodes' seconds).
    """

    nodes: tuple[fx.Node, ...]
    grid: Grid
    latency: float


def candidate_grids(nodes: int) -> list[Grid]:
    """Return 1x1 and every R x C grid with R*C <= ``nodes``, fewer tiles first."""
    return [(r, count // r) for count in range(1, nodes + 1) for r in range(1, count + 1) if count % r == 0]


def node_seconds(gm: fx.GraphModule, tier: Tier) -> dict[fx.Node, float]:
    """Return each compute node's seconds on ``tier``: its META_PROFILE when every node has
    one, else the cost model's (``partc.costmodel``) prediction for the tier's target.

    Reads meta[META_PROFILE], and what ``partc.costmodel.predict_graph`` reads.
    """
    nodes = compute_nodes(gm)
    if all(tier.name in n.meta.get(META_PROFILE, {}) for n in nodes):
        return {n: n.meta[META_PROFILE][tier.name] for n in nodes}
    predicted = predict_graph(load_calibration(), gm, target(tier.target))
    return {n: predicted[n.name] for n in nodes}


def predict_latency(
    run: Sequence[fx.Node], regions: Sequence[TileRegions], seconds: Mapping[fx.Node, float], link: LinkPrice
) -> float:
    """Predict the seconds of ``run`` tiled as ``regions`` (``partc.partition.price.tiled_step_seconds``).

    A tile computes each node's ``seconds`` scaled by the share of its output map the
    tile computes; it receives its input boxes and sends back its stitched boxes, each
    node's META_BYTES scaled by the box's share of its map. Reads meta[META_BYTES] and
    meta[META_SHAPE].
    """
    compute = [sum(seconds[n] * box.area / _area(n) for n, box in tile.computed.items()) for tile in regions]
    scatter = [sum(_bytes_per_pixel(x) * box.area for x, box in tile.inputs.items()) for tile in regions]
    gather = [sum(_bytes_per_pixel(o) * box.area for o, box in tile.stitched.items()) for tile in regions]
    return tiled_step_seconds(compute, scatter, gather, link)


def split_run(
    run: Sequence[fx.Node], gm: fx.GraphModule, nodes: int, seconds: Mapping[fx.Node, float], link: LinkPrice
) -> list[Part]:
    """Cut ``run`` (a convex run, in graph order) into the consecutive parts, each with the
    grid among ``candidate_grids(nodes)``, of least total predicted latency (module
    docstring). Ties go to leaving a node untiled, then to fewer tiles, then to a shorter
    last part; untiled neighbours merge into one part.

    Reads meta[META_BYTES] and meta[META_SHAPE] of the run and its inputs. Where ``gm.meta``
    holds META_SPLITS (a compile's planner), a run split before, with the same nodes, shapes,
    seconds and readers, in any variant of the graph, is not split again.

    Raises:
        ValueError: if a node of ``run`` is not spatially local.
    """
    memo = gm.meta.get(META_SPLITS)
    key = (_fingerprint(run, seconds), nodes, link)
    if memo is not None and key in memo:
        return [Part(tuple(run[start:end]), grid, latency) for start, end, grid, latency in memo[key]]
    parts = _split(run, gm, nodes, seconds, link)
    if memo is not None:
        ends = list(itertools.accumulate(len(part.nodes) for part in parts))
        memo[key] = [(end - len(part.nodes), end, part.grid, part.latency)
                     for part, end in zip(parts, ends, strict=True)]
    return parts


def _fingerprint(run: Sequence[fx.Node], seconds: Mapping[fx.Node, float]) -> tuple:
    """What ``_split`` reads of ``run``: each node's name, op, shape, bytes, seconds, readers and inputs."""
    return tuple((n.name, str(n.target), n.meta.get(META_SHAPE), n.meta[META_BYTES], seconds[n],
                  tuple(u.name for u in n.users),
                  tuple((i.name, i.meta.get(META_SHAPE), i.meta[META_BYTES]) for i in n.all_input_nodes))
                 for n in run)


def _split(
    run: Sequence[fx.Node], gm: fx.GraphModule, nodes: int, seconds: Mapping[fx.Node, float], link: LinkPrice
) -> list[Part]:
    """``split_run``'s dynamic program."""
    sweep = _Sweep(run, gm, seconds, link)
    best, choice = [0.0], [(0, (1, 1))]
    for end in range(1, len(run) + 1):
        best.append(best[end - 1] + seconds[run[end - 1]])
        choice.append((end - 1, (1, 1)))
        for grid in candidate_grids(nodes)[1:]:
            for start, latency, floor in sweep.parts(end, grid):
                if floor >= best[end]:
                    break  # no longer part can do better
                if best[start] + latency < best[end]:
                    best[end], choice[end] = best[start] + latency, (start, grid)
    parts: list[Part] = []
    end = len(run)
    while end:
        start, grid = choice[end]
        latency = best[end] - best[start]
        if grid == (1, 1) and parts and parts[-1].grid == (1, 1):
            parts[-1] = Part(tuple(run[start:end]) + parts[-1].nodes, grid, latency + parts[-1].latency)
        else:
            parts.append(Part(tuple(run[start:end]), grid, latency))
        end = start
    return parts[::-1]


def _area(node: fx.Node) -> int:
    return math.prod(hw(node))


def _bytes_per_pixel(node: fx.Node) -> float:
    return node.meta[META_BYTES] / _area(node)


class _Sweep:
    """Prices every part of one run that ends at a given node, for a given grid."""

    def __init__(self, run: Sequence[fx.Node], gm: fx.GraphModule, seconds: Mapping[fx.Node, float], link: LinkPrice):
        self.run, self.link = run, link
        position = {n: k for k, n in enumerate(run)}
        self.windows: list[Window] = []
        for n in run:
            window = spatial_op(n, gm)
            if isinstance(window, str):
                raise ValueError(f"{n.name}: {window}")
            self.windows.append(window)
        # a node is an output of the parts ending at ``end`` when it is read at or after ``end``
        self.last_read = [max((position.get(u, len(run)) for u in n.users), default=-1) for n in run]
        self.sources = [[(s, hw(s), _bytes_per_pixel(s)) for s in n.all_input_nodes] for n in run]
        self.seconds_per_pixel = [seconds[n] / _area(n) for n in run]

    def parts(self, end: int, grid: Grid) -> Iterator[tuple[int, float, float]]:
        """Yield ``(start, latency, floor)`` for start = end - 1, end - 2, ..., 0: the predicted
        latency of ``run[start:end]`` tiled with ``grid``, and a floor under the latency of
        every part ``run[s:end]`` with s <= start (its slowest tile's compute, which only
        grows). Stops at the first part with an output map smaller than the grid."""
        rows, cols = grid
        tiles = rows * cols
        compute, scatter, gather = [0.0] * tiles, [0.0] * tiles, [0.0] * tiles
        read: list[dict[fx.Node, Box]] = [{} for _ in range(tiles)]  # inputs of the part: what it reads of them
        for k in range(end - 1, -1, -1):
            node, window = self.run[k], self.windows[k]
            pointwise = window.kind == "pointwise"  # reads each input at the output's own pixels
            height, width = hw(node)
            output = self.last_read[k] >= end
            if output and (height < rows or width < cols):
                return  # every longer part has this output too
            per_pixel = _bytes_per_pixel(node)
            stitched = [Box(*h, *w) for h in split(height, rows) for w in split(width, cols)] if output else []
            for t in range(tiles):
                need = read[t].pop(node, None)
                if need is not None:
                    scatter[t] -= per_pixel * need.area
                if output:
                    gather[t] += per_pixel * stitched[t].area
                    need = stitched[t].union(need)
                if need is None:
                    continue
                compute[t] += self.seconds_per_pixel[k] * need.area
                for source, size, source_per_pixel in self.sources[k]:
                    old = read[t].get(source)
                    new = (need if pointwise else window.input_box(need, size)[0]).union(old)
                    scatter[t] += source_per_pixel * (new.area - (old.area if old else 0))
                    read[t][source] = new
            yield k, tiled_step_seconds(compute, scatter, gather, self.link), max(compute)
