"""The human-facing deployment files of a build, rendered from its manifest with ``templates/``.

Templates only lay out text: every value comes from the manifest's own JSON form (or from
the target descriptions, for threads) and goes through ``| tojson``, with ``StrictUndefined``.

Per stage the build folder gets ``serve-<stage>.sh`` (the start script: reads its settings
from ``<stage>.env``, or from the file given as its argument, and runs ``partc serve``),
``<stage>.env`` (the settings, filled in from the cluster file where it knows them:
listen port, threads; the next stage's and the tile nodes' addresses, the token and TLS
files are left for the user, each documented) and ``partc-<stage>.service`` (a systemd
unit running the script as user ``partc``, restarted on exit, sandboxed). ``README.md``
describes the whole build; ``tier_readme`` the part one tier's machines get in a bundle.
"""

from __future__ import annotations

from pathlib import Path

from partc.manifest import Manifest
from partc.targets import target

PORT = 50051  # each worker's default listening port (the gRPC convention)
INSTALL_DIR = "/opt/partc"  # where the systemd units expect the unpacked bundle, as INSTALL_DIR/<build name>
EXTRAS = {"torchscript": "runtime", "onnx": "runtime,onnx", "tvm": "runtime,tvm", "export": "runtime"}  # per backend


def render_deployment(manifest: Manifest, folder: Path, build_name: str) -> list[Path]:
    """Render the deployment files of the build ``build_name`` into ``folder``; return them.

    Per stage ``serve-<stage>.sh``, ``<stage>.env`` and ``partc-<stage>.service``, and one
    ``README.md`` (see the module docstring).
    """
    env = _environment()
    data = manifest.to_json()  # templates only lay out the manifest's own text
    written = []
    for values in _stages(data, build_name):
        name = values["stage"]["name"]
        for template, file_name, mode in (("serve.sh.j2", f"serve-{name}.sh", 0o755),
                                          ("stage.env.j2", f"{name}.env", 0o644),
                                          ("stage.service.j2", f"partc-{name}.service", 0o644)):
            path = folder / file_name
            path.write_text(env.get_template(template).render(values))
            path.chmod(mode)
            written.append(path)
    readme = folder / "README.md"
    predicted = data["plans"][0]["predicted"]
    links = [{"src": key.split("->")[0], "dst": key.split("->")[1], "bytes": nbytes,
              "seconds": predicted["transfer"][key]} for key, nbytes in predicted["link_bytes"].items()]
    readme.write_text(env.get_template("README.md.j2").render(
        {**data, "links": links, "deploy": _stages(data, build_name)}))
    return [*written, readme]


def stage_files(manifest: Manifest, stage: str) -> list[str]:
    """The files of ``stage`` in a build folder: its artifacts, start script, settings and unit."""
    (entry,) = [s for s in manifest.stages if s.name == stage]
    return [*(p.artifact for p in entry.programs), f"serve-{stage}.sh", f"{stage}.env", f"partc-{stage}.service"]


def tier_readme(manifest: Manifest, tier: str, build_name: str, archive: str) -> str:
    """The README of the bundle ``archive`` (a file name) of ``tier``: what to install, who calls whom,
    how to start and check it."""
    data = manifest.to_json()
    stages = [s for s in _stages(data, build_name) if s["stage"]["tier"] == tier]
    extras = sorted({EXTRAS[s["stage"]["backend"]] for s in stages})
    chain = [s["stage"]["name"] for s in _stages(data, build_name) if s["stage"]["index"] == 0]
    return _environment().get_template("tier-README.md.j2").render(
        {**data, "tier": tier, "build_name": build_name, "archive": archive, "deploy": stages, "extras": extras,
         "chain": chain})


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("partc.templates", ""), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )


def _stages(data: dict, build_name: str) -> list[dict]:
    """The template values of each stage: its manifest entry, whom it calls and who calls it."""
    stages = data["stages"]
    chain = [s["name"] for s in stages if s["index"] == 0]
    out = []
    for stage in stages:
        at = chain.index(stage["name"]) if stage["index"] == 0 else None
        peers = [s["name"] for s in stages if stage["schedules"] and s["tier"] == stage["tier"] and s["index"] > 0]
        # a tile node is called by its tier's coordinator; a stage of the chain by the one before it,
        # and by the driver (requests go to the first stage; the driver health-checks every one)
        callers = [f"{stage['tier']}.0"] if at is None else chain[max(0, at - 1):at]
        desc = target(stage["target"])
        out.append({
            "stage": stage, "next_stage": chain[at + 1] if at is not None and at + 1 < len(chain) else None,
            "peers": peers, "callers": callers, "driver_calls": at is not None, "port": PORT,
            "threads": desc.cores, "gpu": desc.kind == "gpu",
            "partc_version": data["partc_version"], "model": data["model"]["spec"], "build_name": build_name,
            "install_dir": f"{INSTALL_DIR}/{build_name}", "extras": EXTRAS[stage["backend"]],
        })
    return out
