"""partc's pictures: the partition on the model's graph, the bandwidth sweep, a request's timeline.

- ``ir_to_dot``: the IR as Graphviz dot, every node filled in its tier's colour (a legend names
  them), every edge between tiers labelled with the bytes it carries (and the link's codec),
  each group a tier runs in parallel (``partc.ir.META_PARALLEL``: tiled runs, distributed
  branches) boxed and labelled, one box per node of the tier inside. ``--dump-after`` dumps
  and ``partc plan --draw`` write it; ``draw_partition`` also renders SVG where Graphviz's
  ``dot`` is installed.
- ``plot_bandwidth_sweep``: partc against the baselines as one link's bandwidth varies, with
  the bandwidth range where each plan holds, the switch points and the cluster file's
  bandwidth marked (``partc plan --sweep --plot``).
- ``plot_timeline``: one request through the stages, predicted next to measured, one row each
  (``partc run --distributed --timeline``, ``partc testbed --timeline``).

Plots are drawn on a ``matplotlib.figure.Figure`` of their own (no pyplot state) and returned,
so a caller can look at what was drawn.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import fx

from partc.ir import META_BYTES, META_LINK_CODECS, META_OP, META_PARALLEL, META_SHAPE, META_TIER, META_TILE, link_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from partc.manifest import Manifest
    from partc.runtime.layout import Hop
    from partc.runtime.wire import Measurement

log = logging.getLogger(__name__)

TIER_COLOURS = ("lightblue", "palegreen", "lightsalmon", "plum", "khaki", "lightgrey")  # by tier order
CUT_COLOUR = "firebrick"


def tier_colours(tiers: Iterable[str]) -> dict[str, str]:
    """One fill colour per tier, in tier order (Graphviz and matplotlib both know the names)."""
    return {t: TIER_COLOURS[i % len(TIER_COLOURS)] for i, t in enumerate(tiers)}


def ir_to_dot(gm: fx.GraphModule, tiers: Sequence[str] = (), title: str = "") -> str:
    """Return the IR as a Graphviz digraph (module docstring).

    Args:
        gm: the IR; reads meta[META_OP], meta[META_SHAPE], meta[META_TIER], meta[META_TILE],
            meta[META_BYTES] and gm.meta[META_PARALLEL], gm.meta[META_LINK_CODECS] where present.
        tiers: tier names in data-flow order (colours and codec lookups follow it); tiers not
            in it follow in the order first seen.
        title: a caption above the graph.
    """
    nodes = list(gm.graph.nodes)
    order = list(tiers) + [t for t in dict.fromkeys(n.meta.get(META_TIER) for n in nodes) if t and t not in tiers]
    colour = tier_colours(order)
    lines = ["digraph partc {", f"  graph [fontname=Helvetica, labelloc=t, label={_quote(title)}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10, fillcolor=white];",
             "  edge [color=grey40, fontname=Helvetica, fontsize=9];"]
    groups = {g["run"]: g for g in gm.meta.get(META_PARALLEL, ())}
    boxed: dict[int, dict[int | None, list[str]]] = {}
    for n in nodes:
        fill = colour.get(n.meta.get(META_TIER), "white")
        line = f"  {_quote(n.name)} [label={_quote(_node_label(n))}, fillcolor={fill}];"
        tile = n.meta.get(META_TILE)
        if tile is None:
            lines.append(line)
        else:
            boxed.setdefault(tile[0], {}).setdefault(tile[1], []).append(line)
    for run, by_node in sorted(boxed.items()):
        lines += [f"  subgraph cluster_run{run} {{",
                  f"    style=\"rounded,dashed\"; color=grey30; label={_quote(_group_label(groups.get(run)))};"]
        for node, members in sorted(by_node.items(), key=lambda item: -1 if item[0] is None else item[0]):
            if node is None:  # the coordinator's slices and stitches
                lines += ["  " + m for m in members]
                continue
            lines += [f"    subgraph cluster_run{run}_node{node} {{",
                      f"      style=dotted; color=grey50; label={_quote(f'node {node}')};",
                      *("    " + m for m in members), "    }"]
        lines.append("  }")
    codecs = gm.meta.get(META_LINK_CODECS, {})
    sent = set()  # (tensor, tier): a tensor crosses to a tier once, however many nodes there read it
    for n in nodes:
        for a in n.all_input_nodes:
            src, dst = a.meta.get(META_TIER), n.meta.get(META_TIER)
            if not (src and dst and src != dst):
                lines.append(f"  {_quote(a.name)} -> {_quote(n.name)};")
                continue
            first = (a.name, dst) not in sent
            sent.add((a.name, dst))
            label = _cut_label(a.meta.get(META_BYTES, 0), _codecs_between(order, src, dst, codecs)) if first else ""
            lines.append(f"  {_quote(a.name)} -> {_quote(n.name)} [label={_quote(label)}, color={CUT_COLOUR}, "
                         f"fontcolor={CUT_COLOUR}, penwidth=2];")
    if colour:
        keys = [_quote("legend: " + t) for t in colour]
        lines += ["  subgraph cluster_legend {", "    label=tiers; style=rounded; color=grey60;",
                  *(f"    {k} [label={_quote(t)}, fillcolor={colour[t]}];" for k, t in zip(keys, colour, strict=True))]
        if len(keys) > 1:  # side by side, in tier order
            lines.append("    {rank=same; " + " -> ".join(keys) + " [style=invis];}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_partition(gm: fx.GraphModule, path: Path, tiers: Sequence[str] = (), title: str = "") -> list[Path]:
    """Write ``ir_to_dot`` to ``path`` with suffix ``.dot``; for a ``path`` ending in ``.svg``,
    render it there too with Graphviz's ``dot`` when installed (else log one line and go on).
    Return the files written."""
    dot = path.with_suffix(".dot")
    dot.parent.mkdir(parents=True, exist_ok=True)
    dot.write_text(ir_to_dot(gm, tiers, title))
    if path.suffix != ".svg":
        return [dot]
    program = shutil.which("dot")
    if program is None:
        log.warning("Graphviz's 'dot' is not installed: wrote %s only (render it with 'dot -Tsvg %s -o %s')",
                    dot, dot, path)
        return [dot]
    subprocess.run([program, "-Tsvg", str(dot), "-o", str(path)], check=True, capture_output=True)
    return [dot, path]


def _quote(text: str) -> str:
    """A dot string: JSON's escapes are dot's (``\\n`` breaks a line); non-ASCII stays as is."""
    return json.dumps(text, ensure_ascii=False)


def _node_label(n: fx.Node) -> str:
    shape = n.meta.get(META_SHAPE)
    tier, tile = n.meta.get(META_TIER), n.meta.get(META_TILE)
    where = tier + (f" / node {tile[1]}" if tile and tile[1] is not None else "") if tier else ""
    return "\n".join(x for x in (n.name, n.meta.get(META_OP, n.op), "x".join(map(str, shape)) if shape else "", where)
                     if x)


def _group_label(group: Mapping | None) -> str:
    if group is None:
        return "run in parallel"
    timing = f"predicted {group['sequential_s'] * 1e3:.2f} -> {group['parallel_s'] * 1e3:.2f} ms"
    if group["kind"] == "tiles":
        rows, cols = group["grid"]
        return f"{group['tier']}: {rows}x{cols} tiles over {group['nodes']} nodes (halo +{group['halo']:.0%}), {timing}"
    return (f"{group['tier']}: {len(group['branches'])} branches over {group['nodes']} nodes into {group['join']}, "
            f"{timing}")


def _codecs_between(order: Sequence[str], src: str, dst: str, codecs: Mapping) -> list[str]:
    """The codecs (other than none) of the links a tensor crosses from tier ``src`` to ``dst``."""
    if src not in order or dst not in order:
        return []
    path = order[order.index(src): order.index(dst) + 1]
    names = [codecs[k].codec for k in (link_name(a, b) for a, b in zip(path, path[1:], strict=False)) if k in codecs]
    return [c for c in dict.fromkeys(names) if c != "none"]


def _cut_label(nbytes: int, codecs: Sequence[str]) -> str:
    return " ".join([_size(nbytes), *codecs])


def _size(nbytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def _plain(value: float, _position: object = None) -> str:
    """A tick label as a plain number: "600", "0.5", never "6x10^2"."""
    return f"{value:g}" if 1e-4 <= abs(value) < 1e6 or value == 0 else f"{value:.0f}"


def _mbit(bytes_per_second: float) -> str:
    return _plain(float(f"{bytes_per_second * 8e-6:.3g}"))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> Figure:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig


def plot_bandwidth_sweep(
    series: Mapping[str, np.ndarray],
    bandwidths: Sequence[float],
    path: Path,
    *,
    title: str,
    ylabel: str = "latency",
    regions: Sequence[tuple[float, float, str]] = (),
    bandwidth: float | None = None,
) -> Figure:
    """Draw ``partc.partition.family.bandwidth_sweep``'s series against bandwidth (log axes) into a PNG.

    Strategies with no feasible plan (all NaN) are left out; a baseline equal to partc over
    the whole sweep is marked so in the legend, drawn under partc's line but wider.

    Args:
        series: strategy -> predicted seconds at each of ``bandwidths`` ("partc" among them).
        bandwidths: bytes per second.
        path: the PNG to write.
        title: the plot's title.
        ylabel: the figure plotted (latency, bottleneck).
        regions: (low, high, what) of each plan of the family: where it is optimal, in bytes
            per second, and a short description; shaded and lettered, the switch points marked.
        bandwidth: the cluster file's bandwidth of the swept link, bytes per second.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    fig = _figure(10, 6)
    ax = fig.add_subplot()
    mbit = np.asarray(bandwidths) * 8 / 1e6
    ours = np.asarray(series["partc"]) * 1e3
    feasible = {name: np.asarray(v) * 1e3 for name, v in series.items()
                if name != "partc" and np.isfinite(np.asarray(v, dtype=float)).any()}
    equal = [name for name, ms in feasible.items() if np.allclose(ms, ours, rtol=1e-6)]
    for i, (name, ms) in enumerate(feasible.items()):
        if name in equal:  # under partc's line, each wider than the next: every one shows as a band
            ax.plot(mbit, ms, label=f"{name} (= partc)", color=f"C{i % 10}", zorder=2,
                    linewidth=2 + 2.5 * (len(equal) - equal.index(name)))
        else:
            ax.plot(mbit, ms, label=name, color=f"C{i % 10}", linestyle="--", linewidth=1.6, zorder=3)
    ax.plot(mbit, ours, label="partc", color="black", linewidth=1.8, zorder=5)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    shade = colormaps["Pastel1"]
    shades = [Patch(facecolor=shade(i % 9), alpha=0.45,
                    label=f"{letters[i % 26]}: {_mbit(lo)} - {_mbit(hi)} Mbit/s, {what}")
              for i, (lo, hi, what) in enumerate(regions)]
    for i, (lo, hi, _) in enumerate(regions):
        ax.axvspan(lo * 8e-6, hi * 8e-6, color=shade(i % 9), alpha=0.45, zorder=0, linewidth=0)
        ax.text((lo * hi) ** 0.5 * 8e-6, 0.98, letters[i % 26], transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=10, fontweight="bold")
    switches = sorted({lo for lo, _, _ in regions} - {min((lo for lo, _, _ in regions), default=0)})
    for k, at in enumerate(switches):
        ax.axvline(at * 8e-6, color="grey", linestyle=":", linewidth=1, zorder=1,
                   label="plan switch" if k == 0 else None)
        ax.text(at * 8e-6, 0.02, f" {_mbit(at)}", transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=7, color="grey", va="bottom")
    if bandwidth is not None:
        ax.axvline(bandwidth * 8e-6, color=CUT_COLOUR, linewidth=1.2, zorder=4,
                   label=f"cluster file: {_mbit(bandwidth)} Mbit/s")
    for axis in (ax.xaxis, ax.yaxis):
        _plain_log(ax, axis)
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel(f"predicted {ylabel} (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(loc="outside right upper", fontsize=8)
    if shades:
        fig.legend(handles=shades, loc="outside lower center", fontsize=8, title="where each plan holds",
                   title_fontsize=8)
    return _save(fig, path)


def _plain_log(ax, axis) -> None:
    """Put ``axis`` on a log scale with plain-number tick labels; minor ticks are labelled where
    the axis spans few decades (all under one, 2s and 5s under 2.5, none beyond)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _position: object) -> str:
        low, high = sorted(axis.get_view_interval())
        decades = np.log10(high / low) if low > 0 else np.inf
        digit = round(value / 10 ** np.floor(np.log10(value) + 1e-9))
        return _plain(value) if decades < 1 or (decades < 2.5 and digit in (2, 5)) else ""

    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(FuncFormatter(minor))


@dataclass(frozen=True)
class Step:
    """One step of a request: a stage computing (``tier`` its tier) or a hop moving data (``tier`` None).

    ``measured_s`` is None where the step was not measured (the plan run stopped before it).
    """

    name: str
    tier: str | None
    predicted_s: float
    measured_s: float | None


def request_steps(
    manifest: Manifest, hops: Sequence[Hop], compute: Mapping[str, float], transfer: Mapping[str, float]
) -> list[Step]:
    """The steps of a request through the primary plan's chain, in order: a stage, the hop to the next, ...

    Args:
        manifest: the build's; predicted stage seconds are its primary plan's programs'.
        hops: the chain's hops (``partc.runtime.layout.hops``), with their predicted seconds.
        compute: stage -> measured compute seconds.
        transfer: hop (``"src->dst"``) -> measured seconds on the wire.
    """
    primary = manifest.plans[0]
    tier = {s.name: s.tier for s in manifest.stages}

    def stage(name: str) -> Step:
        program = manifest.stage(name).program(primary.programs[name]) if name in primary.programs else None
        return Step(name, tier[name], program.predicted_s if program else 0.0, compute.get(name))

    first = hops[0].src if hops else manifest.chain[0].name
    steps = [stage(first)] if first in tier else []  # else the driver's own node: inputs start there
    for hop in hops:
        key = f"{hop.src}->{hop.dst}"
        steps += [Step(key, None, hop.predicted_s, transfer.get(key)), stage(hop.dst)]
    return steps


def measured_steps(manifest: Manifest, hops: Sequence[Hop], requests: Sequence[Sequence[Measurement]]) -> list[Step]:
    """``request_steps`` with each step's median over ``requests`` (``Driver.last`` of each), the first
    left out when there are more (it pays for connections and first calls)."""
    warm = requests[1:] if len(requests) > 1 else requests
    samples: dict[tuple[str, str], list[float]] = {}
    for measurements in warm:
        for m in measurements:
            key = f"{m.src}->{m.dst}" if m.kind == "link" else m.src
            samples.setdefault((m.kind, key), []).append(m.seconds)
    median = {key: float(np.median(values)) for key, values in samples.items()}
    return request_steps(manifest, hops, {k: v for (kind, k), v in median.items() if kind == "compute"},
                         {k: v for (kind, k), v in median.items() if kind == "link"})


def plot_timeline(steps: Sequence[Step], path: Path, *, title: str, tiers: Sequence[str] = ()) -> Figure:
    """Draw one request as a Gantt chart into a PNG: two rows per step, predicted above measured.

    Each row holds one bar, starting where the steps before it (predicted, or measured) end;
    stages are filled in their tier's colour (``tiers`` in data-flow order), hops in grey.
    """
    from matplotlib.patches import Patch

    colour = tier_colours(tiers or dict.fromkeys(s.tier for s in steps if s.tier))
    fig = _figure(10, 1.2 + 0.42 * len(steps))
    ax = fig.add_subplot()
    ends = {"predicted": 0.0, "measured": 0.0}
    labels = []
    for step in steps:
        fill = colour.get(step.tier, "lightgrey") if step.tier else "silver"
        for kind, seconds in (("predicted", step.predicted_s), ("measured", step.measured_s)):
            row = len(labels)
            labels.append(f"{step.name} {kind}")
            if seconds is None:
                ax.text(ends[kind] * 1e3, row, " not run", va="center", fontsize=8, color="grey")
                continue
            ax.barh(row, seconds * 1e3, left=ends[kind] * 1e3, height=0.7, color=fill, edgecolor="black",
                    linewidth=0.6, hatch="//" if kind == "predicted" else None, alpha=0.6 if kind == "predicted" else 1,
                    gid=f"{step.name}:{kind}")
            ends[kind] += seconds
            ax.text(ends[kind] * 1e3, row, f" {seconds * 1e3:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(ends.values()) * 1e3 * 1.15 or 1)
    ax.set_xlabel("time since the request was sent (ms)")
    ax.set_title(f"{title}\npredicted {ends['predicted'] * 1e3:.1f} ms, measured {ends['measured'] * 1e3:.1f} ms "
                 "(measured transfers include the reply's way back)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(facecolor=c, edgecolor="black", label=t) for t, c in colour.items()]
    handles += [Patch(facecolor="silver", edgecolor="black", label="transfer"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="predicted")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return _save(fig, path)
