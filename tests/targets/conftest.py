"""Shared fixtures for backend tests: real torchvision models, split into three tiers.

Each model is traced once per test session (per xdist worker) and split by topological
thirds, so cuts fall inside blocks and several tensors cross them. Helpers are handed to
tests as fixtures, so test modules import nothing from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from partc.context import BackendOptions, CompileContext, Tier
from partc.ir import META_TIER, compute_nodes
from partc.plan import Artifact, Plan, build_plan, run_plan
from partc.trace import InputSpec, load_model, trace

TIERS = ("device", "edge", "cloud")

# The five DAG models the issue names, at the input size each is built for.
MODELS = {
    "resnet50": 224,
    "googlenet": 224,
    "inception_v3": 299,
    "mobilenet_v2": 224,
    "densenet121": 224,
}


@dataclass(frozen=True)
class Case:
    """A model split into three stages, with its input and the eager model's output."""

    name: str
    plan: Plan
    inputs: dict[str, np.ndarray]
    expected: np.ndarray


def _split_in_thirds(gm) -> Plan:
    """Assign compute nodes to device/edge/cloud by topological thirds and build the plan."""
    nodes = compute_nodes(gm)
    for i, node in enumerate(nodes):
        node.meta[META_TIER] = TIERS[3 * i // len(nodes)]
    ctx = CompileContext(tiers=tuple(Tier(t, "edge-x86", "onnx") for t in TIERS))
    return build_plan(gm, ctx)


@functools.cache
def _model_case(name: str, size: int | None = None) -> Case:
    """Trace torchvision ``name`` (random weights) at ``size`` x ``size`` and split it in thirds."""
    model = load_model(f"torchvision:{name}")
    spec = InputSpec((1, 3, size or MODELS[name], size or MODELS[name]))
    gm = trace(model, [spec])
    x = spec.example()
    with torch.no_grad():
        expected = model(x).numpy()
    return Case(name, _split_in_thirds(gm), {"x": x.numpy()}, expected)


def _assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Assert max |actual - expected| <= rel * max |expected| (the issue's exactness bound)."""
    scale = float(np.abs(expected).max())
    diff = float(np.abs(actual - expected).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x output scale {scale:.3g}"


def _emit_and_run(backend, case: Case, target, outdir: Path) -> tuple[list[Artifact], dict[str, np.ndarray]]:
    """Emit every stage of ``case`` with ``backend`` (default options), load them back and run the plan."""
    artifacts = [backend.emit(stage, target, outdir, BackendOptions()) for stage in case.plan.stages]
    outputs = run_plan(case.plan, {a.stage: backend.load(a) for a in artifacts}, case.inputs)
    return artifacts, outputs


@pytest.fixture(scope="session")
def x86_target():
    """A target this machine can run (x86_64); skips elsewhere."""
    from partc.targets import target
    from partc.targets.tvm import host_arch

    if host_arch() != "x86_64":
        pytest.skip(f"these tests run x86_64 artifacts; this machine is {host_arch()}")
    return target("edge-x86")


@pytest.fixture(scope="session")
def model_case():
    """``model_case(name, size=None) -> Case``: a torchvision model split in thirds (cached)."""
    return _model_case


@pytest.fixture(scope="session")
def split_in_thirds():
    """``split_in_thirds(gm) -> Plan``."""
    return _split_in_thirds


@pytest.fixture(scope="session")
def assert_close_to_scale():
    """``assert_close_to_scale(actual, expected, rel=1e-4)``."""
    return _assert_close_to_scale


@pytest.fixture(scope="session")
def emit_and_run():
    """``emit_and_run(backend, case, target, outdir) -> (artifacts, outputs)``."""
    return _emit_and_run
