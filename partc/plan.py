"""The ``Plan``: the IR split into stages, one per tier, with named tensors between them.

``build_plan`` splits the IR by ``META_TIER`` with ``torch.fx.passes.split_module``. Every
stage is a self-contained ``GraphModule`` plus the tensors it reads and writes, so a
backend can emit it alone and a runtime can run the stages in order while keeping one
``dict`` of named tensors.

Tensor naming (stable: the same IR gives the same names):

- a model input is named after its placeholder (``x``);
- a tensor crossing a cut is named after the IR node that produced it (``layer2_1_relu_2``);
  it keeps that name in every stage that reads it;
- a model output is ``output`` (single output), ``output.N`` (tuple or list, N from 0) or
  ``output.KEY`` (dict). A tensor that is both a model output and read by a later stage
  is written twice by its stage, under both names.

Routing: a stage lists exactly the tensors it reads (``Stage.inputs``) and writes
(``Stage.outputs``). A tensor produced on tier 0 and read on tier 2 is *not* listed by
tier 1's stage; ``Plan.transfers`` says which stage produces and which consumes each
tensor, and the runtime forwards it (through tier 1's machine when there is no direct link).

Non-tensor values crossing a cut: an ``int`` or shape (``x.size(0)``) computed on an
earlier tier is recomputed on the tier that uses it (its nodes are duplicated there), so
only tensors cross links; the tensor it was computed from then crosses as well. An
element of a tuple of tensors (``torch.chunk``) crosses as its own tensor: the
``getitem`` moves to the producer's tier. Any other non-tensor value crossing a cut raises
``UnsupportedLayerError``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from partc.context import CompileContext
from partc.errors import ClusterError, PartcError, UnsupportedLayerError
from partc.ir import META_BYTES, META_DTYPE, META_SHAPE, META_TIER, clone, compute_nodes, lint


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor read or written by a stage.

    Attributes:
        name: stable name (see the module docstring).
        shape: static shape.
        dtype: numpy/torch dtype name, e.g. "float32".
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, eq=False)
class Stage:
    """One tier's share of the model.

    Attributes:
        name: ``<tier>.<index>``, e.g. ``edge.0``.
        tier: tier name from the cluster file.
        index: index of the stage within its tier (0 unless the tier is split further).
        gm: the stage's own GraphModule, in eval mode; it takes ``inputs`` positionally
            and returns a tuple in the order of ``outputs``.
        inputs: tensors the stage reads, in argument order.
        outputs: tensors the stage writes, in return order.
    """

    name: str
    tier: str
    index: int
    gm: fx.GraphModule
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Transfer:
    """A tensor moving to a stage: from the stage ``src`` (None for a model input) to ``dst``."""

    tensor: TensorSpec
    src: str | None
    dst: str


@dataclass(frozen=True, eq=False)
class Plan:
    """Stages in data-flow order, with the model's own inputs and outputs.

    Attributes:
        stages: stages in the order they run; tiers without any node have no stage.
        model_inputs: the model's inputs, named after its placeholders.
        model_outputs: the model's outputs, ``output`` / ``output.N`` / ``output.KEY``.
    """

    stages: tuple[Stage, ...]
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]

    def stage(self, name: str) -> Stage:
        """Return the stage called ``name`` (``edge.0``).

        Raises:
            PartcError: if the plan has no such stage.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise PartcError(f"no stage {name!r}; stages are: {', '.join(s.name for s in self.stages)}")

    @property
    def transfers(self) -> tuple[Transfer, ...]:
        """Every tensor a stage reads, with the stage that produces it (None: model input)."""
        producer: dict[str, str] = {}
        out = []
        for s in self.stages:
            out.extend(Transfer(t, producer.get(t.name), s.name) for t in s.inputs)
            producer.update((t.name, s.name) for t in s.outputs)
        return tuple(out)


@dataclass(frozen=True)
class Artifact:
    """A file a backend wrote for one stage.

    Attributes:
        stage: stage name (``edge.0``).
        backend: backend name ("torchscript", "onnx", "tvm").
        path: the file.
        sha256: hex digest of the file.
        bytes: size of the file.
        inputs: the stage's input tensors, in the order the artifact takes them.
        outputs: the stage's output tensors, in the order the artifact returns them.
        info: backend-specific facts, JSON-able (e.g. ``{"tuned": False}`` for tvm).
    """

    stage: str
    backend: str
    path: Path
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    info: Mapping[str, object] = field(default_factory=dict)


# A loaded stage: named numpy arrays in (``Stage.inputs``), named numpy arrays out.
StageFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def make_artifact(stage: Stage, backend: str, path: Path, info: Mapping[str, object] | None = None) -> Artifact:
    """Return the ``Artifact`` describing ``path``, the file a backend wrote for ``stage``."""
    data = path.read_bytes()
    return Artifact(
        stage=stage.name,
        backend=backend,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        inputs=stage.inputs,
        outputs=stage.outputs,
        info=dict(info or {}),
    )


