"""``manifest.json``: what the runtime reads to run a build, and what humans deploy from.

Schema (``schema_version`` 4; keys sorted; sizes in bytes, times in seconds)::

    schema_version   4
    partc_version    the partc that wrote it
    model            {spec, tracer, inputs: [TENSOR], outputs: [TENSOR]}
    cluster          {source, objective, tiers: [{name, target, backend, nodes, scaling: SCALING}],
                      links: [{from, to, bandwidth, latency, call, bandwidth in bytes/s; call: a call's
                                                                   fixed seconds (LinkPrice.call)
                               codec: {codec, ratio, encode_bytes_per_s, decode_bytes_per_s,
                                       agreement, samples}}]}      speeds: the cost model's on the
                                                                   sending / receiving tier's target
    stages           [{name, tier, index, backend, target,         one worker each
                       programs: [{id, artifact, sha256, bytes, inputs: [TENSOR],
                                   outputs: [TENSOR], predicted_s, info}],
                       schedules: [{id, inputs: [TENSOR], outputs: [TENSOR],
                                    steps: [[program id per node]], results: [[name, tensor]],
                                    predicted_s}]}]
    plans            [{name, kind, stages: [stage], programs: {stage: program id},
                       assignment: {node: tier},                   every IR node
                       predicted: {compute: {tier: s}, link_bytes: {link: bytes},
                                   reached: [link], codecs: {link: CODEC}, latency, bottleneck,
                                   transfer: {link: s}},
                       transfers: [{tensor: TENSOR, from: stage | null, to: stage, bytes}],
                       max_abs_diff}]
    verification     {max_abs_diff, output_scale, inputs: "seeded example"}

    TENSOR = {name, shape: [int], dtype}
    SCALING = {instances, rate_per_s, min_replicas, max_replicas, max_batch,    the cluster file's
               replicas, batch, arrival_per_s, utilisation, peak_utilisation}  and the plan's

A tier's ``scaling`` (``TierScaling``) is the cluster file's load and scaling
(``partc.context.Scaling``; ``rate_per_s`` null without a rate) and what the primary plan
needs under that load (``partc.partition.load``): ``replicas`` to run (the fewest keeping
utilisation at most ``TARGET_UTILISATION``, within ``min_replicas``..``max_replicas``; without a
rate, ``min_replicas``), the ``batch`` dynamic batching is predicted to run, each instance's
``arrival_per_s``, and its ``utilisation`` there and ``peak_utilisation`` at max replicas with
full batches (null without a rate). A runtime deploys ``replicas`` (autoscaling between the
bounds where they differ) and batches up to ``max_batch``.

``stages`` with ``index`` 0 form the chain, in order (data flows from each to the next);
the others are the further nodes of a tier with several (``edge.1``): they run tiles for
their tier's stage and are in no chain. A stage's ``schedules`` are its tiled programs
(``partc.tiling.schedule``): in each step, node t runs the t-th program id (``edge.1`` runs
``edge.0~1.1``); ``results`` name the tensors that hold the stage's outputs. ``plans[0]`` is the
primary plan (``kind`` "primary"), the one compiled for the cluster file's bandwidths;
"adaptive" plans are the rest of its plan family, "fallback" plans stop before a tier. A
plan's ``stages`` are its chain: the stages from the first up to its last one with a
program; a stage of the chain without a program in ``programs`` relays tensors. A plan's
``predicted`` is a ``partc.partition.price.Prediction``: what it computes and sends, and its
figures at the cluster file's bandwidths (``reached``: the links whose latency it pays);
link = "src->dst". ``artifact`` is
relative to the manifest's folder. The manifest holds nothing measured while compiling but
the codecs' ratios and agreement (on the seeded or given calibration inputs, not timed), so the
same inputs give the same bytes (the artifacts' times on the
compiling host are in ``partc.build.Build.measured`` and ``partc compile``'s output).
``transfers[].from`` is null for a model input. A link's ``codec`` is what tensors cross
it with (``compress-cut-tensors``; ``none`` unless the cluster file allows another), with
its measured ratio and top-1 agreement and its encode / decode speeds as the cost model
prices them on the link's sending / receiving tier's target (``partc.costmodel.codec_rates``);
plans are priced with it. ``verification``
runs the artifacts without codecs: the codecs' cost in accuracy is their ``agreement``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from partc.codec import LinkCodec
from partc.context import Scaling
from partc.errors import ManifestError
from partc.ir import link_name
from partc.partition.load import Use
from partc.partition.price import LinkPrice, Prediction
from partc.plan import Artifact, TensorSpec

SCHEMA_VERSION = 4
MANIFEST = "manifest.json"

_STAGE_KEYS = {"name": str, "tier": str, "index": int, "backend": str, "target": str, "programs": list,
               "schedules": list}
_SCHEDULE_KEYS = {"id": str, "inputs": list, "outputs": list, "steps": list, "results": list}
_PROGRAM_KEYS = {"id": str, "artifact": str, "sha256": str, "bytes": int, "inputs": list, "outputs": list, "info": dict}
_TIER_KEYS = {"name": str, "target": str, "backend": str, "nodes": int, "scaling": dict}
_SCALING_COUNTS = ("instances", "min_replicas", "max_replicas", "max_batch", "replicas")
_SCALING_FIGURES = ("rate_per_s", "batch", "arrival_per_s", "utilisation", "peak_utilisation")  # or null
_PLAN_KEYS = {"name": str, "kind": str, "stages": list, "programs": dict, "predicted": dict}
_TOP_KEYS = {
    "schema_version": int, "partc_version": str, "model": dict, "cluster": dict, "stages": list, "plans": list,
    "verification": dict,
}


def tensor_json(spec: TensorSpec) -> dict:
    """Return a TensorSpec as its manifest form."""
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def tensor_spec(entry: Mapping) -> TensorSpec:
    """Return the TensorSpec of a manifest TENSOR."""
    return TensorSpec(entry["name"], tuple(entry["shape"]), entry["dtype"])


@dataclass(frozen=True)
class ProgramEntry:
    """One artifact of a stage (``stages[].programs[]``)."""

    id: str
    artifact: str
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    predicted_s: float
    info: Mapping

    def to_json(self) -> dict:
        return {"id": self.id, "artifact": self.artifact, "sha256": self.sha256, "bytes": self.bytes,
                "inputs": [tensor_json(t) for t in self.inputs], "outputs": [tensor_json(t) for t in self.outputs],
                "predicted_s": self.predicted_s, "info": dict(self.info)}


@dataclass(frozen=True)
class ScheduleEntry:
    """A tiled program of a stage (``stages[].schedules[]``, ``partc.tiling.schedule``)."""

    id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[tuple[str, ...], ...]
    results: tuple[tuple[str, str], ...]
    predicted_s: float

    def to_json(self) -> dict:
        return {"id": self.id, "inputs": [tensor_json(t) for t in self.inputs],
                "outputs": [tensor_json(t) for t in self.outputs], "steps": [list(s) for s in self.steps],
                "results": [list(r) for r in self.results], "predicted_s": self.predicted_s}


@dataclass(frozen=True)
class StageEntry:
    """One worker (``stages[]``): index 0 is its tier's stage, the others run its tiles."""

    name: str
    tier: str
    index: int
    backend: str
    target: str
    programs: tuple[ProgramEntry, ...]
    schedules: tuple[ScheduleEntry, ...]

    def program(self, pid: str) -> ProgramEntry | ScheduleEntry | None:
        """The program or tiled program called ``pid``; None if the stage has none."""
        return next((p for p in (*self.programs, *self.schedules) if p.id == pid), None)

    def to_json(self) -> dict:
        return {"name": self.name, "tier": self.tier, "index": self.index, "backend": self.backend,
                "target": self.target, "programs": [p.to_json() for p in self.programs],
                "schedules": [s.to_json() for s in self.schedules]}


