"""The cost model: predicted seconds of an IR node on a target it cannot run on.

A roofline per cost class (``partc.kind``), calibrated against measurements on a
reference host and scaled to the target's description::

    t(node, T) = max(flops / (P_T * e_k), bytes / (B_T * m_k), bytes / (P_T * o_k)) + c_k * d_T / d_ref     (CPU)
    t(node, T) = max(flops / (P_T * e_k * u_T), bytes / (B_T * m_k), bytes / (P_T * o_k)) + L_T             (GPU)

- ``flops`` is ``partc.flops``; ``bytes`` is what the node moves: the bytes of its inputs
  (``partc.bytes`` of the nodes it reads) + its output (``partc.bytes``) + its
  parameters (``partc.param_bytes``).
- ``P_T``, ``B_T``, ``f_T`` and ``L_T`` are the target's ``peak_gflops``,
  ``memory_bandwidth_gbs``, ``clock_ghz`` and ``launch_overhead_us``
  (``partc.targets.TargetDesc``).
- ``e_k``, ``m_k`` (compute and memory efficiency, relative to the reference host's
  sgemm rate and copy bandwidth), ``o_k`` (bytes per FLOP of peak: the instruction
  limit of a memory-side op too slow to be limited by memory, 0 for none) and ``c_k``
  (per-node overhead on the reference host: Python and ATen dispatch) are fitted by
  ``fit_calibration`` on measured profiles, per cost class ``k`` (``cost_class``: the op,
  with convolutions split into depthwise, grouped, 1x1 and the rest). A class with too
  few measured nodes falls back to its kind's fit, then to one fit over all nodes.
- The compute and the memory term are each fitted where they bind, by the hardware: a
  class's nodes of arithmetic intensity (flops / bytes) above the reference's ridge point
  ``P_ref / B_ref`` fit ``e_k``, the others ``m_k``. Fitting max() over all nodes (or
  rebinning by the fitted terms) let the memory term explain the slow small layers of
  3x3 convolutions (memory efficiency 0.04-0.08), so their times scaled with bandwidth,
  not with compute. A class without nodes on one side has no evidence for that term and
  takes it from the default fit (all nodes of that side), not from a sibling class of its
  kind (a 3x3 convolution would inherit the depthwise ones' slow memory side).
- A memory-side class that moves its bytes at less than ``MEMORY_EFFICIENCY_MIN`` of the
  reference's copy bandwidth is not limited by memory but by its instructions (max
  pooling: 0.05 of copy): ``m_k`` is held at that floor and the rest of its time becomes
  ``o_k``, which scales with the target's compute rate. On the reference both give the
  measured time; on a target with another balance of compute and bandwidth the op follows
  the one that limits it.
- ``d_T / d_ref`` scales the per-node overhead: ``d`` is a machine's per-node dispatch
  time (``TargetDesc.dispatch_us``, e.g. fitted by ``fit_target`` from a profile measured
  on it); when a target gives none, ``f_ref / f_T`` (dispatch is single-threaded, so it
  follows the clock, not the core count). It dominates small-kernel models (MobileNets,
  ShuffleNet).
- GPU targets: the host CPU dispatches, and ``launch_overhead_us`` stands for dispatch
  and kernel launch together; ``u_T = min(1, items / saturation_items)`` (items: output
  elements) is the low-utilisation regime of a layer too small to fill the device.

The fitted numbers ship as ``targets/calibration.json`` (written by
``benchmarks/cost_model.py``), together with the reference host's own description, so
that predictions are deterministic: nothing is measured at compile time. Its schema
(``schema_version`` 2): ``reference`` (a target description: the fields of
``TargetDesc``, sgemm rate and copy bandwidth as measured on the host), ``classes``
(cost class, ``kind:KIND`` or ``default`` -> ``compute_efficiency``,
``memory_efficiency``, ``overhead_us`` and ``op_efficiency``, 0 when absent), ``codecs``
(codec stage -> ``encode_bytes_per_s``, ``decode_bytes_per_s``: see below), ``models``
(the profiles it was fitted on) and ``host`` (the fingerprint of
``partc.profile.host_fingerprint``).

Feature-map codecs (``partc.codec``) are priced from the same file. A codec is a QUANT stage
(``none``, ``fp16``, ``int8``, ``int8c``) then an optional PACK stage (``zstd-1`` ..
``zstd-22``, ``lz4``); ``codecs`` holds each stage's single-threaded speed on the reference
host: a QUANT stage's in raw float32 bytes per second, a PACK stage's in its input (quantised)
bytes per second. Encoding ``raw`` bytes takes ``raw / q + raw * f / p`` seconds on the
reference (``q``, ``p``: the stages' encode speeds; ``f``: ``Codec.quant_fraction``, 1, 0.5 or
0.25), decoding likewise. Codec work is single-threaded CPU work, so on target ``T`` it takes
``d_T / d_ref`` times as long, encoding on the sending tier's target and decoding on the
receiving one's (``codec_rates``); codec ``none`` is free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from scipy.optimize import least_squares
from torch import fx

from partc.codec import parse_codec
from partc.errors import PartcError
from partc.ir import META_BYTES, META_FLOPS, META_KIND, META_OP, META_PARAM_BYTES
from partc.targets import TargetDesc

if TYPE_CHECKING:
    from partc.profile import NodeTiming, Profile

SCHEMA_VERSION = 2
DEFAULT = "default"  # the fit used for nodes whose cost class and kind have no fit of their own
FREE_KINDS = ("input", "output")  # never cost anything
MIN_NODES = 8  # a cost class (or kind) needs this many measured nodes for its own fit
EFFICIENCY_BOUNDS = (0.02, 2.0)  # fraction of sgemm rate / copy bandwidth (above 1: caches, better kernels)
MEMORY_EFFICIENCY_MIN = 0.25  # slower than this fraction of copy bandwidth, an op is limited by its instructions
TOTALS_PRIOR = 0.3  # fit_target_to_totals: a rate 35% off its description weighs as a model predicted 10% off


@dataclass(frozen=True)
class ClassFit:
    """Fitted roofline parameters of one cost class (see the module docstring)."""

    compute_efficiency: float
    memory_efficiency: float
    overhead_us: float
    op_efficiency: float = 0.0  # o_k: bytes per FLOP of peak of an instruction-limited memory side; 0: none


@dataclass(frozen=True)
class CodecRate:
    """Single-threaded speed of one codec stage on the reference host (see the module docstring)."""

    encode_bytes_per_s: float
    decode_bytes_per_s: float


@dataclass(frozen=True)
class Calibration:
    """A fitted cost model: the reference host, per-class parameters and codec stage speeds."""

    reference: TargetDesc
    classes: dict[str, ClassFit]
    models: tuple[str, ...] = ()
    host: dict[str, str | int] | None = None
    codecs: dict[str, CodecRate] = field(default_factory=dict)

    def fit_of(self, cost_class: str, kind: str) -> ClassFit:
        """Return the fit for ``cost_class``, else for ``kind``, else the default fit."""
        return self.classes.get(cost_class) or self.classes.get(f"kind:{kind}") or self.classes[DEFAULT]

    def to_json(self) -> dict:
        """Return the calibration as its schema's JSON dict."""
        return {
            "schema_version": SCHEMA_VERSION,
            "reference": asdict(self.reference),
            "classes": {k: asdict(v) for k, v in sorted(self.classes.items())},
            "codecs": {k: asdict(v) for k, v in sorted(self.codecs.items())},
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


def dispatch_scale(reference: TargetDesc, target: TargetDesc) -> float:
    """How much longer per-node dispatch takes on ``target`` than on ``reference`` (``d_T / d_ref``)."""
    if target.dispatch_us > 0 and reference.dispatch_us > 0:
        return target.dispatch_us / reference.dispatch_us
    return reference.clock_ghz / target.clock_ghz


def codec_rates(
    cal: Calibration, codec: str, sender: TargetDesc, receiver: TargetDesc
) -> tuple[float | None, float | None]:
    """Raw bytes per second ``codec`` encodes on ``sender`` and decodes on ``receiver`` (module docstring).

    Codec ``none`` is free: (None, None).

    Raises:
        PartcError: for an unknown codec name, or a stage ``cal`` has no speed for.
    """
    parsed = parse_codec(codec)
    if parsed.name == "none":
        return None, None
    stages = [(parsed.quant, 1.0)]
    if parsed.pack:
        stages.append((f"zstd-{parsed.level}" if parsed.pack == "zstd" else parsed.pack, parsed.quant_fraction))
    missing = [stage for stage, _ in stages if stage not in cal.codecs]
    if missing:
        raise PartcError(
            f"calibration: codecs: no speed for codec stage {missing[0]!r} (of {parsed.name}); "
            "run benchmarks/cost_model.py"
        )
    encode = sum(share / cal.codecs[stage].encode_bytes_per_s for stage, share in stages)
    decode = sum(share / cal.codecs[stage].decode_bytes_per_s for stage, share in stages)
    return 1 / (encode * dispatch_scale(cal.reference, sender)), 1 / (decode * dispatch_scale(cal.reference, receiver))


def predict_seconds(
    cal: Calibration, cls: str, kind: str, flops: int, nbytes: int, target: TargetDesc, out_bytes: int = 0
) -> float:
    """Predicted seconds on ``target`` of one node of cost class ``cls`` and kind ``kind``.

    ``out_bytes`` (the node's output) sizes the layer for a GPU's low-utilisation regime.
    """
    if kind in FREE_KINDS:
        return 0.0
    fit = cal.fit_of(cls, kind)
    utilisation = 1.0
    if target.kind == "gpu" and target.saturation_items > 0:
        utilisation = min(1.0, max(out_bytes // 4, 1) / target.saturation_items)
    compute = flops / (target.peak_gflops * 1e9 * fit.compute_efficiency * utilisation)
    memory = nbytes / (target.memory_bandwidth_gbs * 1e9 * fit.memory_efficiency)
    if fit.op_efficiency > 0:
        memory = max(memory, nbytes / (target.peak_gflops * 1e9 * fit.op_efficiency))
    dispatch = fit.overhead_us * 1e-6 * dispatch_scale(cal.reference, target) if target.kind == "cpu" else 0.0
    return max(compute, memory) + dispatch + target.launch_overhead_us * 1e-6


def predict_graph(cal: Calibration, gm: fx.GraphModule, target: TargetDesc) -> dict[str, float]:
    """Predicted seconds of every node of ``gm`` on ``target`` (0.0 for inputs and outputs).

    Reads ``META_OP``, ``META_KIND``, ``META_FLOPS``, ``META_BYTES`` and ``META_PARAM_BYTES``.
    """
    return {
        n.name: predict_seconds(
            cal, cost_class(n, gm), n.meta[META_KIND], n.meta[META_FLOPS], node_bytes(n), target, n.meta[META_BYTES]
        )
        for n in gm.graph.nodes
    }


def _timing_bytes(t: NodeTiming) -> int:
    return t.input_bytes + t.bytes + t.param_bytes


def predict_profile_total(cal: Calibration, profile: Profile, target: TargetDesc | None = None) -> float:
    """Predicted whole-model seconds of the model in ``profile`` on ``target`` (default: the reference)."""
    target = target or cal.reference
    return sum(
        predict_seconds(cal, t.cost_class, t.kind, t.flops, _timing_bytes(t), target, t.bytes) for t in profile.nodes
    )


def fit_calibration(
    profiles: Sequence[Profile], reference: TargetDesc, host: dict[str, str | int] | None = None
) -> Calibration:
    """Fit per-class roofline parameters to measured node times on ``reference``.

    Each cost class and each kind (key ``kind:KIND``) with at least ``MIN_NODES``
    measured nodes gets its own fit; ``default`` is fitted on all nodes together. The
    compute efficiency is fitted on the nodes above the reference's ridge point, the
    memory efficiency on the others (see the module docstring); a side without nodes
    takes the default's term. The fit
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
    default = _fit_class(timings, reference, None)
    classes = {DEFAULT: default}
    kinds = sorted(key for key, group in groups.items() if key.startswith("kind:") and len(group) >= MIN_NODES)
    for key in kinds:
        classes[key] = _fit_class(groups[key], reference, default)
    for key, group in sorted(groups.items()):
        if len(group) >= MIN_NODES and not key.startswith("kind:"):
            classes[key] = _fit_class(group, reference, default)
    return Calibration(reference, classes, tuple(p.model for p in profiles), host)


def _fit_class(timings: Iterable[NodeTiming], reference: TargetDesc, fallback: ClassFit | None) -> ClassFit:
    """Fit one class: ``e`` on its nodes above the reference's ridge point, ``m`` (or ``o``) on the others."""
    timings = list(timings)
    flops = np.array([t.flops for t in timings], dtype=float) / (reference.peak_gflops * 1e9)
    nbytes = np.array([_timing_bytes(t) for t in timings], dtype=float) / (reference.memory_bandwidth_gbs * 1e9)
    measured = np.array([t.median_s for t in timings])
    start = (fallback.compute_efficiency, fallback.memory_efficiency) if fallback else (0.5, 0.5)
    bound = flops > nbytes  # arithmetic intensity above the reference's ridge point: compute-bound
    e, m, overhead = _fit_terms(flops, nbytes, measured, bound, (*start, max(float(np.min(measured)), 1e-6)))
    if fallback and bound.all():  # no memory-side node: the fallback's memory side, whole
        return ClassFit(e, fallback.memory_efficiency, overhead * 1e6, fallback.op_efficiency)
    if m >= MEMORY_EFFICIENCY_MIN:
        return ClassFit(e, m, overhead * 1e6)
    op = m * reference.memory_bandwidth_gbs / reference.peak_gflops  # the same time, priced by compute
    return ClassFit(e, MEMORY_EFFICIENCY_MIN, overhead * 1e6, op)


def _fit_terms(
    flops: np.ndarray, nbytes: np.ndarray, measured: np.ndarray, bound: np.ndarray, start: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Fit (e, m, overhead s): ``e`` on the ``bound`` (compute-bound) nodes, ``m`` on the others.

    A term without nodes keeps its value from ``start``.
    """
    has_compute, has_memory = bool(bound.any()), bool((~bound).any())
    scale = np.sqrt(measured * 1e-3) + 1e-6
    low, high = EFFICIENCY_BOUNDS

    def unpack(x: np.ndarray) -> tuple[float, float, float]:
        return (float(np.exp(x[0])) if has_compute else start[0],
                float(np.exp(x[1])) if has_memory else start[1], float(np.exp(x[2])))

    def residuals(x: np.ndarray) -> np.ndarray:
        e, m, overhead = unpack(x)
        return (np.where(bound, flops / e, nbytes / m) + overhead - measured) / scale

    bounds = (np.log([low, low, 1e-8]), np.log([high, high, 1e-1]))
    x0 = np.clip(np.log(start), bounds[0] + 1e-9, bounds[1] - 1e-9)
    return unpack(least_squares(residuals, x0, method="trf", bounds=bounds).x)


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
            codecs={k: CodecRate(**v) for k, v in data["codecs"].items()},
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


def fit_target(cal: Calibration, profiles: Sequence[Profile], base: TargetDesc) -> TargetDesc:
    """Fit a target description to profiles measured on that machine (the Scission workflow).

    Keeps the calibration's per-class efficiencies and fits the machine's three rates so
    that predicted node times match the measured ones (same weighting as
    ``fit_calibration``): ``peak_gflops``, ``memory_bandwidth_gbs`` and, on a CPU,
    ``dispatch_us`` (on a GPU, ``launch_overhead_us``). Every other field comes from
    ``base``; ``source`` says what it was fitted on.

    Raises:
        PartcError: if ``profiles`` holds no measured node.
    """
    timings = [t for p in profiles for t in p.nodes if t.kind not in FREE_KINDS]
    if not timings:
        raise PartcError("fit target: no measured nodes to fit on")
    measured = np.array([t.median_s for t in timings])
    scale = np.sqrt(measured * 1e-3) + 1e-6

    def residuals(desc: TargetDesc) -> np.ndarray:
        predicted = [predict_seconds(cal, t.cost_class, t.kind, t.flops, _timing_bytes(t), desc, t.bytes)
                     for t in timings]
        return (np.array(predicted) - measured) / scale

    models = ", ".join(sorted({p.model for p in profiles}))
    first = profiles[0]
    return _fit_rates(
        cal, base, residuals, 0.0,
        f"fitted by partc.costmodel.fit_target to measured profiles of {models} on "
        f"{first.host.get('cpu', 'unknown')} at {first.threads} threads ({first.created}): rates that make "
        "the shipped calibration's per-node predictions match the measured medians.",
    )


def fit_target_to_totals(cal: Calibration, totals: Mapping[str, tuple[fx.GraphModule, float]],
                         base: TargetDesc) -> TargetDesc:
    """Fit a target description to whole-model seconds measured on that machine.

    ``totals`` maps a model's name to its traced graph (annotated as for
    ``predict_graph``) and the seconds one inference took on the machine: what a
    benchmark of whole models (Scission's per-model times) gives when no per-node
    profile exists. Fits the same three rates as ``fit_target`` to the models' log
    errors, with ``base``'s rates as a prior: a few totals do not pin three rates (five
    of Scission's models put its i7 at 3,600 GFLOP/s and 12 GB/s without one), so each
    rate's log distance from ``base`` is a residual too, weighted ``TOTALS_PRIOR``.

    Raises:
        PartcError: if ``totals`` is empty or holds a time that is not positive.
    """
    if not totals or any(seconds <= 0 for _, seconds in totals.values()):
        raise PartcError("fit target: needs at least one model measured in a positive time")
    graphs = [gm for gm, _ in totals.values()]
    measured = np.array([seconds for _, seconds in totals.values()])

    def residuals(desc: TargetDesc) -> np.ndarray:
        return np.log([sum(predict_graph(cal, gm, desc).values()) for gm in graphs] / measured)

    return _fit_rates(
        cal, base, residuals, TOTALS_PRIOR,
        f"fitted by partc.costmodel.fit_target_to_totals to whole-model times of {', '.join(sorted(totals))} "
        "measured on the machine: rates that make the shipped calibration's predicted totals match them.",
    )


def _fit_rates(cal: Calibration, base: TargetDesc, residuals: Callable[[TargetDesc], np.ndarray],
               prior: float, source: str) -> TargetDesc:
    """``base`` with the peak, bandwidth and dispatch (GPU: launch) rates that minimise ``residuals(desc)``
    and ``prior`` x each rate's log distance from ``base``'s, rounded; ``source`` goes first in its source."""
    gpu = base.kind == "gpu"
    base_dispatch = base.launch_overhead_us if gpu else (base.dispatch_us or cal.reference.dispatch_us or 10.0)

    def candidate(x: np.ndarray) -> TargetDesc:
        peak, bandwidth, dispatch = np.exp(x)
        fields = {"peak_gflops": float(peak), "memory_bandwidth_gbs": float(bandwidth)}
        fields["launch_overhead_us" if gpu else "dispatch_us"] = float(dispatch)
        return replace(base, **fields)

    start = np.log([base.peak_gflops, base.memory_bandwidth_gbs, max(base_dispatch, 0.01)])
    fit = least_squares(lambda x: np.concatenate([residuals(candidate(x)), prior * (x - start)]), start, method="trf",
                        bounds=(np.log([1e-2, 1e-2, 1e-3]), np.log([1e6, 1e5, 1e5])))
    desc = candidate(fit.x)
    rounded = {"peak_gflops": round(desc.peak_gflops, 2), "memory_bandwidth_gbs": round(desc.memory_bandwidth_gbs, 2),
               "dispatch_us": round(desc.dispatch_us, 2), "launch_overhead_us": round(desc.launch_overhead_us, 2)}
    return replace(desc, **rounded, source=f"{source} {base.source}".strip())


def target_yaml(desc: TargetDesc) -> str:
    """``desc`` as a target description file (``partc.targets.parse_description`` reads it back)."""
    return f"# {desc.summary}\n" + yaml.safe_dump(asdict(desc), sort_keys=False, width=100)
