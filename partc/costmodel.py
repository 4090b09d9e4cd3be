"""The cost model: predicted seconds of an IR node on a target it cannot run on.

A roofline per cost class (``partc.kind``), calibrated against measurements on a
reference host and scaled to the target's description::

    t(node, T) = max(flops / (P_T * e_k), bytes / (B_T * m_k)) + c_k * (f_ref / f_T) + L_T     (CPU)
    t(node, T) = max(flops / (P_T * e_k), bytes / (B_T * m_k)) + L_T                           (GPU)

- ``flops`` is ``partc.flops``; ``bytes`` is what the node moves: the bytes of its inputs
  (``partc.bytes`` of the nodes it reads) + its output (``partc.bytes``) + its
  parameters (``partc.param_bytes``).
- ``P_T``, ``B_T``, ``f_T`` and ``L_T`` are the target's ``peak_gflops``,
  ``memory_bandwidth_gbs``, ``clock_ghz`` and ``launch_overhead_us``
  (``partc.targets.TargetDesc``).
- ``e_k``, ``m_k`` (compute and memory efficiency, relative to the reference host's
  sgemm rate and copy bandwidth) and ``c_k`` (per-node overhead on the reference host:
  Python and ATen dispatch) are fitted by ``fit_calibration`` on measured profiles, per
  cost class ``k`` (``cost_class``: the op, with convolutions split into depthwise,
  grouped, 1x1 and the rest). A class with too few measured nodes falls back to its
  kind's fit, then to one fit over all nodes.
- ``f_ref`` is the reference host's clock: dispatch is single-threaded, so it scales with
  the clock, not the core count. On a GPU target the host CPU dispatches, and the
  target's ``launch_overhead_us`` stands for dispatch and kernel launch together.

The fitted numbers ship as ``targets/calibration.json`` (written by
``benchmarks/cost_model.py``), together with the reference host's own description, so
that predictions are deterministic: nothing is measured at compile time. Its schema
(``schema_version`` 1): ``reference`` (a target description: the fields of
``TargetDesc``, sgemm rate and copy bandwidth as measured on the host), ``classes``
(cost class, ``kind:KIND`` or ``default`` -> ``compute_efficiency``,
``memory_efficiency``, ``overhead_us``), ``models`` (the profiles it was fitted on) and
``host`` (the fingerprint of ``partc.profile.host_fingerprint``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import least_squares
from torch import fx

from partc.errors import PartcError
from partc.ir import META_BYTES, META_FLOPS, META_KIND, META_OP, META_PARAM_BYTES
from partc.targets import TargetDesc

if TYPE_CHECKING:
    from partc.profile import NodeTiming, Profile

SCHEMA_VERSION = 1
DEFAULT = "default"  # the fit used for nodes whose cost class and kind have no fit of their own
FREE_KINDS = ("input", "output")  # never cost anything
MIN_NODES = 8  # a cost class (or kind) needs this many measured nodes for its own fit


@dataclass(frozen=True)
class ClassFit:
    """Fitted roofline parameters of one cost class (see the module docstring)."""

    compute_efficiency: float
    memory_efficiency: float
    overhead_us: float


@dataclass(frozen=True)
class Calibration:
    """A fitted cost model: the reference host and per-class parameters."""

    reference: TargetDesc
    classes: dict[str, ClassFit]
    models: tuple[str, ...] = ()
    host: dict[str, str | int] | None = None

    def fit_of(self, cost_class: str, kind: str) -> ClassFit:
        """Return the fit for ``cost_class``, else for ``kind``, else the default fit."""
        return self.classes.get(cost_class) or self.classes.get(f"kind:{kind}") or self.classes[DEFAULT]

    def to_json(self) -> dict:
        """Return the calibration as its schema-version-1 JSON dict."""
        return {
            "schema_version": SCHEMA_VERSION,
            "reference": asdict(self.reference),
            "classes": {k: asdict(v) for k, v in sorted(self.classes.items())},
            "models": list(self.models),
            "host": self.host,
        }


def node_bytes(node: fx.Node) -> int:
    """Bytes ``node`` moves: its inputs, its output and its parameters."""
    return sum(a.meta[META_BYTES] for a in node.all_input_nodes) + node.meta[META_BYTES] + node.meta[META_PARAM_BYTES]


def cost_class(node: fx.Node, gm: fx.GraphModule) -> str:
    """Return the cost class of ``node``: its op, with convolutions split by shape.

    Convolutions of one op differ several-fold in efficiency: ``conv2d/depthwise``
    (groups = input channels), ``conv2d/grouped``, ``conv2d/1x1`` and plain ``conv2d``.
    Reads ``META_OP``.
    """
    op = node.meta[META_OP]
    if node.op != "call_module" or not op.startswith("conv"):
        return op
    conv = gm.get_submodule(node.target)
    if conv.groups > 1:
        return f"{op}/depthwise" if conv.groups == conv.in_channels else f"{op}/grouped"
    return f"{op}/1x1" if all(k == 1 for k in conv.kernel_size) else op


def predict_seconds(cal: Calibration, cls: str, kind: str, flops: int, nbytes: int, target: TargetDesc) -> float:
    """Predicted seconds on ``target`` of one node of cost class ``cls`` and kind ``kind``."""
    if kind in FREE_KINDS:
        return 0.0
    fit = cal.fit_of(cls, kind)
    compute = flops / (target.peak_gflops * 1e9 * fit.compute_efficiency)
    memory = nbytes / (target.memory_bandwidth_gbs * 1e9 * fit.memory_efficiency)
    dispatch = fit.overhead_us * 1e-6 * cal.reference.clock_ghz / target.clock_ghz if target.kind == "cpu" else 0.0
    return max(compute, memory) + dispatch + target.launch_overhead_us * 1e-6


def predict_graph(cal: Calibration, gm: fx.GraphModule, target: TargetDesc) -> dict[str, float]:
    """Predicted seconds of every node of ``gm`` on ``target`` (0.0 for inputs and outputs).

    Reads ``META_OP``, ``META_KIND``, ``META_FLOPS``, ``META_BYTES`` and ``META_PARAM_BYTES``.
    """
    return {
        n.name: predict_seconds(cal, cost_class(n, gm), n.meta[META_KIND], n.meta[META_FLOPS], node_bytes(n), target)
        for n in gm.graph.nodes
    }


def _timing_bytes(t: NodeTiming) -> int:
    return t.input_bytes + t.bytes + t.param_bytes


def predict_profile_total(cal: Calibration, profile: Profile, target: TargetDesc | None = None) -> float:
    """Predicted whole-model seconds of the model in ``profile`` on ``target`` (default: the reference)."""
    target = target or cal.reference
    return sum(predict_seconds(cal, t.cost_class, t.kind, t.flops, _timing_bytes(t), target) for t in profile.nodes)


def fit_calibration(
    profiles: Sequence[Profile], reference: TargetDesc, host: dict[str, str | int] | None = None
) -> Calibration:
    """Fit per-class roofline parameters to measured node times on ``reference``.

    Each cost class and each kind (key ``kind:KIND``) with at least ``MIN_NODES``
    measured nodes gets its own fit; ``default`` is fitted on all nodes together. The fit
    minimises the squared error of predicted node times relative to
    sqrt(measured x 1 ms): large nodes weigh more than small ones
    (they make up the total), small ones still pin the per-node overhead. It is
    deterministic (fixed start, no randomness).

    Raises:
        PartcError: if ``profiles`` holds no measured node.
    """
    timings = [t for p in profiles for t in p.nodes if t.kind not in FREE_KINDS]
    if not timings:
        raise PartcError("cost model: no measured nodes to fit on")
    groups: dict[str, list[NodeTiming]] = {}
    for t in timings:
        groups.setdefault(t.cost_class, []).append(t)
        groups.setdefault(f"kind:{t.kind}", []).append(t)
    classes = {DEFAULT: _fit_class(timings, reference)}
    for key, group in sorted(groups.items()):
        if len(group) >= MIN_NODES:
            classes[key] = _fit_class(group, reference)
    return Calibration(reference, classes, tuple(p.model for p in profiles), host)


def _fit_class(timings: Iterable[NodeTiming], reference: TargetDesc) -> ClassFit:
    timings = list(timings)
    flops = np.array([t.flops for t in timings], dtype=float) / (reference.peak_gflops * 1e9)
    bandwidth = reference.memory_bandwidth_gbs * 1e9
    nbytes = np.array([_timing_bytes(t) for t in timings], dtype=float) / bandwidth
    measured = np.array([t.median_s for t in timings])
    scale = np.sqrt(measured * 1e-3) + 1e-6

    def residuals(x: np.ndarray) -> np.ndarray:
        inv_e, inv_m, overhead = np.exp(x)
        return (np.maximum(flops * inv_e, nbytes * inv_m) + overhead - measured) / scale

    start = np.log([2.0, 2.0, max(float(np.min(measured)), 1e-6)])
    bounds = (np.log([1e-3, 1e-3, 1e-8]), np.log([1e3, 1e3, 1e-1]))
    fit = least_squares(residuals, start, method="trf", bounds=bounds)
    inv_e, inv_m, overhead = np.exp(fit.x)
    return ClassFit(float(1 / inv_e), float(1 / inv_m), float(overhead * 1e6))


def load_calibration(path: Path | None = None) -> Calibration:
    """Read a calibration file; by default the one shipped with partc (``targets/calibration.json``).

    Raises:
        PartcError: if the file is missing or malformed, naming the file and field.
    """
    resource = path or files("partc.targets").joinpath("calibration.json")
    try:
        data = json.loads(resource.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise PartcError(
                f"{resource}: schema_version: expected {SCHEMA_VERSION}, found {data.get('schema_version')!r}"
            )
        return Calibration(
            reference=TargetDesc(**data["reference"]),
            classes={k: ClassFit(**v) for k, v in data["classes"].items()},
            models=tuple(data["models"]),
            host=data["host"],
        )
    except FileNotFoundError:
        raise PartcError(f"{resource}: calibration file not found; run benchmarks/cost_model.py") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PartcError(f"{resource}: malformed calibration: {type(err).__name__}: {err}") from None


def write_calibration(cal: Calibration, path: Path) -> None:
    """Write ``cal`` to ``path`` as JSON, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(cal.to_json(), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
