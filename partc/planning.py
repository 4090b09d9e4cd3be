"""``partc plan``: the chosen tier of every layer, its predicted cost, and the baselines.

``plan_model`` runs the compile pipeline up to emission (``partc.compilation.compile_plans``:
the same passes, plans and prices as ``partc compile``) and reports the primary plan, the
other plans the build would carry, and every baseline strategy priced on the same cost graph,
each link paying its codec. With a sweep it also computes the plan family over one link's
bandwidth range (every plan that is optimal somewhere in it, and the bandwidths where the
optimum changes) and plots partc against the baselines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from partc.cluster import load_cluster, parse_bandwidth
from partc.compilation import compile_plans
from partc.draw import draw_partition, plot_bandwidth_sweep
from partc.errors import ClusterError
from partc.ir import META_PARALLEL
from partc.output import with_units
from partc.partition.cost import Cost, predict
from partc.partition.family import bandwidth_sweep, plan_family
from partc.partition.load import LoadCost
from partc.partition.model import assigned_cost
from partc.report import format_table

SWEEP_POINTS = 41
CUT_PASSES = ("select-cuts", "compress-cut-tensors")  # the passes ``solve_seconds`` times
PLAN_JSON_NAMES = {  # the report's fields in seconds, bytes, bytes/s or counts of graph nodes, as JSON names them
    "latency": "latency_ms", "bottleneck": "bottleneck_ms", "compute": "compute_ms", "transfer": "transfer_ms",
    "memory": "memory_bytes", "one_node": "one_node_ms", "solve_seconds": "solve_ms", "seconds": "family_ms",
    "low": "low_mbit_s", "high": "high_mbit_s", "breakpoints": "breakpoints_mbit_s", "nodes": "layers",
    "latency_low": "latency_low_ms", "latency_high": "latency_high_ms",
}


@dataclass(frozen=True)
class TierRuns:
    """The layers a tier runs, as runs of consecutive nodes in graph order."""

    tier: str
    nodes: int
    runs: tuple[tuple[str, str, int], ...]  # (first, last, node count)


@dataclass(frozen=True)
class FamilyEntry:
    """One plan of a plan family: where it is optimal and what it does."""

    low: float  # bandwidth range where it is optimal, bytes per second
    high: float
    nodes: tuple[int, ...]  # nodes per tier
    link_bytes: tuple[int, ...]
    latency_low: float  # predicted latency at ``low`` and at ``high``
    latency_high: float


@dataclass(frozen=True)
class Sweep:
    """The plan family over one link, and the sweep of partc against the baselines."""

    link: str
    low: float
    high: float
    breakpoints: tuple[float, ...]
    plans: tuple[FamilyEntry, ...]
    seconds: float  # time to compute the family
    plot: str | None


@dataclass(frozen=True)
class BuildPlan:
    """One plan a build compiled for this cluster would carry (``partc.compilation.CompiledPlan``)."""

    name: str
    kind: str
    stages: tuple[str, ...]
    latency: float
    bottleneck: float
    latency_under_load_s: float | None = None  # queueing included (partc.partition.load); None: no rate, overloaded


@dataclass(frozen=True)
class PlanReport:
    """What ``partc plan`` prints.

    Attributes:
        tiers, links: names, in data-flow order (links as ``src->dst``).
        assignment: node name -> tier.
        layers: per tier, the runs of layers it runs.
        cost: the predicted cost of partc's plan (its tiled stages priced as such).
        codecs: link -> the codec its tensors cross with (``compress-cut-tensors``).
        method: how the plan was found ("min-cut", "milp").
        solve_seconds: time taken by the passes that choose the cut and the codecs.
        baselines: strategy -> predicted cost (None: no feasible plan).
        plans: every plan a build would carry, the primary one first.
        one_node: seconds of each tier's share of the primary plan on one of its nodes.
        parallel: the primary plan's groups run in parallel on a tier's nodes
            (``partc.ir.META_PARALLEL``: tiled runs with their grid and halo, distributed
            branches with their node).
        notes: what to know about the cluster (a tier's nodes left unused).
        sweep: the plan family over a link, when asked for.
        drawing: the files the partition was drawn in, when asked for (``partc.draw.draw_partition``).
    """

    model: str
    objective: str
    tiers: tuple[str, ...]
    links: tuple[str, ...]
    assignment: dict[str, str]
    layers: tuple[TierRuns, ...]
    cost: Cost
    codecs: dict[str, str]
    solve_seconds: float
    baselines: dict[str, Cost | None]
    plans: tuple[BuildPlan, ...] = ()
    one_node: tuple[float, ...] = ()
    parallel: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()
    sweep: Sweep | None = None
    drawing: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """Return the report as a JSON-able dict, its keys unit-suffixed (``partc.output.with_units``)."""
        return with_units(asdict(self), PLAN_JSON_NAMES)

    def table(self, compare: bool = False) -> str:
        """Return the report as text: layers and costs per tier and link; baselines if ``compare``."""
        c = self.cost
        lines = [f"plan for {self.model} (objective {self.objective}, solved in {self.solve_seconds * 1e3:.0f} ms)"]
        rows = [("tier", "layers", "runs of layers", "compute ms", "memory MB")]
        for runs, compute, memory in zip(self.layers, c.compute, c.memory, strict=True):
            shown = [f"{a} .. {b}" if a != b else a for a, b, _ in runs.runs[:3]]
            more = f" (+{len(runs.runs) - 3} more runs)" if len(runs.runs) > 3 else ""
            rows.append((runs.tier, str(runs.nodes), ", ".join(shown) + more or "-", f"{compute * 1e3:.2f}",
                         f"{memory / 1e6:.1f}"))
        lines += [format_table(rows, right=(1, 3, 4)), ""]
        rows = [("link", "MB", "codec", "transfer ms")]
        rows += [(name, f"{b / 1e6:.3f}", self.codecs[name], f"{t * 1e3:.2f}")
                 for name, b, t in zip(self.links, c.link_bytes, c.transfer, strict=True)]
        if self.links:
            lines += [format_table(rows, right=(1, 3)), ""]
        lines.append(f"predicted latency {c.latency * 1e3:.2f} ms, pipeline bottleneck {c.bottleneck * 1e3:.2f} ms "
                     f"({1 / c.bottleneck:.1f} inferences/s)" if c.bottleneck > 0 else
                     f"predicted latency {c.latency * 1e3:.2f} ms")
        if c.load is not None:
            lines += ["", *_load_lines(c.load)]
        if self.parallel:
            rows = [("tier", "one node ms", "its nodes ms", "speed-up")]
            rows += [(t, f"{one * 1e3:.2f}", f"{many * 1e3:.2f}", f"{one / many:.2f}x")
                     for t, one, many in zip(self.tiers, self.one_node, c.compute, strict=True)
                     if many > 0 and one > many]
            lines += ["", "run in parallel on a tier's nodes:", format_table(rows, right=(1, 2, 3))]
            rows = [("tier", "kind", "layers", "nodes", "one node ms", "parallel ms", "halo")]
            for g in self.parallel:
                if g["kind"] == "tiles":
                    first, last, count = g["layers"]
                    what, how, halo = f"{first} .. {last} ({count})", "x".join(map(str, g["grid"])), f"+{g['halo']:.0%}"
                else:
                    what, halo = f"branches into {g['join']} ({len(g['branches'])})", "-"
                    how = " ".join(str(node) for node in g["branches"].values())  # each branch's node
                rows.append((g["tier"], g["kind"], what, how, f"{g['sequential_s'] * 1e3:.2f}",
                             f"{g['parallel_s'] * 1e3:.2f}", halo))
            lines += ["", format_table(rows, right=(4, 5))]
        if len(self.plans) > 1:
            loaded = c.load is not None
            rows = [("plan", "kind", "stages", "latency ms", "bottleneck ms", *(("under load ms",) if loaded else ()))]
            rows += [(p.name, p.kind, " ".join(p.stages), f"{p.latency * 1e3:.2f}", f"{p.bottleneck * 1e3:.2f}",
                      *(("overloaded" if p.latency_under_load_s is None else f"{p.latency_under_load_s * 1e3:.2f}",)
                        if loaded else ())) for p in self.plans]
            lines += ["", "plans a build carries (the runtime switches among them):",
                      format_table(rows, right=(3, 4, 5))]
        if compare:
            key = "latency" if self.objective == "latency" else "bottleneck"
            rows = [("strategy", "latency ms", "bottleneck ms", *(f"{lk} MB" for lk in self.links), f"{key} vs partc")]
            for name, cost in {"partc": c, **self.baselines}.items():
                if cost is None:
                    rows.append((name, "infeasible", "-", *("-" for _ in self.links), "-"))
                    continue
                ratio = cost.value(self.objective) / c.value(self.objective) if c.value(self.objective) else 1.0
                rows.append((name, f"{cost.latency * 1e3:.2f}", f"{cost.bottleneck * 1e3:.2f}",
                             *(f"{b / 1e6:.3f}" for b in cost.link_bytes),
                             f"{ratio:.2f}x" if np.isfinite(ratio) else "overloaded"))
            lines += ["", format_table(rows, right=range(1, len(rows[0])))]
        lines += [f"note: {note}" for note in self.notes]
        if self.sweep:
            s = self.sweep
            lines += ["", f"plan family over {s.link} from {_mbit(s.low)} to {_mbit(s.high)} Mbit/s: "
                      f"{len(s.plans)} plans, computed in {s.seconds * 1e3:.0f} ms"]
            rows = [("bandwidth Mbit/s", *(f"{t} layers" for t in self.tiers), "latency ms")]
            for p in s.plans:
                rows.append((f"{_mbit(p.low)} .. {_mbit(p.high)}", *map(str, p.nodes),
                             f"{p.latency_low * 1e3:.1f} .. {p.latency_high * 1e3:.1f}"))
            lines.append(format_table(rows, right=range(1, len(rows[0]))))
            if s.breakpoints:
                lines.append("the optimum changes at " + ", ".join(f"{_mbit(b)} Mbit/s" for b in s.breakpoints))
            if s.plot:
                lines.append(f"latency vs bandwidth plot: {s.plot}")
        if self.drawing:
            lines.append(f"partition drawn: {', '.join(self.drawing)}")
        return "\n".join(lines)


def _load_lines(load: LoadCost) -> list[str]:
    """The plan under the fleet's load (``partc.partition.load``): each tier's and link's share."""
    rows = [("under load", "instances", "requests/s each", "replicas", "batch", "utilisation", "peak", "queue ms")]
    rows += [(u.name, str(u.instances), f"{u.arrival_per_s:.3g}", str(u.replicas), str(u.batch),
              f"{u.utilisation:.0%}", f"{u.peak_utilisation:.0%}",
              "unbounded" if u.wait_s is None else f"{u.wait_s * 1e3:.2f}") for u in (*load.tiers, *load.links)]
    total = load.tiers[0].instances * load.tiers[0].arrival_per_s
    if load.latency_s is None:
        verdict = f"infeasible under load: {', '.join(u.name for u in load.overloaded)} cannot keep up"
    else:
        verdict = f"latency under load {load.latency_s * 1e3:.2f} ms, queueing included"
    return [format_table(rows, right=range(1, len(rows[0]))),
            f"{verdict} ({total:.3g} requests/s offered, the fleet sustains {load.capacity_per_s:.3g}; "
            "M/D/c queues, Allen-Cunneen)"]


def _mbit(bytes_per_second: float) -> str:
    return f"{bytes_per_second * 8 / 1e6:.3g}"


def plan_model(
    model: str,
    input_shapes: Sequence[str],
    cluster: Path | str,
    *,
    profiles: Mapping[str, Path] | None = None,
    sweep: str | None = None,
    sweep_range: tuple[str, str] = ("100kbit/s", "1Gbit/s"),
    plot: Path | None = None,
    draw: Path | None = None,
    dump_after: Sequence[str] = (),
    dump_dir: Path = Path("partc-dump"),
    progress: Callable[[str], None] = lambda _: None,
    compare: bool = True,
) -> PlanReport:
    """Python twin of ``partc plan``: ``partc compile`` stopped before emission.

    Args:
        model: a MODEL spec.
        input_shapes: one shape per model input.
        cluster: the cluster file.
        profiles: target name -> measured profile file.
        sweep: a link (``device->edge``) whose bandwidth to sweep over ``sweep_range``.
        sweep_range: the range, in units the cluster file accepts (``1Mbit/s``).
        plot: with ``sweep``, write the latency-vs-bandwidth plot here (PNG).
        draw: draw the primary plan on the model's graph here (``.dot``; ``.svg`` renders it too).
        dump_after: passes after which to dump the IR (``partc.compilation.compile_plans``).
        dump_dir: where to dump it.
        progress: called with a line of text as each step starts.
        compare: price every baseline strategy (``partc.compilation._Planner.baselines``);
            without it ``baselines`` is empty.

    Raises:
        PartcError: for a bad model, cluster, constraint, sweep link or range.
    """
    ctx = load_cluster(cluster, profiles)
    compiled = compile_plans(model, input_shapes, ctx, dump_after=dump_after, dump_dir=dump_dir, progress=progress,
                             compare=compare)
    graph, primary = compiled.graph, compiled.primary
    report = PlanReport(
        model=model, objective=ctx.objective, tiers=graph.tiers, links=graph.links,
        assignment={name: graph.tiers[k] for name, k in zip(graph.names, primary.tiers.tolist(), strict=True)},
        layers=_layers(graph.names, primary.tiers, graph.tiers), cost=primary.cost,
        codecs={link.name: link.codec.codec for link in compiled.links},
        solve_seconds=sum(compiled.pass_seconds.get(name, 0.0) for name in CUT_PASSES),
        baselines=dict(compiled.baselines),
        plans=tuple(BuildPlan(p.name, p.kind, tuple(s.name for s in p.plan.stages), p.cost.latency,
                              p.cost.bottleneck, p.cost.load and p.cost.load.latency_s) for p in compiled.plans),
        one_node=tuple(predict(graph, primary.tiers).compute.values()),
        parallel=tuple(primary.gm.meta.get(META_PARALLEL, ())), notes=compiled.notes,
    )
    if draw is not None:
        title = f"{model} on {Path(cluster).name}: predicted latency {primary.cost.latency * 1e3:.2f} ms"
        report = replace(report, drawing=tuple(map(str, draw_partition(primary.gm, Path(draw), graph.tiers, title))))
    if sweep is None:
        return report
    raw, _, _ = assigned_cost(compiled.gm, ctx)  # the sweep moves raw bandwidths: no codec
    return replace(report, sweep=_sweep(raw, sweep, sweep_range, plot, model, ctx))


def _layers(names, tiers: np.ndarray, tier_names) -> tuple[TierRuns, ...]:
    out = []
    for k, tier in enumerate(tier_names):
        runs, start = [], None
        for i, t in enumerate([*tiers, -1]):
            if t == k and start is None:
                start = i
            elif t != k and start is not None:
                runs.append((names[start], names[i - 1], i - start))
                start = None
        out.append(TierRuns(tier, int((tiers == k).sum()), tuple(runs)))
    return tuple(out)


def _sweep(graph, link: str, sweep_range: tuple[str, str], plot: Path | None, model: str, ctx) -> Sweep:
    if link not in graph.links:
        known = ", ".join(graph.links) or "none (one tier)"
        raise ClusterError(f"--sweep {link!r}: no such link; links are {known}")
    try:
        low, high = (parse_bandwidth(text) for text in sweep_range)
    except ValueError as err:
        raise ClusterError(f"--sweep-range: {err}") from None
    if not 0 < low < high:
        raise ClusterError(f"--sweep-range {sweep_range[0]}:{sweep_range[1]}: the low end must be below the high end")
    index = graph.links.index(link)
    started = time.perf_counter()
    family = plan_family(graph, {index: (low, high)})
    seconds = time.perf_counter() - started
    entries = []
    for p in family.plans:
        ends = [v[0] for v in p.region]
        lo, hi = min(ends), max(ends)
        at = [graph.bandwidth.copy(), graph.bandwidth.copy()]
        at[0][index], at[1][index] = lo, hi
        entries.append(FamilyEntry(lo, hi, tuple(np.bincount(p.tiers, minlength=len(graph.tiers)).tolist()),
                                   p.link_bytes, p.latency(at[0]), p.latency(at[1])))
    written = None
    if plot is not None:
        grid = np.geomspace(low, high, SWEEP_POINTS)
        series = bandwidth_sweep(graph, index, grid, ctx.objective)
        regions = [(e.low, e.high, "layers: " + ", ".join(f"{t} {n}" for t, n in zip(graph.tiers, e.nodes, strict=True)
                                                          if n)) for e in sorted(entries, key=lambda e: e.low)]
        latency = ctx.objective == "latency"  # the family's plans are latency-optimal: shaded only for that figure
        plot_bandwidth_sweep(series, grid, Path(plot), title=f"{model}: {link} bandwidth",
                             ylabel="latency" if latency else "bottleneck", regions=regions if latency else (),
                             bandwidth=graph.bandwidth[index])
        written = str(plot)
    return Sweep(link, low, high, family.breakpoints(), tuple(sorted(entries, key=lambda e: e.low)), seconds, written)
