"""Tiled stages: a stage whose tier has several nodes, run as steps across those nodes.

After ``tile-conv-stages`` a stage may hold tiled runs (``META_TILE`` = (run, tile) on
every per-tile node, (run, None) on the stitches). ``schedule_stage`` splits such a stage
into steps, each its own program:

- a *local* step runs on the stage's own node, ``<tier>.0`` (the coordinator): the
  untiled layers, and the crops that cut each tile's input out of a run's input map (so
  that only a tile's share crosses the network);
- a *tile* step runs tile ``t`` of every run of the step on node ``t``: ``<tier>.t``'s
  worker for ``t`` > 0, the coordinator itself for tile 0, all at once.

Steps alternate (local, tiles, local, ...): a run's tiles form one step after everything
its inputs need, and runs whose inputs are ready at the same step share it. The
coordinator scatters each tile's inputs to its node, computes tile 0 meanwhile, gathers
the tiles' outputs and goes on; the stitch is local work of the next step.
``schedule_fn`` turns a schedule and its loaded programs into one ``StageFn``, so a tiled
stage runs wherever a stage runs (in process, or in a worker whose tile calls go to its
peers over gRPC).
"""

from __future__ import annotations

import concurrent.futures
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from torch import fx

from partc.ir import META_TILE
from partc.partition.model import program_seconds
from partc.partition.price import LinkPrice, tiled_step_seconds
from partc.plan import Stage, StageFn, TensorSpec, spec_of

# Runs one tile step's program on another node: (node index, program id, named inputs) -> named outputs.
TileCall = Callable[[int, str, Mapping], dict]
# Told the seconds a node took for one program of a parallel step: (node index, program id, seconds).
Observer = Callable[[int, str, float], None]


@dataclass(frozen=True)
class Step:
    """One step of a schedule.

    Attributes:
        programs: one program (a local step) or one per node, tile t on node t.
    """

    programs: tuple[Stage, ...]

    @property
    def tiled(self) -> bool:
        """Whether this step runs tiles on several nodes."""
        return len(self.programs) > 1


@dataclass(frozen=True)
class Schedule:
    """A tiled stage as steps.

    Attributes:
        stage: the stage's name (its coordinator, ``<tier>.0``).
        inputs: the stage's inputs.
        outputs: the stage's outputs.
        steps: in the order they run.
        results: (stage output name, name of the tensor holding it after the last step).
    """

    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[Step, ...]
    results: tuple[tuple[str, str], ...]


