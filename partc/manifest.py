"""``manifest.json``: what the runtime reads to run a build, and what humans deploy from.

Schema (``schema_version`` 2; keys sorted; sizes in bytes, times in seconds)::

    schema_version   2
    partc_version    the partc that wrote it
    model            {spec, tracer, inputs: [TENSOR], outputs: [TENSOR]}
    cluster          {source, objective, tiers: [{name, target, backend, nodes}],
                      links: [{from, to, bandwidth, latency,       bandwidth in bytes/s
                               codec: {codec, ratio, encode_bytes_per_s, decode_bytes_per_s,
                                       agreement, samples}}]}
    stages           [{name, tier, index, backend, target,         one worker each
                       programs: [{id, artifact, sha256, bytes, inputs: [TENSOR],
                                   outputs: [TENSOR], predicted_s, measured_s, info}],
                       schedules: [{id, inputs: [TENSOR], outputs: [TENSOR],
                                    steps: [[program id per node]], results: [[name, tensor]],
                                    predicted_s, measured_s}]}]
    plans            [{name, kind, stages: [stage], programs: {stage: program id},
                       assignment: {node: tier},                   every IR node
                       predicted: {latency, base, bottleneck, compute: {tier: s},
                                   transfer: {link: s}, link_bytes: {link: bytes}},
                       transfers: [{tensor: TENSOR, from: stage | null, to: stage, bytes}],
                       max_abs_diff}]
    verification     {max_abs_diff, output_scale, inputs: "seeded example"}

    TENSOR = {name, shape: [int], dtype}

``stages`` with ``index`` 0 form the chain, in order (data flows from each to the next);
the others are the further nodes of a tier with several (``edge.1``): they run tiles for
their tier's stage and are in no chain. A stage's ``schedules`` are its tiled programs
(``partc.tiling.schedule``): in each step, node t runs the t-th program id (``edge.1`` runs
``edge.0~1.1``); ``results`` name the tensors that hold the stage's outputs. ``plans[0]`` is the
primary plan (``kind`` "primary"), the one compiled for the cluster file's bandwidths;
"adaptive" plans are the rest of its plan family, "fallback" plans stop before a tier. A
plan's ``stages`` are its chain: the stages from the first up to its last one with a
program; a stage of the chain without a program in ``programs`` relays tensors. ``base``
is the predicted latency at infinite bandwidth; link = "src->dst". ``artifact`` is
relative to the manifest's folder. ``measured_s`` is the median time of the artifact on
the compiling host, or null where it cannot run there (cross-compiled).
``transfers[].from`` is null for a model input. A link's ``codec`` is what tensors cross
it with (``compress-cut-tensors``; ``none`` unless the cluster file allows another), with
its measured ratio, speeds and top-1 agreement; plans are priced with it. ``verification``
runs the artifacts without codecs: the codecs' cost in accuracy is their ``agreement``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import partc
from partc.codec import NO_CODEC
from partc.errors import ManifestError
from partc.ir import META_LINK_CODECS, META_PROFILE, META_TIER
from partc.plan import Artifact, Plan, Stage, TensorSpec
from partc.tiling.schedule import Schedule, step_id

if TYPE_CHECKING:
    import numpy as np
    from torch import fx

    from partc.context import CompileContext
    from partc.partition.cost import CostGraph

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"

_STAGE_KEYS = {"name": str, "tier": str, "index": int, "backend": str, "target": str, "programs": list,
               "schedules": list}
_SCHEDULE_KEYS = {"id": str, "inputs": list, "outputs": list, "steps": list, "results": list}
_PROGRAM_KEYS = {"id": str, "artifact": str, "sha256": str, "bytes": int, "inputs": list, "outputs": list, "info": dict}
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
class ManifestStage:
    """A stage as the runtime sees it: where it runs, its programs' artifacts by program id, and
    its tiled programs' schedules (manifest entries) by program id."""

    name: str
    tier: str
    index: int
    target: str
    programs: Mapping[str, Artifact]
    schedules: Mapping[str, Mapping]


