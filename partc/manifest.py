"""``manifest.json``: what the runtime reads to run a build, and what humans deploy from.

Schema (``schema_version`` 2; keys sorted; sizes in bytes, times in seconds)::

    schema_version   2
    partc_version    the partc that wrote it
    model            {spec, tracer, inputs: [TENSOR], outputs: [TENSOR]}
    cluster          {source, objective, tiers: [{name, target, backend, nodes}],
                      links: [{from, to, bandwidth, latency}]}     bandwidth in bytes/s
    stages           [{name, tier, index, backend, target,         one worker each
                       programs: [{id, artifact, sha256, bytes, inputs: [TENSOR],
                                   outputs: [TENSOR], predicted_s, measured_s, info}]}]
    plans            [{name, kind, stages: [stage], programs: {stage: program id},
                       assignment: {node: tier},                   every IR node
                       predicted: {latency, base, bottleneck, compute: {tier: s},
                                   transfer: {link: s}, link_bytes: {link: bytes}},
                       transfers: [{tensor: TENSOR, from: stage | null, to: stage, bytes}],
                       max_abs_diff}]
    verification     {max_abs_diff, output_scale, inputs: "seeded example"}

    TENSOR = {name, shape: [int], dtype}

``stages`` are in chain order (data flows from each to the next). ``plans[0]`` is the
primary plan (``kind`` "primary"), the one compiled for the cluster file's bandwidths;
"adaptive" plans are the rest of its plan family, "fallback" plans stop before a tier. A
plan's ``stages`` are its chain: the stages from the first up to its last one with a
program; a stage of the chain without a program in ``programs`` relays tensors. ``base``
is the predicted latency at infinite bandwidth; link = "src->dst". ``artifact`` is
relative to the manifest's folder. ``measured_s`` is the median time of the artifact on
the compiling host, or null where it cannot run there (cross-compiled).
``transfers[].from`` is null for a model input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from partc.errors import ManifestError
from partc.plan import Artifact, TensorSpec

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"

_STAGE_KEYS = {"name": str, "tier": str, "index": int, "backend": str, "target": str, "programs": list}
_PROGRAM_KEYS = {"id": str, "artifact": str, "sha256": str, "bytes": int, "inputs": list, "outputs": list, "info": dict}
_PLAN_KEYS = {"name": str, "kind": str, "stages": list, "programs": dict, "predicted": dict}
_TOP_KEYS = {
    "schema_version": int, "partc_version": str, "model": dict, "cluster": dict, "stages": list, "plans": list,
    "verification": dict,
}


def tensor_json(spec: TensorSpec) -> dict:
    """Return a TensorSpec as its manifest form."""
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


@dataclass(frozen=True)
class ManifestStage:
    """A stage as the runtime sees it: where it runs and its programs' artifacts, by program id."""

    name: str
    tier: str
    target: str
    programs: Mapping[str, Artifact]


def write_manifest(manifest: Mapping, folder: Path) -> Path:
    """Write ``manifest`` to ``folder/manifest.json`` (sorted keys) and return the path."""
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def render_deployment(manifest: Mapping, folder: Path, build_name: str) -> list[Path]:
    """Render the human-facing deployment files of the build ``build_name`` into ``folder``.

    Per stage: ``serve-<stage>.sh`` (runs ``partc serve`` for it) and
    ``partc-<stage>.service`` (a systemd unit running that script); and one ``README.md``.
    Returns the files written.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("partc.templates", ""), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    stages = manifest["stages"]
    written = []
    for i, stage in enumerate(stages):
        values = {"stage": stage, "next_stage": stages[i + 1]["name"] if i + 1 < len(stages) else None,
                  "partc_version": manifest["partc_version"], "model": manifest["model"]["spec"],
                  "build_name": build_name}
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
    readme.write_text(env.get_template("README.md.j2").render({**manifest, "links": links}))
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
        for j, program in enumerate(stage["programs"]):
            where = f"stages[{i}].programs[{j}]."
            _check_keys(path, where, program, _PROGRAM_KEYS)
            programs.add((stage["name"], program["id"]))
            for key in ("inputs", "outputs"):
                for k, tensor in enumerate(program[key]):
                    _check_keys(path, f"{where}{key}[{k}].", tensor, {"name": str, "shape": list, "dtype": str})
    names = [s["name"] for s in manifest["stages"]]
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
            inputs, outputs = (tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in program[key])
                               for key in ("inputs", "outputs"))
            programs[program["id"]] = Artifact(program["id"], entry["backend"], path, program["sha256"],
                                               program["bytes"], inputs, outputs, program["info"])
        stages.append(ManifestStage(entry["name"], entry["tier"], entry["target"], programs))
    return stages


def _check_artifact(path: Path, sha256: str, where: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{where} not found")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise ManifestError(f"{where} does not match its sha256 (tampered or rebuilt); recompile")