def schedule_stage(stage: Stage) -> Schedule | None:
    """Split ``stage`` into steps (module docstring); None when it holds no tiled run.

    Reads meta[META_TILE] and the shapes and dtypes partc records on every node.
    Tile-step programs are named ``<tier>.<t>`` and have index ``t``.
    """
    gm = stage.gm
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if not any(n.meta.get(META_TILE) and n.meta[META_TILE][1] is not None for n in nodes):
        return None
    unit = {n: _unit(n) for n in nodes}
    phase = _phases(nodes, unit)
    width = 1 + max(t for kind, _, t in unit.values() if kind == "tile")
    slots = {n: phase[n] * (width + 1) + (unit[n][2] + 1 if unit[n][0] == "tile" else 0) for n in nodes}

    from torch.fx.passes.split_module import split_module

    split = split_module(gm, gm, lambda n: slots[n], keep_original_node_name=True, tuple_return=True)
    split.eval()  # a new GraphModule trains by default; its modules are the model's own
    programs = {int(c.target.removeprefix("submod_")): getattr(split, c.target)
                for c in split.graph.nodes if c.op == "call_module"}
    by_name = {n.name: n for n in gm.graph.nodes}
    steps = []
    for p in sorted({slot // (width + 1) for slot in programs}):
        if p % 2 == 0:
            steps.append(Step((_program(stage, programs[p * (width + 1)], 0, by_name),)))
        else:
            tiles = [programs.get(p * (width + 1) + t + 1) for t in range(width)]
            steps.append(Step(tuple(_program(stage, sub, t, by_name) for t, sub in enumerate(tiles) if sub)))
    returned = [a.name for a in gm.graph.output_node().args[0]]
    return Schedule(stage.name, stage.inputs, stage.outputs, tuple(steps),
                    tuple((spec.name, node) for spec, node in zip(stage.outputs, returned, strict=True)))


def schedule_seconds(schedule: Schedule, link: LinkPrice | None) -> float:
    """Predicted seconds of a tiled stage: its steps in turn; a local step its nodes' seconds
    (``partc.partition.model.program_seconds``), a tile step ``tiled_step_seconds`` over the
    tier's ``link`` to itself, each tile's inputs scattered and outputs gathered.

    Raises:
        ValueError: if the schedule has a tile step and ``link`` is None.
    """
    total = 0.0
    for step in schedule.steps:
        compute = [program_seconds(p.gm, p.tier) for p in step.programs]
        if not step.tiled:
            total += compute[0]
            continue
        if link is None:
            raise ValueError(f"{schedule.stage}: a tile step needs its tier's link to itself")
        scatter = [sum(t.nbytes for t in p.inputs) for p in step.programs]
        gather = [sum(t.nbytes for t in p.outputs) for p in step.programs]
        total += tiled_step_seconds(compute, scatter, gather, link)
    return total


def _unit(node: fx.Node) -> tuple[str, int, int]:
    """('tile', run, tile) for a tile's own work; ('local', 0, 0) for the rest, entry crops included."""
    tag = node.meta.get(META_TILE)
    if not tag or tag[1] is None:
        return ("local", 0, 0)
    entry = node.target is operator.getitem and all(a.meta.get(META_TILE) != tag for a in node.all_input_nodes)
    return ("local", 0, 0) if entry else ("tile", tag[0], tag[1])


def _phases(nodes: list[fx.Node], unit: Mapping[fx.Node, tuple[str, int, int]]) -> dict[fx.Node, int]:
    """Phase of every node: even for local work, odd for tiles; all tiles of a run share the
    first odd phase after every local value they read."""
    run_nodes: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if unit[n][0] == "tile":
            run_nodes.setdefault(unit[n][1], []).append(n)
    phase: dict[fx.Node, int] = {}
    pending = list(nodes)
    while pending:
        waiting = []
        for n in pending:
            if n in phase:
                continue
            if unit[n][0] == "tile":
                members = run_nodes[unit[n][1]]
                feeds = [a for m in members for a in m.all_input_nodes if a in unit and unit[a][0] == "local"]
                if any(a not in phase for a in feeds):
                    waiting.append(n)
                    continue
                odd = 1 + max((phase[a] for a in feeds), default=0) // 2 * 2
                phase.update(dict.fromkeys(members, odd))
                continue
            inputs = [a for a in n.all_input_nodes if a in unit]
            if any(a not in phase for a in inputs):
                waiting.append(n)
                continue
            latest = max((phase[a] for a in inputs), default=0)
            phase[n] = latest + latest % 2
        if len(waiting) == len(pending):
            raise RuntimeError("a tiled stage's runs depend on each other in a cycle (a bug in tile-conv-stages)")
        pending = waiting
    return phase


def _program(stage: Stage, sub: fx.GraphModule, tile: int, by_name: Mapping[str, fx.Node]) -> Stage:
    inputs = tuple(spec_of(by_name[p.name], p.name) for p in sub.graph.nodes if p.op == "placeholder")
    outputs = tuple(spec_of(by_name[v.name], v.name) for v in sub.graph.output_node().args[0])
    return replace(stage, name=f"{stage.tier}.{tile}", index=tile, gm=sub, inputs=inputs, outputs=outputs)


def schedule_fn(steps: Sequence[Sequence[str]], reads: Mapping[str, Sequence[str]],
                results: Sequence[tuple[str, str]], local: Mapping[str, StageFn], call: TileCall,
                pool: concurrent.futures.Executor, observe: Observer | None = None) -> StageFn:
    """Return the ``StageFn`` of a tiled stage.

    Args:
        steps: per step, the program id each node runs (one id: a local step).
        reads: program id -> names of the tensors it reads.
        results: (stage output name, tensor holding it after the last step).
        local: program id -> loaded program, for the programs the coordinator (node 0) runs.
        call: runs a program on node t > 0: ``call(t, program id, inputs)``.
        pool: runs the calls to other nodes while the coordinator computes tile 0.
        observe: told the seconds of every program of a parallel step, the coordinator's own
            and each call to another node (``partc.runtime.watch.NodeWatch.observe``).
    """

    def timed(t: int, pid: str, inputs: Mapping) -> dict:
        start = time.perf_counter()
        out = call(t, pid, inputs)
        observe(t, pid, time.perf_counter() - start)
        return out

    def run(tensors: Mapping) -> dict:
        env = dict(tensors)
        for ids in steps:
            remote = [pool.submit(timed if observe else call, t, pid, {n: env[n] for n in reads[pid]})
                      for t, pid in enumerate(ids) if t]
            start = time.perf_counter()
            env.update(local[ids[0]]({n: env[n] for n in reads[ids[0]]}))
            if observe and remote:
                observe(0, ids[0], time.perf_counter() - start)
            for future in remote:
                env.update(future.result())
        return {name: env[node] for name, node in results}

    return run


def step_id(program: str, step: int, tile: int) -> str:
    """Id of the program that node ``tile`` runs in step ``step`` of the tiled ``program``: ``edge.0~1.0``."""
    return f"{program}~{step}.{tile}"


def local_schedule_fn(schedule: Schedule, program: str, fns: Mapping[str, StageFn],
                      pool: concurrent.futures.Executor) -> StageFn:
    """``schedule_fn`` for the tiled ``program`` with every step program loaded here (``fns`` by step id)."""
    steps = [[step_id(program, i, t) for t in range(len(s.programs))] for i, s in enumerate(schedule.steps)]
    reads = {step_id(program, i, t): [x.name for x in p.inputs]
             for i, s in enumerate(schedule.steps) for t, p in enumerate(s.programs)}
    return schedule_fn(steps, reads, schedule.results, fns, lambda t, sid, x: fns[sid](x), pool)
