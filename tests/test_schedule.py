"""Tiled stages as steps across a tier's nodes: exactly the untiled stage, on real DAG models."""

import concurrent.futures

import numpy as np
import pytest
import torch

from partc.cluster import cluster_from_dict
from partc.ir import META_TILE
from partc.passes import passes_named
from partc.passes.tile import tile_graph
from partc.pipeline import run_passes
from partc.plan import build_plan, eager_stage_fn, run_plan
from partc.report import trace_model
from partc.tiling.schedule import local_schedule_fn, schedule_stage, step_id


def _tiled_plan(model, shape, grid):
    nodes = grid[0] * grid[1]
    ctx = cluster_from_dict({"tiers": [{"name": "edge", "target": "edge-x86", "backend": "onnx", "nodes": nodes}]})
    gm = run_passes(trace_model(model, [shape]), passes_named(["annotate-profile", "select-cuts"]), ctx)
    tiled, runs = tile_graph(gm, grid)
    assert runs
    return gm, build_plan(tiled, ctx)


@pytest.mark.parametrize(("model", "grid"), [("torchvision:resnet18", (2, 2)), ("torchvision:googlenet", (1, 2)),
                                             ("tests/models.py:branches", (1, 3))])
def test_steps_run_across_nodes_give_the_untiled_output(model, grid):
    shape = "1,3,224,224" if model.startswith("torchvision") else "1,4,16,16"
    gm, plan = _tiled_plan(model, shape, grid)
    (stage,) = plan.stages
    schedule = schedule_stage(stage)
    assert [len(step.programs) for step in schedule.steps][:2] in ([grid[0] * grid[1], 1], [1, grid[0] * grid[1]])
    for step in schedule.steps:
        assert [p.name for p in step.programs] == [f"edge.{t}" for t in range(len(step.programs))]
        if step.tiled:  # a tile step holds each tile's own work, nothing of another tile
            for t, program in enumerate(step.programs):
                tags = {n.meta[META_TILE] for n in program.gm.graph.nodes if META_TILE in n.meta}
                assert {tile for _, tile in tags} == {t}
    fns = {step_id("p", i, t): eager_stage_fn(program)
           for i, step in enumerate(schedule.steps) for t, program in enumerate(step.programs)}
    calls = []

    def counted(fn, sid):
        def run(tensors):
            calls.append(sid)
            return fn(tensors)
        return run

    fns = {sid: counted(fn, sid) for sid, fn in fns.items()}
    x = torch.randn(*map(int, shape.split(",")), generator=torch.Generator().manual_seed(0))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = run_plan(plan, {stage.name: local_schedule_fn(schedule, "p", fns, pool)}, {"x": x.numpy()})
    with torch.no_grad():
        want = gm(x)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    name = plan.model_outputs[0].name
    assert np.abs(got[name] - want).max() <= 1e-5 * np.abs(want).max()
    assert sorted(calls) == sorted(fns)  # every step program ran once


def test_a_stage_without_tiles_has_no_schedule():
    ctx = cluster_from_dict({"tiers": [{"name": "edge", "target": "edge-x86", "backend": "onnx"}]})
    passes = passes_named(["annotate-profile", "select-cuts"])
    gm = run_passes(trace_model("tests/models.py:conv_stack", ["1,3,32,32"]), passes, ctx)
    (stage,) = build_plan(gm, ctx).stages
    assert schedule_stage(stage) is None