@dataclass(frozen=True)
class TransferEntry:
    """A tensor moving to a stage in a plan (``plans[].transfers[]``)."""

    tensor: TensorSpec
    src: str | None
    dst: str
    bytes: int

    def to_json(self) -> dict:
        return {"tensor": tensor_json(self.tensor), "from": self.src, "to": self.dst, "bytes": self.bytes}


@dataclass(frozen=True)
class PlanEntry:
    """One plan of the build (``plans[]``)."""

    name: str
    kind: str
    stages: tuple[str, ...]
    programs: Mapping[str, str]
    assignment: Mapping[str, str]
    predicted: Prediction
    transfers: tuple[TransferEntry, ...]
    max_abs_diff: float


@dataclass(frozen=True)
class TierScaling:
    """A tier's load and scaling, and what the primary plan needs of it (``cluster.tiers[].scaling``)."""

    instances: int = 1
    rate_per_s: float | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    max_batch: int = 1
    replicas: int = 1
    batch: int | None = None
    arrival_per_s: float | None = None
    utilisation: float | None = None
    peak_utilisation: float | None = None

    @classmethod
    def of(cls, scaling: Scaling, use: Use | None) -> TierScaling:
        """The cluster file's ``scaling`` of a tier, with ``use``, its price under load (None: no rate)."""
        given = (scaling.instances, scaling.rate, scaling.min_replicas, scaling.max_replicas, scaling.max_batch)
        if use is None:
            return cls(*given, scaling.min_replicas)
        return cls(*given, use.replicas, use.batch, use.arrival_per_s, use.utilisation, use.peak_utilisation)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TierEntry:
    """A tier of the cluster (``cluster.tiers[]``)."""

    name: str
    target: str
    backend: str
    nodes: int
    scaling: TierScaling = TierScaling()


