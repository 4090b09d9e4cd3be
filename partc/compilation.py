"""The one road from a model to a build's plans, shared by ``partc plan`` and ``partc compile``.

``compile_plans`` traces the model and runs the pipeline (``partc.pipeline.Pipeline``):

1. the model passes on the whole model (profile annotation, the cut, each link's codec),
   which choose the cut as if every tier were one machine;
2. the joint cut (``_Planner.joint_cut``): under a fleet's load (the cluster file's
   ``rate``), the best chain cut priced with queueing (``partc.partition.baselines.fleet_cut``)
   where it beats the cut for one request; then the cut re-solved with each parallel tier's
   node seconds scaled by its speed-up (a tier with several nodes and a link to itself
   runs fork/join branches and spatial tiles in parallel: the plan passes), every
   assignment found realised and priced exactly, the best kept;
3. the build's other plans on the cost graph so scaled, links at their codecs' effective
   bandwidth (``partc.partition.family.deployment_plans``: the rest of the plan family,
   fallbacks that stop before a tier), and a fallback that runs the primary plan's cut on
   one node per tier (for a dead or slow node of a parallel tier);
4. the plan passes on each plan, once its tiers are assigned: every order-preserving subset
   of them, the fastest kept (so a plan never loses to its one-node self, nor to branches
   alone or tiles alone);
5. each plan's stages (``partc.plan.build_plan``), its distinct programs (a piece of the
   model several plans share is one program), each parallel stage's schedule
   (``partc.tiling.schedule``), each program's predicted seconds and each plan's
   ``Prediction`` (``partc.partition.price``): the only prices the report, the manifest
   and the runtime's plan selector show; under load, each plan's ``Cost.load`` too
   (``partc.partition.load``), by which plans are then ranked. The primary plan is the build's
   fastest at the cluster file's bandwidths (and load).

Guarantee: the primary plan is never worse, by the objective, than the plan partc builds by
separate steps (the cut for one machine per tier, then the plan passes), nor than any other
plan of the build at the cluster file's bandwidths; the cut is exact for the scaled costs
(``partc.partition.solve``), the branch assignment exact per region
(``partc.tiling.branches``), the tile grids exact per run (``partc.tiling.split``); the
joint choice across them is a fixed-point search, not a proof of the global optimum.

``partc plan`` is this road and a report; ``partc compile`` goes on to emit every program
and write the manifest. The primary plan's programs are named after their stage (``edge.0``),
the others after the plan that first needs them (``edge.0-p2``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import fx, nn

from partc.codec import NO_CODEC, LinkCodec
from partc.compression import cut_codecs
from partc.context import CompileContext
from partc.ir import META_CODEC_MEASUREMENTS, META_LINK_CODECS, META_SPLITS, META_TIER, clone, link_name
from partc.partition.baselines import baselines, fleet_cut
from partc.partition.cost import Cost, CostGraph, Partition, evaluate, predict, violations
from partc.partition.family import deployment_plans
from partc.partition.load import Load, price_load
from partc.partition.model import assigned_cost, fleet_load, link_price, priced, program_seconds
from partc.partition.price import LinkPrice, Prediction
from partc.partition.solve import solve
from partc.passes import DEFAULT_PIPELINE, PASSES
from partc.pipeline import Pass, Pipeline, dump_ir, run_passes
from partc.plan import Plan, Stage, build_plan
from partc.report import trace_model
from partc.tiling.schedule import Schedule, schedule_seconds, schedule_stage, step_id
from partc.trace import load_model

JOINT_ROUNDS = 4  # most re-solves of the cut with parallel tiers' speed-ups (``_Planner.joint_cut``)


@dataclass(frozen=True)
class Program:
    """A distinct stage program of the build.

    Attributes:
        id: ``<stage>`` for the primary plan's, ``<stage>-p<i>`` for one plan i first needs.
        stage: what it runs.
        schedule: its steps across the tier's nodes, when it holds tiled runs.
        seconds: predicted seconds on its tier's target.
    """

    id: str
    stage: Stage
    schedule: Schedule | None
    seconds: float


@dataclass(frozen=True)
class CompiledPlan:
    """One plan of the build.

    Attributes:
        name: ``p0`` (the primary plan), ``p1``, ...
        kind: "primary", "adaptive" (another plan of the family) or "fallback".
        tiers: tier index of each cost-graph node (every IR node but the output).
        gm: the IR with its tiers assigned, the plan passes run.
        plan: its stages.
        programs: stage -> the id of the program it runs.
        prediction: its predicted cost.
        cost: the same, per tier and link, with memory (``partc.partition.cost.Cost``).
    """

    name: str
    kind: str
    tiers: np.ndarray
    gm: fx.GraphModule
    plan: Plan
    programs: Mapping[str, str]
    prediction: Prediction
    cost: Cost


@dataclass(frozen=True)
class Compilation:
    """What the pipeline made of a model on a cluster, before anything is emitted.

    Attributes:
        ctx: the cluster.
        gm: the IR after the model passes (the primary plan's tiers, untiled).
        graph: its cost graph, each link at its codec's effective bandwidth.
        links: the links between consecutive tiers, with their codecs, as plans are priced.
        plans: the build's plans; ``plans[0]`` is the primary one.
        programs: every distinct program by id, in the order plans first need them.
        pass_seconds: seconds each pass took (plan passes summed over the plans).
        source: the file that defines the model's class (None: not from a file).
        notes: what the user should know about the cluster (a tier's nodes left unused).
        baselines: strategy -> its cost (``_Planner.baselines``; None: infeasible), when asked for.
    """

    ctx: CompileContext
    gm: fx.GraphModule
    graph: CostGraph
    links: tuple[LinkPrice, ...]
    plans: tuple[CompiledPlan, ...]
    programs: Mapping[str, Program]
    pass_seconds: Mapping[str, float]
    source: Path | None
    notes: tuple[str, ...] = ()
    baselines: Mapping[str, Cost | None] = field(default_factory=dict)

    @property
    def primary(self) -> CompiledPlan:
        """The plan compiled for the cluster file's bandwidths."""
        return self.plans[0]

    @property
    def artifacts(self) -> dict[str, Stage]:
        """Every program that becomes an artifact, by id: untiled programs, and each step
        program of a tiled one (``partc.tiling.schedule.step_id``)."""
        out = {}
        for pid, program in self.programs.items():
            if program.schedule is None:
                out[pid] = program.stage
                continue
            for i, step in enumerate(program.schedule.steps):
                out |= {step_id(pid, i, t): p for t, p in enumerate(step.programs)}
        return out


def compile_plans(
    model: nn.Module | str,
    input_shapes: Sequence[str],
    ctx: CompileContext,
    *,
    pipeline: Pipeline = DEFAULT_PIPELINE,
    dump_after: Iterable[str] = (),
    dump_dir: Path = Path("partc-dump"),
    progress: Callable[[str], None] = lambda _: None,
    compare: bool = False,
) -> Compilation:
    """Trace ``model`` and run ``pipeline`` on it, up to every plan's priced programs (module docstring).

    Args:
        model: an ``nn.Module`` or a MODEL spec.
        input_shapes: one shape per model input (``"1,3,224,224"``).
        ctx: the cluster.
        pipeline: the passes to run.
        dump_after: passes after which to dump the IR (``trace`` for the traced IR); a plan
            pass dumps once per plan, suffixed ``-p<i>``.
        dump_dir: where to dump it.
        progress: called with a line of text as each step starts.
        compare: also price every baseline strategy (``Compilation.baselines``).

    Raises:
        PartcError: for a bad model, shapes, constraints, an unsupported layer or a pass
            that fails on bad input.
    """
    pipeline.check_dumps(dump_after)
    progress(f"tracing {model if isinstance(model, str) else type(model).__name__}")
    module = load_model(model) if isinstance(model, str) else model
    source = getattr(sys.modules.get(type(module).__module__), "__file__", None)
    gm = trace_model(module, input_shapes)
    timings: dict[str, float] = {}
    gm = run_passes(gm, pipeline.model, ctx, dump_after=dump_after, dump_dir=dump_dir, progress=progress,
                    timings=timings)
    raw, first_cut, _ = assigned_cost(gm, ctx)
    codecs = gm.meta.get(META_LINK_CODECS, {})
    graph = priced(raw, codecs)
    names = ctx.tier_names
    links = tuple(link_price(ctx, ctx.link(a, b), codecs.get(link_name(a, b), NO_CODEC))
                  for a, b in zip(names, names[1:], strict=False))
    notes = tuple(
        f"{t.name} has {t.nodes} nodes but no link {link_name(t.name, t.name)}: only one of them is used; add "
        f"{{from: {t.name}, to: {t.name}, bandwidth: ..., latency: ...}} to the cluster file's links"
        for t in ctx.tiers if t.nodes > 1 and ctx.link(t.name, t.name) is None and not ctx.loaded
    )  # under a fleet's load, the nodes host the tier's replicas
    for note in notes:
        progress(f"note: {note}")
    gm.meta[META_SPLITS] = {}  # each run split once across the plan passes' variants
    planner = _Planner(gm, raw, graph, links, ctx, pipeline, set(dump_after), timings, fleet_load(graph, ctx))
    progress("choosing the cut with each tier's parallel speed-ups")
    cut, parallel = planner.joint_cut(first_cut)
    progress("planning for other bandwidths and for failed tiers and nodes")
    parallel_tiers = {t.name for t in ctx.tiers if t.nodes > 1 and ctx.link(t.name, t.name) is not None}
    choices = deployment_plans(parallel, cut, ctx.objective)
    candidates = [(kind, planner.realise(tiers)) for kind, tiers in choices]
    # the primary plan is the build's fastest at the cluster file's bandwidths, its parallel steps priced
    fastest = min(range(len(candidates)), key=lambda i: (candidates[i][1].cost.rank(ctx.objective), i))
    if fastest:
        candidates = [("primary", candidates[fastest][1]), ("adaptive", candidates[0][1]),
                      *(c for i, c in enumerate(candidates) if i not in (0, fastest))]
    if any(s.tier in parallel_tiers for s in candidates[0][1].plan.stages):  # a node may die: plan without them
        alone = planner.realise_with(candidates[0][1].tiers, ())
        known = {tuple(map(_program_key, c.plan.stages)) for _, c in candidates}
        if tuple(map(_program_key, alone.plan.stages)) not in known:
            candidates.append(("fallback", alone))
    programs, uses = _programs([c.plan for _, c in candidates], planner.scheduled)
    compiled = tuple(
        CompiledPlan(f"p{i}", kind, c.tiers, c.gm, c.plan, use, c.prediction, c.cost)
        for i, ((kind, c), use) in enumerate(zip(candidates, uses, strict=True))
    )
    for i, (_, c) in enumerate(candidates):
        for index, name, snapshot in c.snapshots:
            dump_ir(snapshot, dump_dir / f"{index:02d}-{name}-p{i}", ctx.tier_names)
    for note in _overload_notes(compiled[0].cost):
        progress(f"note: {note}")
        notes += (note,)
    found = {}
    if compare:
        progress("pricing the baseline strategies")
        found = planner.baselines(first_cut)
    return Compilation(ctx, gm, graph, links, compiled, programs, timings, Path(source) if source else None,
                       notes, found)


@dataclass(frozen=True)
class _Candidate:
    """One assignment realised: its plan passes run, its stages split, priced."""

    tiers: np.ndarray
    gm: fx.GraphModule
    plan: Plan
    prediction: Prediction
    cost: Cost
    snapshots: tuple[tuple[int, str, fx.GraphModule], ...]  # IR after each plan pass to dump


class _Planner:
    """Realises and prices assignments for one compile, each once (``realise`` caches by assignment)."""

    def __init__(self, gm, raw, graph, links, ctx, pipeline, dump_after, timings, load: Load | None):
        self.gm, self.raw, self.graph, self.links, self.ctx, self.pipeline = gm, raw, graph, links, ctx, pipeline
        self.dump_after, self.timings, self.load = dump_after, timings, load
        self.realised: dict[bytes, _Candidate] = {}
        self.scheduled: dict[tuple, tuple[Schedule | None, float]] = {}  # program key -> (schedule, seconds)

    def realise(self, tiers: np.ndarray) -> _Candidate:
        """The plan of ``tiers`` with the combination of plan passes that prices fastest.

        Every order-preserving subset of the plan passes is run (each pass once per distinct
        input: the subsets share their prefixes) and priced; the passes decide on estimates
        without the glue between steps, the price counts it, so a plan never loses to its
        one-node self nor to any of its passes alone.
        """
        tiers = np.asarray(tiers, dtype=np.int64)
        key = tiers.tobytes()
        if key not in self.realised:
            states: dict[tuple[str, ...], tuple[fx.GraphModule, tuple]] = {(): (self._assigned(tiers), ())}
            for offset, p in enumerate(self.pipeline.plan, start=len(self.pipeline.model) + 1):
                for applied, (g, snapshots) in list(states.items()):
                    g = run_passes(g, (p,), self.ctx, timings=self.timings)
                    shot = ((offset, p.name, g),) if p.name in self.dump_after else ()
                    states[(*applied, p.name)] = (g, snapshots + shot)
            distinct = {id(g): (g, snapshots) for g, snapshots in states.values()}  # a pass that did nothing
            variants = [self._priced(tiers, g, snapshots) for g, snapshots in distinct.values()]
            self.realised[key] = min(variants, key=lambda c: c.cost.rank(self.ctx.objective))
        return self.realised[key]

    def realise_with(self, tiers: np.ndarray, passes: Sequence[Pass]) -> _Candidate:
        """The plan of ``tiers`` with exactly ``passes`` run on it (none: one node per tier), priced."""
        tiers = np.asarray(tiers, dtype=np.int64)
        g = self._assigned(tiers)
        for p in passes:
            g = run_passes(g, (p,), self.ctx, timings=self.timings)
        return self._priced(tiers, g, ())

    def _assigned(self, tiers: np.ndarray) -> fx.GraphModule:
        return _assign(self.gm, self.ctx.tier_names, tiers)

    def _priced(self, tiers: np.ndarray, g: fx.GraphModule, snapshots: tuple) -> _Candidate:
        plan = build_plan(g, self.ctx)
        own = self.own_codecs(tiers)
        paying = priced(self.raw, {link.name: own.get(link.name, link.codec) for link in self.links})
        prediction = replace(predict(paying, tiers, {s.tier: self.seconds(s) for s in plan.stages}), codecs=own)
        return _Candidate(tiers, g, plan, prediction, self.cost(tiers, prediction, paying), snapshots)

    def price(self, tiers: np.ndarray) -> Cost:
        """The cost of ``tiers`` on one node per tier, each link paying its codec on its own cut tensors."""
        own = self.own_codecs(tiers)
        paying = priced(self.raw, {link.name: own.get(link.name, link.codec) for link in self.links})
        return self.cost(tiers, replace(predict(paying, tiers), codecs=own), paying)

    def cost(self, tiers: np.ndarray, prediction: Prediction, paying: CostGraph) -> Cost:
        """``prediction``'s figures (under the fleet's load, when given) and ``tiers``' memory on ``paying``."""
        load = None if self.load is None else price_load(self.load, tiers, prediction, self.links)
        return Cost.of(prediction, self.links, evaluate(paying, tiers).memory, load)

    def baselines(self, first: np.ndarray) -> dict[str, Cost | None]:
        """Every baseline strategy priced by the rules partc's plans are priced by.

        The classic strategies (``partc.partition.baselines``) choose their cut on the cost
        graph as partc does and pay, link by link, the codec measured on their own cut
        tensors. Where a tier runs in parallel, the seeds' multi-node strategies too:
        ``d3+tiles`` (the D3-style greedy cut, its parallel tiers tiled), ``deepthings``
        (everything on the first parallel tier, tiled over its nodes) and ``branch-lb``
        (``first``, the cut for one machine per tier, with branches load-balanced over the
        nodes). None: the strategy has no feasible plan.
        """
        ctx = self.ctx
        classic = self.classic
        found = {name: None if p is None else self.price(p.tiers) for name, p in classic.items()}
        parallel = [k for k, t in enumerate(ctx.tiers) if t.nodes > 1 and ctx.link(t.name, t.name) is not None]
        if not parallel:
            return found
        tiles, branches = (PASSES["tile-conv-stages"],), (PASSES["distribute-branches"],)
        d3 = classic["d3-greedy"]
        found["d3+tiles"] = None if d3 is None else self.realise_with(d3.tiers, tiles).cost
        alone = np.where(self.graph.inputs, 0, parallel[0])
        found["deepthings"] = None if violations(self.graph, alone) else self.realise_with(alone, tiles).cost
        found["branch-lb"] = self.realise_with(first, branches).cost
        return found

    def own_codecs(self, tiers: np.ndarray) -> dict[str, LinkCodec]:
        """Each link's codec with its ratio measured on the tensors ``tiers`` sends over it, where that
        differs from the codec on the cut it was chosen for (``compress-cut-tensors``); its speeds are
        the chosen codec's (the cost model's for the link's targets)."""
        measured = self.gm.meta.get(META_CODEC_MEASUREMENTS)
        if measured is None:
            return {}
        chosen = [link.codec for link in self.links]
        own = cut_codecs(measured, self.raw, chosen, tiers)
        return {link.name: replace(mine, agreement=theirs.agreement) for link, mine, theirs in zip(
            self.links, own, chosen, strict=True) if (mine.ratio, mine.encode_bytes_per_s, mine.decode_bytes_per_s)
                != (theirs.ratio, theirs.encode_bytes_per_s, theirs.decode_bytes_per_s)}

    def seconds(self, stage: Stage) -> float:
        """Predicted seconds of a stage program: its schedule's when it runs on several nodes."""
        key = _program_key(stage)
        if key not in self.scheduled:
            schedule = schedule_stage(stage)
            if schedule is None:
                self.scheduled[key] = (None, program_seconds(stage.gm, stage.tier))
            else:
                link = self.ctx.link(stage.tier, stage.tier)
                price = link_price(self.ctx, link) if link else None
                self.scheduled[key] = (schedule, schedule_seconds(schedule, price))
        return self.scheduled[key][1]

    def joint_cut(self, first: np.ndarray) -> tuple[np.ndarray, CostGraph]:
        """The cut chosen knowing each tier's parallel speed-up, and the cost graph priced so.

        Starts from ``first`` (the cut chosen as if every tier were one machine), or under load
        the best chain cut priced with queueing (``fleet_cut``) where that ranks better; then
        re-solves the cut with each parallel tier's node seconds scaled by its speed-up
        (first assumed perfect, ``1 / nodes``, then as measured on the last plan realised:
        its stage's priced seconds over its nodes' summed seconds) until an assignment
        repeats or ``JOINT_ROUNDS`` rounds have run. The assignments of the baseline strategies
        (``seeds``: every classic cut, and everything on each parallel tier) are candidates too.
        Every assignment found is realised and priced exactly; the best one is returned, so the
        result is never worse than the separate-steps plan ``first`` nor than any baseline,
        multi-node ones included.
        """
        ctx, graph = self.ctx, self.graph
        parallel = [k for k, t in enumerate(ctx.tiers) if t.nodes > 1 and ctx.link(t.name, t.name) is not None]
        best = self.realise(first)
        fleet = None if self.load is None else fleet_cut(graph, self.load, ctx.objective)
        if fleet is not None and self.realise(fleet).cost.rank(ctx.objective) < best.cost.rank(ctx.objective):
            best = self.realise(fleet)
        if not parallel:
            return best.tiers, graph
        speedup = np.ones(len(ctx.tiers))
        speedup[parallel] = [1 / ctx.tiers[k].nodes for k in parallel]
        best_graph, seen = graph, {best.tiers.tobytes()}
        for _ in range(JOINT_ROUNDS):
            scaled = replace(graph, compute=graph.compute * speedup)
            tiers = solve(scaled, ctx.objective).tiers
            found = self.realise(tiers)
            if found.cost.rank(ctx.objective) < best.cost.rank(ctx.objective):
                best, best_graph = found, scaled
            if tiers.tobytes() in seen:
                break
            seen.add(tiers.tobytes())
            sums = np.bincount(found.tiers, weights=graph.compute[np.arange(len(tiers)), tiers],
                               minlength=len(ctx.tiers))
            for k in parallel:
                priced_seconds = found.prediction.compute[ctx.tiers[k].name]
                if sums[k] > 0:
                    speedup[k] = min(1.0, priced_seconds / sums[k])
        for tiers in self.seeds(parallel):
            found = self.realise(tiers)
            if found.cost.rank(ctx.objective) < best.cost.rank(ctx.objective):
                best, best_graph = found, replace(graph, compute=graph.compute * speedup)
        return best.tiers, best_graph

    def seeds(self, parallel: Sequence[int]) -> list[np.ndarray]:
        """The baseline strategies' assignments: every classic cut, everything on each parallel tier."""
        found = [p.tiers for p in self.classic.values() if p is not None]
        for k in parallel:
            alone = np.where(self.graph.inputs, 0, k)
            if not violations(self.graph, alone):
                found.append(alone)
        return found

    @functools.cached_property
    def classic(self) -> dict[str, Partition | None]:
        """The classic strategies' plans on the cost graph (``partc.partition.baselines``)."""
        return baselines(self.graph, self.ctx.objective)


def _overload_notes(cost: Cost) -> tuple[str, ...]:
    """What to say when the primary plan cannot keep up with the fleet's load."""
    return tuple(
        f"infeasible under load: {u.name} would run at {u.peak_utilisation:.0%} of its capacity "
        f"({u.arrival_per_s:.3g} requests/s on each of its {u.instances} instance(s)) even at its most replicas "
        "and full batches; give the shared tiers more replicas or a larger max_batch, or lower the rate"
        for u in (cost.load.overloaded if cost.load else ()))


def _program_key(stage: Stage) -> tuple:
    return (stage.name, stage.gm.code, stage.inputs, stage.outputs)


def _assign(gm: fx.GraphModule, tier_names: Sequence[str], tiers: np.ndarray) -> fx.GraphModule:
    """A copy of ``gm`` with the tier of each node (cost-graph order: every node but the output)."""
    gm = clone(gm)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    for node, tier in zip(nodes, tiers.tolist(), strict=True):
        node.meta[META_TIER] = tier_names[tier]
    out = gm.graph.output_node()
    out.meta[META_TIER] = tier_names[max((tier_names.index(a.meta[META_TIER]) for a in out.all_input_nodes), default=0)]
    return gm


def _programs(
    plans: Sequence[Plan], scheduled: Mapping[tuple, tuple[Schedule | None, float]]
) -> tuple[dict[str, Program], list[dict[str, str]]]:
    """Every distinct stage program of ``plans`` by id (module docstring), with its schedule and
    seconds from ``scheduled``, and for each plan the program each of its stages runs."""
    programs: dict[str, Program] = {}
    seen: dict[tuple, str] = {}
    uses = []
    for i, plan in enumerate(plans):
        for stage in plan.stages:
            key = _program_key(stage)
            if key not in seen:
                seen[key] = pid = stage.name if i == 0 else f"{stage.name}-p{i}"
                programs[pid] = Program(pid, stage, *scheduled[key])
        uses.append({s.name: seen[_program_key(s)] for s in plan.stages})
    return programs, uses
