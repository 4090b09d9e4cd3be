"""``partc profile``: measure every IR node on this host, and read measured profiles back.

Each node is timed by an ``fx.Interpreter`` that wraps the node's own call (module,
function or method, not the interpreter's bookkeeping) in ``time.perf_counter`` calls:
a few warm-up runs of the whole graph, then ``repeats`` timed runs, from which each node
gets its median, 10th and 90th percentile. The whole model is
timed separately, by calling the GraphModule directly, with the same warm-up and repeats;
the two kinds of run alternate, so that both see the same load on a shared host.
Times depend on the thread count, so it is fixed for the measurement and recorded.

A measurement on a busy host is not one: ``reliability_warnings`` checks the host's load
average before profiling (with the profile's own threads it must fit in the cores) and
the spread of every node's samples (``p90_s / p10_s`` above ``SPREAD_BOUND`` for nodes of
at least ``SPREAD_MIN_S``), and says what to do. ``profile_model`` logs the warnings and
keeps them in the profile (``warnings``); ``partc profile`` prints them.

A profile file is JSON, ``schema_version`` 1. Every field:

- ``schema_version`` (int): 1. Readers reject any other value.
- ``model`` (str): the MODEL spec profiled (``torchvision:resnet50``), or the module's
  class name when a module object was given.
- ``inputs`` (list of str): one ``--input-shape`` per model input (``1,3,224,224``).
- ``tracer`` (str): ``torch.fx`` or ``torch.export``.
- ``created`` (str): UTC time of the measurement, ISO 8601.
- ``host`` (object): where it was measured: ``cpu`` (CPU model name), ``machine``
  (``x86_64``, ``aarch64``, ...), ``system`` (``Linux``), ``cores`` (``os.cpu_count()``),
  ``python`` and ``torch`` (versions).
- ``settings`` (object): ``threads`` (torch intra-op threads), ``warmup`` and
  ``repeats`` (runs of the whole graph before and during timing; ``warmup`` >= 1).
- ``load_average`` (float or null): the host's 1-minute load average just before
  profiling (optional; null when unknown).
- ``warnings`` (list of str): why the figures may be unreliable (optional; empty when
  none), see ``reliability_warnings``.
- ``whole_model`` (object): the GraphModule called directly: ``median_s``, ``p10_s``,
  ``p90_s`` (seconds per inference).
- ``sum_node_median_s`` (float): the sum of the nodes' ``median_s``.
- ``nodes`` (list of objects), one per compute node of the IR (no placeholders or
  outputs), in graph order: ``name`` (IR node name), ``op`` and ``kind`` (``partc.op`` and
  ``partc.kind``), ``cost_class`` (``partc.costmodel.cost_class``), ``shape`` (output
  shape or null), ``flops``, ``bytes`` (output bytes), ``input_bytes`` (bytes of the
  tensors it reads from other nodes), ``param_bytes``, and the measured ``median_s``,
  ``p10_s``, ``p90_s``.

Files written by this module are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from partc.costmodel import cost_class
from partc.errors import PartcError
from partc.ir import META_BYTES, META_FLOPS, META_KIND, META_OP, META_PARAM_BYTES, META_SHAPE, compute_nodes
from partc.trace import InputSpec

SCHEMA_VERSION = 1
SPREAD_BOUND = 2.0  # p90 / p10 of a node's samples above this: the host interfered with the measurement
SPREAD_MIN_S = 100e-6  # nodes shorter than this are left out of the spread check (timer and cache noise)
SPREAD_SHARE = 0.10  # warn when nodes holding this share of the summed median are spread beyond the bound

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (runs done, runs in all)


@dataclass(frozen=True)
class NodeTiming:
    """Measured time of one IR node, in seconds."""

    name: str
    op: str
    kind: str
    cost_class: str
    shape: tuple[int, ...] | None
    flops: int
    bytes: int
    input_bytes: int
    param_bytes: int
    median_s: float
    p10_s: float
    p90_s: float


@dataclass(frozen=True)
class Profile:
    """A measured profile: one host, one model, one input shape. See the module docstring."""

    model: str
    inputs: tuple[str, ...]
    tracer: str
    created: str
    host: dict[str, str | int]
    threads: int
    warmup: int
    repeats: int
    whole_median_s: float
    whole_p10_s: float
    whole_p90_s: float
    nodes: tuple[NodeTiming, ...]
    load_average: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def sum_node_median_s(self) -> float:
        """The sum of the nodes' median times."""
        return sum(n.median_s for n in self.nodes)

    def median_of(self) -> dict[str, float]:
        """Return node name -> median seconds."""
        return {n.name: n.median_s for n in self.nodes}

    def to_json(self) -> dict:
        """Return the profile as the schema-version-1 JSON dict."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "inputs": list(self.inputs),
            "tracer": self.tracer,
            "created": self.created,
            "host": dict(self.host),
            "settings": {"threads": self.threads, "warmup": self.warmup, "repeats": self.repeats},
            "whole_model": {
                "median_s": self.whole_median_s,
                "p10_s": self.whole_p10_s,
                "p90_s": self.whole_p90_s,
            },
            "sum_node_median_s": self.sum_node_median_s,
            "load_average": self.load_average,
            "warnings": list(self.warnings),
            "nodes": [
                {
                    "name": n.name,
                    "op": n.op,
                    "kind": n.kind,
                    "cost_class": n.cost_class,
                    "shape": list(n.shape) if n.shape is not None else None,
                    "flops": n.flops,
                    "bytes": n.bytes,
                    "input_bytes": n.input_bytes,
                    "param_bytes": n.param_bytes,
                    "median_s": n.median_s,
                    "p10_s": n.p10_s,
                    "p90_s": n.p90_s,
                }
                for n in self.nodes
            ],
        }


def host_fingerprint() -> dict[str, str | int]:
    """Return what identifies this host in a profile: CPU model, cores, versions."""
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cores": os.cpu_count() or 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    return platform.processor() or "unknown"


def profile_model(
    gm: fx.GraphModule,
    *,
    model: str | None = None,
    warmup: int = 3,
    repeats: int = 15,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Profile:
    """Python twin of ``partc profile``: time every node of ``gm`` on this host.

    ``gm`` is the annotated IR (``partc.report.trace_model``); its example inputs are
    rebuilt from ``gm.meta["partc.inputs"]``. Reads ``META_OP``, ``META_KIND``,
    ``META_SHAPE``, ``META_FLOPS``, ``META_BYTES``, ``META_PARAM_BYTES``; writes no
    metadata. ``threads`` (default: torch's current setting) is set for the measurement
    and restored afterwards. ``progress(done, total)`` is called after every run. The
    first ``warmup`` runs (at least one: first calls allocate, pick kernels and fill
    caches) are not timed. The profile's ``warnings`` (also logged) say when the host's
    load or the samples' spread makes the figures unreliable.

    Raises:
        PartcError: if ``warmup`` < 1, ``repeats`` < 1 or ``threads`` < 1.
    """
    if warmup < 1 or repeats < 1:
        raise PartcError(f"profile: need --warmup >= 1 and --repeats >= 1, got {warmup} and {repeats}")
    if threads is not None and threads < 1:
        raise PartcError(f"profile: --threads must be at least 1, got {threads}")
    specs: tuple[InputSpec, ...] = gm.meta["partc.inputs"]
    examples = [spec.example() for spec in specs]
    total = 2 * (warmup + repeats)
    report = progress or (lambda done, total: None)
    load = _load_average()
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        timer = _NodeTimer(gm)
        whole = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                timer.record = i >= warmup
                timer.run(*examples)
                report(2 * i + 1, total)
                start = time.perf_counter()
                gm(*examples)
                if i >= warmup:
                    whole.append(time.perf_counter() - start)
                report(2 * i + 2, total)
    finally:
        torch.set_num_threads(saved_threads)
    nodes = tuple(
        NodeTiming(
            n.name,
            n.meta[META_OP],
            n.meta[META_KIND],
            cost_class(n, gm),
            n.meta[META_SHAPE],
            n.meta[META_FLOPS],
            n.meta[META_BYTES],
            sum(a.meta[META_BYTES] for a in n.all_input_nodes),
            n.meta[META_PARAM_BYTES],
            *_stats(timer.times[n.name]),
        )
        for n in compute_nodes(gm)
    )
    profile = Profile(
        model=model or type(gm).__name__,
        inputs=tuple(map(str, specs)),
        tracer=gm.meta.get("partc.tracer", "torch.fx"),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=host_fingerprint(),
        threads=used_threads,
        warmup=warmup,
        repeats=repeats,
        whole_median_s=_stats(whole)[0],
        whole_p10_s=_stats(whole)[1],
        whole_p90_s=_stats(whole)[2],
        nodes=nodes,
        load_average=load,
    )
    warnings = reliability_warnings(profile, os.cpu_count() or 1)
    for warning in warnings:
        log.warning("%s", warning)
    return dataclasses.replace(profile, warnings=warnings)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def reliability_warnings(profile: Profile, cores: int) -> tuple[str, ...]:
    """Say why ``profile``'s figures may not describe this host, and what to do about it.

    Two checks, both on recorded numbers (no clock is read): the load average before
    profiling plus the profile's own threads must fit in ``cores``; and nodes of at least
    ``SPREAD_MIN_S`` whose samples spread beyond ``SPREAD_BOUND`` (p90 / p10) must hold
    less than ``SPREAD_SHARE`` of the summed median, and so must the whole-model runs.
    """
    out = []
    if profile.load_average is not None and profile.load_average + profile.threads > cores:
        out.append(
            f"host busy: load average {profile.load_average:.2f} before profiling, plus {profile.threads} "
            f"profiling threads, on {cores} cores; other processes took CPU time from the measurement. "
            f"Profile on a quiet host, or with fewer threads (--threads "
            f"{max(1, min(profile.threads, int(cores - profile.load_average)))})"
        )
    big = [n for n in profile.nodes if n.median_s >= SPREAD_MIN_S]
    spread = [n for n in big if n.p90_s > SPREAD_BOUND * max(n.p10_s, 1e-9)]
    total = sum(n.median_s for n in big)
    share = sum(n.median_s for n in spread) / total if total else 0.0
    if spread and share >= SPREAD_SHARE:
        worst = max(spread, key=lambda n: n.p90_s / max(n.p10_s, 1e-9))
        out.append(
            f"samples spread: {len(spread)} of {len(big)} nodes of {SPREAD_MIN_S * 1e3:g} ms or more "
            f"({share:.0%} of their summed median) have p90/p10 above {SPREAD_BOUND:g} (worst {worst.name}: "
            f"p10 {worst.p10_s * 1e3:.3g} ms, median {worst.median_s * 1e3:.3g} ms, p90 {worst.p90_s * 1e3:.3g} ms). "
            f"Profile on a quiet host, with fewer --threads, or with more --repeats (now {profile.repeats})"
        )
    if profile.whole_p90_s > SPREAD_BOUND * max(profile.whole_p10_s, 1e-9):
        out.append(
            f"whole-model runs spread: p10 {profile.whole_p10_s * 1e3:.3g} ms, median "
            f"{profile.whole_median_s * 1e3:.3g} ms, p90 {profile.whole_p90_s * 1e3:.3g} ms (p90/p10 above "
            f"{SPREAD_BOUND:g}). Profile on a quiet host, with fewer --threads, or with more --repeats"
        )
    return tuple(out)


class _NodeTimer(fx.Interpreter):
    """Runs the graph, recording each compute node's wall time while ``record`` is set.

    Only the node's own call is timed (the module, function or method it runs), not the
    interpreter's bookkeeping around it (argument lookup, node context), which a direct
    call of the GraphModule never pays.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.record = False
        self.times: dict[str, list[float]] = {n.name: [] for n in compute_nodes(gm)}
        self._elapsed = 0.0

    def _timed(self, call, target, args, kwargs):
        start = time.perf_counter()
        result = call(target, args, kwargs)
        self._elapsed = time.perf_counter() - start
        return result

    def call_module(self, target, args, kwargs):
        return self._timed(super().call_module, target, args, kwargs)

    def call_function(self, target, args, kwargs):
        return self._timed(super().call_function, target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._timed(super().call_method, target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        return self._timed(super().get_attr, target, args, kwargs)

    def run_node(self, n: fx.Node):
        self._elapsed = 0.0
        result = super().run_node(n)
        if self.record and n.name in self.times:
            self.times[n.name].append(self._elapsed)
        return result


def time_call(fn: Callable[[], object], warmup: int, repeats: int, rest: float = 0.0,
              period: float = 0.0) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile seconds of ``repeats`` calls of ``fn``, after ``warmup``
    untimed ones (first calls allocate, pick kernels and fill caches), as profiles are timed;
    ``rest`` untimed seconds after each call (a process under a CPU quota refills it there), plus
    a share of ``period`` that differs from call to call (``phase_pause``): calls then
    start at phases spread over a CPU quota's period, as requests do, not all at the one phase a
    fixed rest locks them to (a call about as long as the quota runs unthrottled at some phases
    and throttled at others)."""
    samples = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        time.sleep(rest + phase_pause(i, period))
    return _stats(samples)


def phase_pause(i: int, period: float) -> float:
    """The untimed share of ``period`` seconds to wait after the ``i``-th of calls made one at a time:
    the golden ratio's multiples, so that successive calls start at phases spread evenly over a CPU
    quota's period (``time_call``, ``partc.runtime.testbed.Testbed.measure``)."""
    return period * (i * (1 + 5**0.5) / 2 % 1)


def _stats(samples: Sequence[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[0], deciles[-1]


def write_profile(profile: Profile, path: Path) -> None:
    """Write ``profile`` to ``path`` as JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    os.replace(tmp, path)


def read_profile(path: Path) -> Profile:
    """Read a profile file written by ``partc profile`` (on this host or another).

    Raises:
        PartcError: if the file is missing, not JSON, of another schema version, or a
            field is missing or of the wrong type; the message names the file and field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PartcError(f"{path}: profile file not found; write one with 'partc profile MODEL -o {path}'") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PartcError(f"{path}: not a readable JSON profile: {err}") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise PartcError(f"{path}: schema_version: expected {SCHEMA_VERSION}, found {found!r}")
    try:
        settings, whole = data["settings"], data["whole_model"]
        nodes = tuple(
            NodeTiming(
                str(n["name"]),
                str(n["op"]),
                str(n["kind"]),
                str(n["cost_class"]),
                tuple(int(d) for d in n["shape"]) if n["shape"] is not None else None,
                int(n["flops"]),
                int(n["bytes"]),
                int(n["input_bytes"]),
                int(n["param_bytes"]),
                float(n["median_s"]),
                float(n["p10_s"]),
                float(n["p90_s"]),
            )
            for n in data["nodes"]
        )
        return Profile(
            model=str(data["model"]),
            inputs=tuple(map(str, data["inputs"])),
            tracer=str(data["tracer"]),
            created=str(data["created"]),
            host=dict(data["host"]),
            threads=int(settings["threads"]),
            warmup=int(settings["warmup"]),
            repeats=int(settings["repeats"]),
            whole_median_s=float(whole["median_s"]),
            whole_p10_s=float(whole["p10_s"]),
            whole_p90_s=float(whole["p90_s"]),
            nodes=nodes,
            load_average=float(data["load_average"]) if data.get("load_average") is not None else None,
            warnings=tuple(map(str, data.get("warnings", ()))),
        )
    except KeyError as err:
        raise PartcError(f"{path}: missing field {err.args[0]!r} (profile schema_version {SCHEMA_VERSION})") from None
    except (TypeError, ValueError) as err:
        raise PartcError(f"{path}: malformed field: {err}") from None


def check_matches(profile: Profile, gm: fx.GraphModule, path: Path) -> None:
    """Check that ``profile`` was measured on the model and inputs that ``gm`` holds.

    Nodes are matched by name; op and output shape must agree too.

    Raises:
        PartcError: naming ``path`` and the first IR node without a matching measurement.
    """
    measured = {n.name: n for n in profile.nodes}
    for node in compute_nodes(gm):
        timing = measured.get(node.name)
        shape = node.meta[META_SHAPE]
        if timing is None:
            why = "has no measurement for it"
        elif timing.op != node.meta[META_OP] or timing.shape != (tuple(shape) if shape is not None else None):
            why = f"measured it as {timing.op} {list(timing.shape or [])}, not {node.meta[META_OP]} {list(shape or [])}"
        else:
            continue
        raise PartcError(
            f"{path}: node {node.name!r}: the profile {why}; it was measured on {profile.model} with inputs "
            f"{' '.join(profile.inputs)}; profile this model and input shape with 'partc profile'"
        )