@dataclass(frozen=True)
class LinkEntry:
    """A link of the cluster (``cluster.links[]``), with the codec its tensors cross with."""

    src: str
    dst: str
    bandwidth: float
    latency: float
    call: float
    codec: LinkCodec

    @property
    def name(self) -> str:
        """``"src->dst"``."""
        return link_name(self.src, self.dst)

    @property
    def price(self) -> LinkPrice:
        """The link as plans are priced on it."""
        return LinkPrice(self.name, self.bandwidth, self.latency, self.codec, self.call)


@dataclass(frozen=True)
class Manifest:
    """A build's manifest, typed (the schema in the module docstring)."""

    partc_version: str
    model: str
    tracer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str
    objective: str
    tiers: tuple[TierEntry, ...]
    links: tuple[LinkEntry, ...]
    stages: tuple[StageEntry, ...]
    plans: tuple[PlanEntry, ...]
    max_abs_diff: float
    output_scale: float

    @property
    def chain(self) -> tuple[StageEntry, ...]:
        """The stages data flows through, in order (index 0); the others only run tiles."""
        return tuple(s for s in self.stages if s.index == 0)

    @property
    def prices(self) -> tuple[LinkPrice, ...]:
        """The links between consecutive tiers, as every plan is priced on them."""
        names = [t.name for t in self.tiers]
        wanted = {link_name(a, b) for a, b in zip(names, names[1:], strict=False)}
        return tuple(lk.price for lk in self.links if lk.name in wanted)

    def stage(self, name: str) -> StageEntry:
        """The stage called ``name``.

        Raises:
            ManifestError: if there is none.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise ManifestError(f"no stage {name!r}; stages are: {', '.join(s.name for s in self.stages)}")

    def to_json(self) -> dict:
        """Return the manifest as ``manifest.json`` holds it."""
        prices = self.prices
        return {
            "schema_version": SCHEMA_VERSION,
            "partc_version": self.partc_version,
            "model": {"spec": self.model, "tracer": self.tracer, "inputs": [tensor_json(t) for t in self.inputs],
                      "outputs": [tensor_json(t) for t in self.outputs]},
            "cluster": {
                "source": self.source, "objective": self.objective,
                "tiers": [{"name": t.name, "target": t.target, "backend": t.backend, "nodes": t.nodes,
                           "scaling": t.scaling.to_json()} for t in self.tiers],
                "links": [{"from": lk.src, "to": lk.dst, "bandwidth": lk.bandwidth, "latency": lk.latency,
                           "call": lk.call, "codec": lk.codec.to_json()} for lk in self.links],
            },
            "stages": [s.to_json() for s in self.stages],
            "plans": [{
                "name": p.name, "kind": p.kind, "stages": list(p.stages), "programs": dict(p.programs),
                "assignment": dict(p.assignment), "predicted": p.predicted.to_json(prices),
                "transfers": [t.to_json() for t in p.transfers], "max_abs_diff": p.max_abs_diff,
            } for p in self.plans],
            "verification": {"max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale,
                             "inputs": "seeded example"},
        }


@dataclass(frozen=True)
class ManifestStage:
    """A stage as the runtime loads it: its programs' verified artifacts by program id, and its
    tiled programs by program id."""

    name: str
    tier: str
    index: int
    target: str
    programs: Mapping[str, Artifact]
    schedules: Mapping[str, ScheduleEntry]


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Write ``manifest`` to ``folder/manifest.json`` (sorted keys) and return the path."""
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(path: Path | str) -> Manifest:
    """Read and validate a manifest (a file, or the build folder holding it).

    Raises:
        ManifestError: naming the file and the key at fault.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: not found; is this a folder written by 'partc compile'?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be a manifest; recompile with this partc") from None
    try:
        _check(path, manifest)
        return _typed(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a value of the wrong kind
        raise ManifestError(f"{path}: malformed ({type(err).__name__}: {err}); recompile with this partc") from err


def _check(path: Path, manifest) -> None:
    """Check a parsed manifest's keys and types, and that its plans name stages and programs it has."""
    _check_keys(path, "", manifest, _TOP_KEYS)
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version: {manifest['schema_version']} is not supported (this partc reads "
            f"{SCHEMA_VERSION}); recompile with this partc"
        )
    programs = set()
    for i, stage in enumerate(manifest["stages"]):
        _check_keys(path, f"stages[{i}].", stage, _STAGE_KEYS)
        for j, schedule in enumerate(stage["schedules"]):
            _check_keys(path, f"stages[{i}].schedules[{j}].", schedule, _SCHEDULE_KEYS)
            programs.add((stage["name"], schedule["id"]))
        for j, program in enumerate(stage["programs"]):
            where = f"stages[{i}].programs[{j}]."
            _check_keys(path, where, program, _PROGRAM_KEYS)
            programs.add((stage["name"], program["id"]))
            for key in ("inputs", "outputs"):
                for k, tensor in enumerate(program[key]):
                    _check_tensor(path, f"{where}{key}[{k}].", tensor)
    for key in ("inputs", "outputs"):
        tensors = manifest["model"].get(key)
        if not isinstance(tensors, list):
            raise ManifestError(f"{path}: model.{key}: expected a list of tensors")
        for k, tensor in enumerate(tensors):
            _check_tensor(path, f"model.{key}[{k}].", tensor)
    tiers = manifest["cluster"].get("tiers")
    if not isinstance(tiers, list) or not tiers:
        raise ManifestError(f"{path}: cluster.tiers: expected a non-empty list of tiers")
    for i, tier in enumerate(tiers):
        _check_keys(path, f"cluster.tiers[{i}].", tier, _TIER_KEYS)
        _check_scaling(path, f"cluster.tiers[{i}].scaling.", tier["scaling"])
    names = [s["name"] for s in manifest["stages"] if s["index"] == 0]
    if not manifest["plans"]:
        raise ManifestError(f"{path}: plans: empty; a build has at least its primary plan")
    for i, plan in enumerate(manifest["plans"]):
        _check_keys(path, f"plans[{i}].", plan, _PLAN_KEYS)
        if plan["stages"] != names[: len(plan["stages"])]:
            raise ManifestError(f"{path}: plans[{i}].stages: {plan['stages']} is not a prefix of the stages {names}")
        for stage, pid in plan["programs"].items():
            if (stage, pid) not in programs:
                raise ManifestError(f"{path}: plans[{i}].programs.{stage}: no program {pid!r} in stage {stage!r}")


