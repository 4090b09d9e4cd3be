"""The human-facing deployment files of a build, rendered from its manifest with ``templates/``.

Templates only lay out text: every value comes from the manifest's own JSON form and goes
through ``| tojson``, with ``StrictUndefined``.
"""

from __future__ import annotations

from pathlib import Path

from partc.manifest import Manifest


def render_deployment(manifest: Manifest, folder: Path, build_name: str) -> list[Path]:
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
    manifest = manifest.to_json()  # templates only lay out the manifest's own text
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
