"""One pipeline: ``partc plan`` and ``partc compile`` run the same passes and show the same prices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partc.build import compile_model
from partc.manifest import MANIFEST, read_manifest
from partc.partition.price import tiled_step_seconds
from partc.planning import plan_model
from partc.runtime.plans import PlanSelector, from_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"

# jetson-nano edge nodes: on edge-x86 resnet18 at 112x112 is predicted at 18 ms, too little to gain from tiles
TILED = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: edge, target: jetson-nano, backend: onnx, nodes: 4}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: edge, bandwidth: 100Mbit/s, latency: 2ms}
  - {from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}
  - {from: edge, to: cloud, bandwidth: 5Mbit/s, latency: 20ms}
constraints:
  pin: {device: [conv1]}
"""

# a slow uplink that allows compression: the codec's speeds are priced on the link's targets, in plan as in compile
COMPRESSING = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: cloud, bandwidth: 5Mbit/s, latency: 10ms, codecs: [none, none+zstd-1]}
"""

CASES = {
    "resnet50": ("torchvision:resnet50", "1,3,64,64", None),
    "resnet18-compressed": ("torchvision:resnet18", "1,3,64,64", COMPRESSING),
    "googlenet": ("torchvision:googlenet", "1,3,64,64", EXAMPLE.read_text().replace("[conv1]", "['conv1.*']")),
    "resnet18-tiled": ("torchvision:resnet18", "1,3,112,112", TILED),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def planned_and_built(request, tmp_path_factory):
    model, shape, text = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    cluster = EXAMPLE
    if text is not None:
        cluster = folder / "cluster.yaml"
        cluster.write_text(text)
    report = plan_model(model, [shape], cluster)
    build = compile_model(model, [shape], cluster, folder / "build")
    return request.param, report, build


@pytest.mark.slow
def test_plan_and_compile_predict_the_same_plans(planned_and_built):
    name, report, build = planned_and_built
    shown = report.to_json()  # what ``partc plan --json`` prints
    written = json.loads((build.path / MANIFEST).read_text())["plans"]
    # the plan's JSON is in milliseconds, the manifest in seconds
    assert shown["cost"]["latency_ms"] == pytest.approx(written[0]["predicted"]["latency"] * 1e3, rel=1e-3)
    assert shown["cost"]["bottleneck_ms"] == pytest.approx(written[0]["predicted"]["bottleneck"] * 1e3, rel=1e-3)
    assert [(p["name"], p["kind"]) for p in shown["plans"]] == [(p["name"], p["kind"]) for p in written]
    for mine, theirs in zip(shown["plans"], written, strict=True):
        assert mine["latency_ms"] == pytest.approx(theirs["predicted"]["latency"] * 1e3, rel=1e-3)
    # the primary plan is the build's fastest, and no baseline priced by the same rules beats it
    assert all(shown["cost"]["latency_ms"] <= p["latency_ms"] * (1 + 1e-9) for p in shown["plans"])
    assert all(shown["cost"]["latency_ms"] <= b["latency_ms"] * (1 + 1e-9) for b in shown["baselines"].values() if b)
    if name == "resnet18-tiled":
        assert any(stage["schedules"] for stage in json.loads((build.path / MANIFEST).read_text())["stages"])


@pytest.mark.slow
def test_the_runtime_ranks_plans_as_the_compiler_did(planned_and_built):
    _, report, build = planned_and_built
    manifest = read_manifest(build.path)
    plans, hops = from_manifest(manifest)
    selector = PlanSelector(plans, hops, manifest.prices)
    by_index = selector.predicted({})  # nothing measured: the cluster file's bandwidths
    predicted = [by_index[i] for i in range(len(plans))]
    compiled = [p.latency for p in report.plans]
    assert predicted == pytest.approx(compiled, rel=1e-9)
    assert sorted(range(len(plans)), key=predicted.__getitem__) == sorted(range(len(plans)), key=compiled.__getitem__)


@pytest.mark.slow
@pytest.mark.parametrize("planned_and_built", ["resnet18-tiled"], indirect=True)
def test_a_tiled_stage_is_priced_by_the_one_tiled_step_function(planned_and_built):
    """The manifest's price of each tiled program is its steps priced by ``tiled_step_seconds``
    (the function the tile pass plans with), on its step programs' own seconds and bytes."""
    _, _, build = planned_and_built
    manifest = read_manifest(build.path)
    (self_link,) = [lk for lk in manifest.links if lk.src == lk.dst == "edge"]
    link = self_link.price  # with the tier's own call seconds (LinkPrice.call)
    programs = {p.id: p for s in manifest.stages for p in s.programs}
    checked = 0
    for stage in manifest.stages:
        for schedule in stage.schedules:
            total = 0.0
            for step in schedule.steps:
                compute = [programs[pid].predicted_s for pid in step]
                if len(step) == 1:
                    total += compute[0]
                    continue
                scatter = [sum(t.nbytes for t in programs[pid].inputs) for pid in step]
                gather = [sum(t.nbytes for t in programs[pid].outputs) for pid in step]
                total += tiled_step_seconds(compute, scatter, gather, link)
            assert schedule.predicted_s == pytest.approx(total, rel=1e-12)
            checked += 1
    assert checked