def build_manifest(
    model: str, gm: fx.GraphModule, ctx: CompileContext, graph: CostGraph, choices: Sequence[tuple[str, np.ndarray]],
    assigned: Sequence[fx.GraphModule], plans: Sequence[Plan], uses: Sequence[Mapping[str, str]],
    schedules: Mapping[str, Schedule], emitted: Mapping[str, Stage], artifacts: Mapping[str, Artifact],
    measured: Mapping[str, float | None], diffs: Sequence[float], scale: float,
) -> dict:
    """Return the manifest of a build, from what ``partc.build.compile_model`` made.

    Args:
        model: the MODEL spec.
        gm: the IR after the passes, before any plan's tiling.
        ctx: the cluster.
        graph: ``gm``'s cost graph.
        choices: (kind, tier index per node) of each plan (``deployment_plans``).
        assigned: each plan's IR (tiers assigned, tiled).
        plans: each plan's stages.
        uses: per plan, stage -> program id.
        schedules: program id -> schedule, for the tiled programs.
        emitted: program id -> the program of each artifact (a step of a tiled program included).
        artifacts: program id -> artifact, for ``emitted``.
        measured: program id -> median seconds on this host (None: not runnable here).
        diffs: per plan, the largest absolute difference from the model.
        scale: the model output's largest magnitude.
    """
    import numpy as np

    from partc.partition.cost import evaluate

    order = {name: i for i, name in enumerate(ctx.tier_names)}
    codecs = gm.meta.get(META_LINK_CODECS, {})
    seconds = {pid: _program_seconds(stage) for pid, stage in emitted.items()}
    for pid, sch in schedules.items():
        seconds[pid] = _schedule_seconds(sch, pid, seconds, ctx)
    chain = sorted({s.name: s for plan in plans for s in plan.stages}.values(), key=lambda s: order[s.tier])
    peers = sorted({p.name: p for sch in schedules.values() for step in sch.steps for p in step.programs[1:]}.values(),
                   key=lambda s: (order[s.tier], s.index))
    stages = []
    for worker in [*chain, *peers]:
        tier = ctx.tier(worker.tier)
        entries = [{
            "id": pid, "artifact": a.path.name, "sha256": a.sha256, "bytes": a.bytes,
            "inputs": [tensor_json(t) for t in a.inputs], "outputs": [tensor_json(t) for t in a.outputs],
            "predicted_s": seconds[pid], "measured_s": measured[pid], "info": dict(a.info),
        } for pid, a in artifacts.items() if emitted[pid].name == worker.name]
        tiled = [{
            "id": pid, "inputs": [tensor_json(t) for t in sch.inputs], "outputs": [tensor_json(t) for t in sch.outputs],
            "steps": [[step_id(pid, i, t) for t in range(len(step.programs))] for i, step in enumerate(sch.steps)],
            "results": [list(pair) for pair in sch.results], "predicted_s": seconds[pid], "measured_s": measured[pid],
        } for pid, sch in schedules.items() if sch.stage == worker.name]
        stages.append({"name": worker.name, "tier": worker.tier, "index": worker.index, "backend": tier.backend,
                       "target": tier.target, "programs": entries, "schedules": tiled})
    names = [w.name for w in chain]
    entries = []
    for i, ((kind, tiers), g, plan, use) in enumerate(zip(choices, assigned, plans, uses, strict=True)):
        cost = evaluate(graph, tiers)
        compute = dict.fromkeys(graph.tiers, 0.0) | {s.tier: seconds[use[s.name]] for s in plan.stages}
        stream = [b / bw for b, bw in zip(cost.link_bytes, graph.bandwidth, strict=True)]
        latency = sum(compute.values()) + sum(cost.transfer)
        entries.append({
            "name": f"p{i}", "kind": kind, "stages": names[: max(names.index(stage) for stage in use) + 1],
            "programs": dict(use), "assignment": {n.name: n.meta[META_TIER] for n in g.graph.nodes},
            "predicted": {
                "latency": latency, "base": latency - sum(stream), "bottleneck": max([*compute.values(), *stream]),
                "compute": compute, "transfer": dict(zip(graph.links, cost.transfer, strict=True)),
                "link_bytes": dict(zip(graph.links, map(int, cost.link_bytes), strict=True)),
            },
            "transfers": [
                {"tensor": tensor_json(t.tensor), "from": t.src, "to": t.dst,
                 "bytes": int(np.prod(t.tensor.shape)) * np.dtype(t.tensor.dtype).itemsize}
                for t in plan.transfers
            ],
            "max_abs_diff": diffs[i],
        })
    return {
        "schema_version": SCHEMA_VERSION,
        "partc_version": partc.__version__,
        "model": {
            "spec": model, "tracer": gm.meta["partc.tracer"],
            "inputs": [tensor_json(t) for t in plans[0].model_inputs],
            "outputs": [tensor_json(t) for t in plans[0].model_outputs],
        },
        "cluster": {
            "source": ctx.source, "objective": ctx.objective,
            "tiers": [{"name": t.name, "target": t.target, "backend": t.backend, "nodes": t.nodes} for t in ctx.tiers],
            "links": [{"from": lk.src, "to": lk.dst, "bandwidth": lk.bandwidth, "latency": lk.latency,
                       "codec": dict(codecs.get(f"{lk.src}->{lk.dst}", NO_CODEC))} for lk in ctx.links],
        },
        "stages": stages,
        "plans": entries,
        "verification": {"max_abs_diff": max(diffs), "output_scale": scale, "inputs": "seeded example"},
    }


def _program_seconds(stage: Stage) -> float:
    """Predicted seconds of a program on its tier: its nodes' ``META_PROFILE``."""
    return sum(n.meta.get(META_PROFILE, {}).get(stage.tier, 0.0) for n in stage.gm.graph.nodes)