def _typed(data: Mapping) -> Manifest:
    """The typed form of a manifest whose keys ``read_manifest`` has checked."""

    def tensors(entries) -> tuple[TensorSpec, ...]:
        return tuple(map(tensor_spec, entries))

    stages = tuple(StageEntry(
        s["name"], s["tier"], s["index"], s["backend"], s["target"],
        tuple(ProgramEntry(p["id"], p["artifact"], p["sha256"], p["bytes"], tensors(p["inputs"]),
                           tensors(p["outputs"]), p["predicted_s"], p["info"])
              for p in s["programs"]),
        tuple(ScheduleEntry(c["id"], tensors(c["inputs"]), tensors(c["outputs"]), tuple(map(tuple, c["steps"])),
                            tuple(map(tuple, c["results"])), c["predicted_s"])
              for c in s["schedules"]),
    ) for s in data["stages"])
    plans = tuple(PlanEntry(
        p["name"], p["kind"], tuple(p["stages"]), dict(p["programs"]), dict(p["assignment"]),
        Prediction.from_json(p["predicted"]),
        tuple(TransferEntry(tensor_spec(t["tensor"]), t["from"], t["to"], t["bytes"]) for t in p["transfers"]),
        p["max_abs_diff"],
    ) for p in data["plans"])
    model, cluster, verification = data["model"], data["cluster"], data["verification"]
    return Manifest(
        data["partc_version"], model["spec"], model["tracer"], tensors(model["inputs"]), tensors(model["outputs"]),
        cluster["source"], cluster["objective"],
        tuple(TierEntry(t["name"], t["target"], t["backend"], t["nodes"], TierScaling(**t["scaling"]))
              for t in cluster["tiers"]),
        tuple(LinkEntry(lk["from"], lk["to"], lk["bandwidth"], lk["latency"], lk["call"],
                        LinkCodec.from_json(lk["codec"]))
              for lk in cluster["links"]),
        stages, plans, verification["max_abs_diff"], verification["output_scale"],
    )