def build_plan(gm: fx.GraphModule, ctx: CompileContext) -> Plan:
    """Split the IR into one stage per tier that has nodes, in ``ctx.tier_names`` order.

    Reads ``META_TIER`` (every compute node; a ``get_attr`` without one goes with its
    first user), ``META_SHAPE``, ``META_DTYPE`` and ``META_BYTES``. ``gm`` is not changed.

    Raises:
        PartcError: if a compute node has no tier (run a cut pass first).
        ClusterError: if a node's tier is not a tier of the cluster.
        UnsupportedLayerError: if a non-tensor value that cannot be recomputed crosses a
            cut, or a model output is not a tensor computed by the model.
        RuntimeError: if data flows back a tier (a bug in the cut pass).
    """
    gm = clone(gm)
    order = {name: i for i, name in enumerate(ctx.tier_names)}
    _check_tiers(gm, order, ctx.source)
    _localise_non_tensors(gm, order)
    gm.recompile()
    lint(gm, ctx.tier_names)

    from torch.fx.passes.split_module import split_module

    split = split_module(
        gm,
        gm,
        lambda n: order[n.meta[META_TIER]],
        keep_original_order=True,
        keep_original_node_name=True,
        tuple_return=True,
    )
    split.eval()

    model_inputs = tuple(spec_of(n, n.name) for n in gm.graph.nodes if n.op == "placeholder")
    named_outputs = _model_outputs(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    submods = [n for n in split.graph.nodes if n.op == "call_module"]
    read_later = {p.name for call in submods for p in getattr(split, call.target).graph.nodes if p.op == "placeholder"}
    tier_of = {i: name for name, i in order.items()}
    stages = []
    for call in submods:
        sub = getattr(split, call.target)
        tier = tier_of[int(call.target.removeprefix("submod_"))]
        stages.append(_stage(sub, tier, by_name, read_later, named_outputs))
    return Plan(
        stages=tuple(stages),
        model_inputs=model_inputs,
        model_outputs=tuple(spec_of(node, name) for name, node in named_outputs),
    )


def _check_tiers(gm: fx.GraphModule, order: Mapping[str, int], source: str) -> None:
    untiered = []
    for node in reversed(compute_nodes(gm)):  # users first, so get_attr can follow them
        if META_TIER not in node.meta:
            users = [u for u in node.users if META_TIER in u.meta]
            if node.op != "get_attr" or not users:
                untiered.append(node.name)
                continue
            node.meta[META_TIER] = min((u.meta[META_TIER] for u in users), key=lambda t: order.get(t, -1))
    if untiered:
        names = ", ".join(reversed(untiered[-5:])) + (f" and {len(untiered) - 5} more" if len(untiered) > 5 else "")
        raise PartcError(f"{len(untiered)} node(s) have no tier ({names}); run a cut pass (select-cuts) first")
    for node in compute_nodes(gm):
        if node.meta[META_TIER] not in order:
            raise ClusterError(
                f"{source}: node {node.name!r} is assigned to tier {node.meta[META_TIER]!r}, "
                f"which is not a tier of the cluster ({', '.join(order)})"
            )


def _kind_of_value(node: fx.Node) -> str:
    """'tensor', 'tuple' (of tensors) or 'scalar' (ints, shapes: no tensor bytes)."""
    if node.meta.get(META_SHAPE) is not None:
        return "tensor"
    return "tuple" if node.meta.get(META_BYTES, 0) else "scalar"


def _localise_non_tensors(gm: fx.GraphModule, order: Mapping[str, int]) -> None:
    """Rewrite ``gm`` so that only tensors cross tiers (see the module docstring)."""

    def tier(n: fx.Node) -> int:
        return -1 if n.op == "placeholder" else order[n.meta[META_TIER]]

    copies: dict[tuple[fx.Node, int], fx.Node] = {}

    def copy_into(node: fx.Node, target: int, before: fx.Node) -> fx.Node:
        if node.op == "placeholder" or tier(node) >= target or _kind_of_value(node) == "tensor":
            return node
        if _kind_of_value(node) == "tuple":
            raise UnsupportedLayerError(
                f"{node.name}: its output, a tuple of tensors, is read on a later tier by a node that "
                "is not a getitem; pin its users to its tier (constraints.pin in the cluster file)"
            )
        if (node, target) not in copies:
            args = {a: copy_into(a, target, before) for a in node.all_input_nodes}
            with gm.graph.inserting_before(before):
                dup = gm.graph.node_copy(node, lambda a: args[a])
            dup.meta = {**node.meta, META_TIER: next(t for t, i in order.items() if i == target)}
            copies[node, target] = dup
        return copies[node, target]

    for node in compute_nodes(gm):
        if node.target is operator.getitem and _kind_of_value(node.args[0]) == "tuple":
            node.meta[META_TIER] = node.args[0].meta[META_TIER]
    for node in compute_nodes(gm):
        for arg in node.all_input_nodes:
            if arg.op != "placeholder" and _kind_of_value(arg) != "tensor" and tier(arg) < tier(node):
                node.replace_input_with(arg, copy_into(arg, tier(node), node))


def _model_outputs(gm: fx.GraphModule) -> list[tuple[str, fx.Node]]:
    value = gm.graph.output_node().args[0]
    if isinstance(value, fx.Node):
        named = [("output", value)]
    elif isinstance(value, (tuple, list)):
        named = [(f"output.{i}", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        named = [(f"output.{k}", v) for k, v in value.items()]
    else:
        raise UnsupportedLayerError(f"model output {value!r}: expected a tensor, a tuple/list or a dict of tensors")
    bad = [name for name, v in named if not isinstance(v, fx.Node) or v.op == "placeholder"]
    bad += [name for name, v in named if isinstance(v, fx.Node) and _kind_of_value(v) != "tensor"]
    if bad:
        raise UnsupportedLayerError(
            f"model outputs {', '.join(sorted(set(bad)))}: not a tensor computed by the model; "
            "partc splits models whose outputs are computed tensors"
        )
    return named


def spec_of(node: fx.Node, name: str) -> TensorSpec:
    """The ``TensorSpec`` called ``name`` of ``node``'s output, from its recorded shape and dtype.

    Raises:
        UnsupportedLayerError: if the node has no recorded shape or dtype.
    """
    shape, dtype = node.meta.get(META_SHAPE), node.meta.get(META_DTYPE)
    if shape is None or dtype is None:
        raise UnsupportedLayerError(
            f"{node.name}: crosses a cut but has no recorded shape/dtype (trace the model first)"
        )
    return TensorSpec(name, tuple(shape), dtype)


def _stage(
    sub: fx.GraphModule,
    tier: str,
    by_name: Mapping[str, fx.Node],
    read_later: set[str],
    named_outputs: Sequence[tuple[str, fx.Node]],
) -> Stage:
    inputs = tuple(spec_of(by_name[p.name], p.name) for p in sub.graph.nodes if p.op == "placeholder")
    out_node = sub.graph.output_node()
    values, outputs = [], []
    for value in out_node.args[0]:
        node = by_name[value.name]
        if value.name in read_later:
            values.append(value)
            outputs.append(spec_of(node, value.name))
        for name, model_node in named_outputs:
            if model_node is node:
                values.append(value)
                outputs.append(spec_of(node, name))
    out_node.args = (tuple(values),)
    sub.recompile()
    return Stage(name=f"{tier}.0", tier=tier, index=0, gm=sub, inputs=inputs, outputs=tuple(outputs))


def eager_stage_fn(stage: Stage) -> StageFn:
    """Return a ``StageFn`` that runs ``stage.gm`` with PyTorch, for reference and tests."""
    return module_stage_fn(stage.gm, stage.inputs, stage.outputs)


def module_stage_fn(module: Callable, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> StageFn:
    """Return a ``StageFn`` that calls ``module`` (a torch module taking ``inputs`` positionally and
    returning ``outputs`` as a tuple: a GraphModule, a loaded TorchScript or ExportedProgram)."""

    def run(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(tensors[t.name])) for t in inputs]
        with torch.no_grad():
            result = module(*args)
        return {t.name: r.numpy() for t, r in zip(outputs, result, strict=True)}

    return run


def run_plan(plan: Plan, fns: Mapping[str, StageFn], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``plan``'s stages in order in this process; return the model outputs by name.

    ``fns`` maps stage names to loaded stages (a backend's ``load``, or ``eager_stage_fn``);
    ``inputs`` maps model input names to arrays. Tensors are kept in one name -> array dict
    and dropped after their last reader.

    Raises:
        PartcError: if a model input or a stage function is missing, or a stage does not
            return the tensors it declares.
    """
    missing = [t.name for t in plan.model_inputs if t.name not in inputs]
    missing += [f"stage {s.name}" for s in plan.stages if s.name not in fns]
    if missing:
        raise PartcError(f"run_plan: missing {', '.join(missing)}")
    last_read = {t.name: i for i, s in enumerate(plan.stages) for t in s.inputs}
    keep = {t.name for t in plan.model_outputs}
    env = {t.name: inputs[t.name] for t in plan.model_inputs}
    for i, stage in enumerate(plan.stages):
        result = fns[stage.name]({t.name: env[t.name] for t in stage.inputs})
        absent = [t.name for t in stage.outputs if t.name not in result]
        if absent:
            raise PartcError(f"stage {stage.name} did not return {', '.join(absent)}")
        env.update(result)
        for name in [n for n in env if last_read.get(n, -1) <= i and n not in keep]:
            del env[name]
    return {t.name: env[t.name] for t in plan.model_outputs}