def _schedule_seconds(schedule: Schedule, pid: str, seconds: Mapping[str, float], ctx: CompileContext) -> float:
    """Predicted seconds of a tiled stage: local steps in turn; in a tile step the slowest node, a
    tile on another node paying its inputs' and outputs' transfer over the tier's own link."""
    total = 0.0
    for i, step in enumerate(schedule.steps):
        tier = step.programs[0].tier
        link = ctx.link(tier, tier)
        times = []
        for t, program in enumerate(step.programs):
            moved = sum(_nbytes(s) for s in program.inputs + program.outputs) if t else 0
            times.append(seconds[step_id(pid, i, t)] + (link.transfer_time(moved) if link and moved else 0.0))
        total += max(times)
    return total


def _nbytes(spec: TensorSpec) -> int:
    import numpy as np

    return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize


def write_manifest(manifest: Mapping, folder: Path) -> Path:
    """Write ``manifest`` to ``folder/manifest.json`` (sorted keys) and return the path."""
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def render_deployment(manifest: Mapping, folder: Path, build_name: str) -> list[Path]:
    """Render the human-facing deployment files of the build ``build_name`` into ``folder``.

    Per stage: ``serve-<stage>.sh`` (runs ``partc serve`` for it, with the address of the
    next stage of the chain and of the nodes that run its tiles) and ``partc-<stage>.service``
    (a systemd unit running that script); and one ``README.md``.
    Returns the files written.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("partc.templates", ""), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    stages = manifest["stages"]
    chain = [s["name"] for s in stages if s["index"] == 0]
    written, deploy = [], []
    for stage in stages:
        at = chain.index(stage["name"]) if stage["index"] == 0 else len(chain)
        tiles = stage["schedules"]
        peers = [s["name"] for s in stages if tiles and s["tier"] == stage["tier"] and s["index"] > 0]
        values = {"stage": stage, "next_stage": chain[at + 1] if at + 1 < len(chain) else None, "peers": peers,
                  "partc_version": manifest["partc_version"], "model": manifest["model"]["spec"],
                  "build_name": build_name}
        deploy.append({key: stage[key] for key in ("name", "tier", "index")} | values)
        script = folder / f"serve-{stage['name']}.sh"
        script.write_text(env.get_template("serve.sh.j2").render(values))
        script.chmod(0o755)
        unit = folder / f"partc-{stage['name']}.service"
        unit.write_text(env.get_template("stage.service.j2").render(values))
        written += [script, unit]
    readme = folder / "README.md"
    predicted = manifest["plans"][0]["predicted"]
    links = [{"src": key.split("->")[0], "dst": key.split("->")[1], "bytes": nbytes,
              "seconds": predicted["transfer"][key]} for key, nbytes in predicted["link_bytes"].items()]
    readme.write_text(env.get_template("README.md.j2").render({**manifest, "links": links, "deploy": deploy}))
    return [*written, readme]


def read_manifest(path: Path | str) -> dict:
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
                    _check_keys(path, f"{where}{key}[{k}].", tensor, {"name": str, "shape": list, "dtype": str})
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
    return manifest


def _check_keys(path: Path, prefix: str, value, keys: Mapping[str, type]) -> None:
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: {prefix.rstrip('.') or 'top level'}: expected an object")
    for key, kind in keys.items():
        if key not in value:
            raise ManifestError(f"{path}: {prefix}{key}: missing")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise ManifestError(f"{path}: {prefix}{key}: expected {kind.__name__}, got {type(value[key]).__name__}")


def manifest_stages(manifest: Mapping, folder: Path, verify: Collection[str] | None = None) -> list[ManifestStage]:
    """Return the manifest's stages with their programs' artifacts, verified against their sha256.

    Only the stages named in ``verify`` are checked (all when None): a worker holds only its
    own stage's artifacts.

    Raises:
        ManifestError: if an artifact to verify is missing or its checksum does not match.
    """
    stages = []
    for i, entry in enumerate(manifest["stages"]):
        programs = {}
        for j, program in enumerate(entry["programs"]):
            path = folder / program["artifact"]
            if verify is None or entry["name"] in verify:
                where = f"{folder / MANIFEST}: stages[{i}].programs[{j}].artifact: {program['artifact']!r}"
                _check_artifact(path, program["sha256"], where)
            inputs, outputs = (tuple(map(tensor_spec, program[key])) for key in ("inputs", "outputs"))
            programs[program["id"]] = Artifact(program["id"], entry["backend"], path, program["sha256"],
                                               program["bytes"], inputs, outputs, program["info"])
        stages.append(ManifestStage(entry["name"], entry["tier"], entry["index"], entry["target"], programs,
                                    {s["id"]: s for s in entry["schedules"]}))
    return stages


def _check_artifact(path: Path, sha256: str, where: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{where} not found")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise ManifestError(f"{where} does not match its sha256 (tampered or rebuilt); recompile")
