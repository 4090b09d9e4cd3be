"""The one road from a model to a build's plans, shared by ``partc plan`` and ``partc compile``.

``compile_plans`` traces the model and runs the pipeline (``partc.pipeline.Pipeline``):

1. the model passes on the whole model (profile annotation, the cut, each link's codec),
   which choose the primary plan;
2. the build's other plans on the same cost graph, links at their codecs' effective
   bandwidth (``partc.partition.family.deployment_plans``: the rest of the plan family,
   and fallbacks that stop before a tier);
3. the plan passes on each plan, once its tiers are assigned (tiling);
4. each plan's stages (``partc.plan.build_plan``), its distinct programs (a piece of the
   model several plans share is one program), each tiled stage's schedule
   (``partc.tiling.schedule``);
5. each program's predicted seconds and each plan's ``Prediction``
   (``partc.partition.price``): the only prices the report, the manifest and the runtime's
   plan selector show.

``partc plan`` is this road and a report; ``partc compile`` goes on to emit every program
and write the manifest. The primary plan's programs are named after their stage (``edge.0``),
the others after the plan that first needs them (``edge.0-p2``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import fx, nn

from partc.codec import NO_CODEC
from partc.context import CompileContext
from partc.ir import META_LINK_CODECS, META_TIER, clone, link_name
from partc.partition.cost import Cost, CostGraph, evaluate, predict
from partc.partition.family import deployment_plans
from partc.partition.model import assigned_cost, link_price, priced, program_seconds
from partc.partition.price import LinkPrice, Prediction
from partc.passes import DEFAULT_PIPELINE
from partc.pipeline import TRACE, Pipeline, run_passes
from partc.plan import Plan, Stage, build_plan
from partc.report import trace_model
from partc.tiling.schedule import Schedule, schedule_seconds, schedule_stage, step_id
from partc.trace import load_model


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
    """

    ctx: CompileContext
    gm: fx.GraphModule
    graph: CostGraph
    links: tuple[LinkPrice, ...]
    plans: tuple[CompiledPlan, ...]
    programs: Mapping[str, Program]
    pass_seconds: Mapping[str, float]
    source: Path | None

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
    graph, primary, _ = assigned_cost(gm, ctx)
    codecs = gm.meta.get(META_LINK_CODECS, {})
    graph = priced(graph, codecs)
    names = ctx.tier_names
    links = tuple(link_price(ctx.link(a, b), codecs.get(link_name(a, b), NO_CODEC))
                  for a, b in zip(names, names[1:], strict=False))
    progress("planning for other bandwidths and for failed tiers")
    choices = deployment_plans(graph, primary, ctx.objective)
    assigned = []
    for i, (_, tiers) in enumerate(choices):
        g = run_passes(_assign(gm, names, tiers), pipeline.plan, ctx, dump_after=set(dump_after) - {TRACE},
                       dump_dir=dump_dir, first=len(pipeline.model) + 1, suffix=f"-p{i}", progress=progress,
                       timings=timings)
        assigned.append(g)
    plans = [build_plan(g, ctx) for g in assigned]
    programs, uses = _programs(plans, ctx)
    compiled = []
    for i, ((kind, tiers), g, plan, use) in enumerate(zip(choices, assigned, plans, uses, strict=True)):
        prediction = predict(graph, tiers, {s.tier: programs[use[s.name]].seconds for s in plan.stages})
        cost = Cost.of(prediction, links, evaluate(graph, tiers).memory)
        compiled.append(CompiledPlan(f"p{i}", kind, tiers, g, plan, use, prediction, cost))
    return Compilation(ctx, gm, graph, links, tuple(compiled), programs, timings, Path(source) if source else None)


def _assign(gm: fx.GraphModule, tier_names: Sequence[str], tiers: np.ndarray) -> fx.GraphModule:
    """A copy of ``gm`` with the tier of each node (cost-graph order: every node but the output)."""
    gm = clone(gm)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    for node, tier in zip(nodes, tiers.tolist(), strict=True):
        node.meta[META_TIER] = tier_names[tier]
    out = gm.graph.output_node()
    out.meta[META_TIER] = tier_names[max((tier_names.index(a.meta[META_TIER]) for a in out.all_input_nodes), default=0)]
    return gm


def _programs(plans: Sequence[Plan], ctx: CompileContext) -> tuple[dict[str, Program], list[dict[str, str]]]:
    """Every distinct stage program of ``plans`` by id, scheduled and priced, and for each plan
    the program each of its stages runs."""
    programs: dict[str, Program] = {}
    seen: dict[tuple, str] = {}
    uses = []
    for i, plan in enumerate(plans):
        for stage in plan.stages:
            key = (stage.name, stage.gm.code, stage.inputs, stage.outputs)
            if key not in seen:
                seen[key] = pid = stage.name if i == 0 else f"{stage.name}-p{i}"
                schedule = schedule_stage(stage)
                if schedule is None:
                    seconds = program_seconds(stage.gm, stage.tier)
                else:
                    self_link = ctx.link(stage.tier, stage.tier)
                    seconds = schedule_seconds(schedule, link_price(self_link) if self_link else None)
                programs[pid] = Program(pid, stage, schedule, seconds)
        uses.append({s.name: seen[(s.name, s.gm.code, s.inputs, s.outputs)] for s in plan.stages})
    return programs, uses