def _check_scaling(path: Path, prefix: str, value) -> None:
    """Check a SCALING: its counts positive integers (bounds in order), its figures numbers or null."""
    _check_keys(path, prefix, value, {key: int for key in _SCALING_COUNTS})
    for key in _SCALING_COUNTS:
        if value[key] < 1:
            raise ManifestError(f"{path}: {prefix}{key}: {value[key]} is not a positive integer")
    if not value["min_replicas"] <= value["max_replicas"]:
        raise ManifestError(f"{path}: {prefix}min_replicas: {value['min_replicas']} is above max_replicas")
    for key in _SCALING_FIGURES:
        if key not in value:
            raise ManifestError(f"{path}: {prefix}{key}: missing")
        figure = value[key]
        if figure is not None and (isinstance(figure, bool) or not isinstance(figure, (int, float)) or figure < 0):
            raise ManifestError(f"{path}: {prefix}{key}: expected a number or null, got {figure!r}")
    unknown = set(value) - set(_SCALING_COUNTS) - set(_SCALING_FIGURES)
    if unknown:
        raise ManifestError(f"{path}: {prefix}{sorted(unknown)[0]}: unknown key; recompile with this partc")


def _check_tensor(path: Path, prefix: str, value) -> None:
    """Check a TENSOR: a name, a shape of sizes (non-negative integers), a numeric dtype's name."""
    _check_keys(path, prefix, value, {"name": str, "shape": list, "dtype": str})
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in value["shape"]):
        raise ManifestError(f"{path}: {prefix}shape: {value['shape']!r} is not a list of sizes")
    try:
        dtype = np.dtype(value["dtype"])
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.name != value["dtype"] or dtype.kind not in "biuf":
        raise ManifestError(f"{path}: {prefix}dtype: {value['dtype']!r} is not the name of a numeric dtype "
                            "(float32, int64...)")


def _check_keys(path: Path, prefix: str, value, keys: Mapping[str, type]) -> None:
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: {prefix.rstrip('.') or 'top level'}: expected an object")
    for key, kind in keys.items():
        if key not in value:
            raise ManifestError(f"{path}: {prefix}{key}: missing")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise ManifestError(f"{path}: {prefix}{key}: expected {kind.__name__}, got {type(value[key]).__name__}")


def manifest_stages(manifest: Manifest, folder: Path, verify: Collection[str] | None = None) -> list[ManifestStage]:
    """Return the manifest's stages with their programs' artifacts, verified against their sha256.

    Only the stages named in ``verify`` are checked (all when None): a worker holds only its
    own stage's artifacts. Every artifact path must stay inside ``folder``: no absolute
    path, no ``..``, no symbolic link that leads out of it.

    Raises:
        ManifestError: if an artifact path leads out of ``folder``, or an artifact to verify
            is missing or its checksum does not match.
    """
    stages = []
    for i, entry in enumerate(manifest.stages):
        programs = {}
        for j, program in enumerate(entry.programs):
            where = f"{folder / MANIFEST}: stages[{i}].programs[{j}].artifact: {program.artifact!r}"
            path = _confined(folder, program.artifact, where)
            if verify is None or entry.name in verify:
                _check_artifact(path, program.sha256, where)
            programs[program.id] = Artifact(program.id, entry.backend, path, program.sha256, program.bytes,
                                            program.inputs, program.outputs, program.info)
        stages.append(ManifestStage(entry.name, entry.tier, entry.index, entry.target, programs,
                                    {s.id: s for s in entry.schedules}))
    return stages


def _confined(folder: Path, artifact: str, where: str) -> Path:
    """``folder / artifact``, once sure that it names a file inside ``folder`` (links resolved)."""
    relative = Path(artifact)
    if not artifact or relative.is_absolute() or ".." in relative.parts:
        raise ManifestError(f"{where} is not a path inside the build folder; an artifact is named relative to "
                            "the manifest's folder, without '..'; recompile")
    path = folder / relative
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ManifestError(f"{where}: {path}: a symbolic link to {resolved}, outside the build folder; copy the "
                            "artifact into the build folder, or recompile")
    return path


def _check_artifact(path: Path, sha256: str, where: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{where} not found")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise ManifestError(f"{where} does not match its sha256 (tampered or rebuilt); recompile")
