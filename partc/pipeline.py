"""The pass manager: run named passes in order, lint after each, dump the IR on request."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from partc.context import CompileContext
from partc.errors import PartcError
from partc.ir import META_SHAPE, META_TIER, lint

log = logging.getLogger(__name__)

TRACE = "trace"  # the name --dump-after uses for the IR as traced, before any pass


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new IR and a one-line summary for progress output."""

    gm: fx.GraphModule
    summary: str = ""


Pass = Callable[[fx.GraphModule, CompileContext], PassResult]


def run_passes(
    gm: fx.GraphModule,
    names: Sequence[str],
    ctx: CompileContext,
    *,
    dump_after: Iterable[str] = (),
    dump_dir: Path = Path("partc-dump"),
) -> fx.GraphModule:
    """Run the passes ``names`` (kebab-case keys of ``partc.passes.PASSES``) in order.

    The IR is linted after every pass. For every name in ``dump_after`` (a pass name, or
    ``"trace"`` for the traced IR) the IR is written to ``dump_dir`` as
    ``NN-NAME.json`` and ``NN-NAME.dot``.

    Raises:
        PartcError: for an unknown pass name, or a pass that fails on bad input; the
            message names the pass, and the pass's own error is chained.
    """
    from partc.passes import PASSES

    dump_after = set(dump_after)
    unknown = sorted((set(names) | dump_after) - set(PASSES) - {TRACE})
    if unknown:
        raise PartcError(f"unknown pass {unknown[0]!r}; passes are: {', '.join([TRACE, *PASSES])}")
    not_run = sorted(dump_after - set(names) - {TRACE})
    if not_run:
        raise PartcError(f"--dump-after {not_run[0]!r}: that pass is not in this pipeline ({', '.join(names)})")
    if TRACE in dump_after:
        dump_ir(gm, dump_dir / f"00-{TRACE}")
    for index, name in enumerate(names, start=1):
        try:
            result = PASSES[name](gm, ctx)
        except PartcError as err:
            raise type(err)(f"pass {name!r} failed: {err}") from err
        gm = result.gm
        lint(gm, ctx.tier_names)
        log.info("%s: %s", name, result.summary or "done")
        if name in dump_after:
            dump_ir(gm, dump_dir / f"{index:02d}-{name}")
    return gm


def ir_to_json(gm: fx.GraphModule) -> dict:
    """Return the IR as a JSON-able dict: every node with its inputs and partc metadata."""
    nodes = []
    for n in gm.graph.nodes:
        meta = {k: _jsonable(v) for k, v in sorted(n.meta.items()) if k.startswith("partc.")}
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        nodes.append(
            {"name": n.name, "op": n.op, "target": target, "inputs": [a.name for a in n.all_input_nodes], "meta": meta}
        )
    return {"tracer": gm.meta.get("partc.tracer"), "nodes": nodes}


def ir_to_dot(gm: fx.GraphModule) -> str:
    """Return the IR as a Graphviz digraph; nodes show op and shape, and tier when assigned."""
    lines = ["digraph partc {", "  node [shape=box, fontname=monospace, fontsize=10];"]
    for n in gm.graph.nodes:
        shape = n.meta.get(META_SHAPE)
        label = "\\n".join(
            [n.name, n.meta.get("partc.op", n.op)]
            + ([str(list(shape))] if shape else [])
            + ([n.meta[META_TIER]] if META_TIER in n.meta else [])
        )
        lines.append(f"  {json.dumps(n.name)} [label={json.dumps(label)}];")
        lines += [f"  {json.dumps(a.name)} -> {json.dumps(n.name)};" for a in n.all_input_nodes]
    lines.append("}")
    return "\n".join(lines) + "\n"


def dump_ir(gm: fx.GraphModule, stem: Path) -> None:
    """Write the IR to ``stem.json`` and ``stem.dot``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(ir_to_json(gm), indent=1, sort_keys=True) + "\n")
    stem.with_suffix(".dot").write_text(ir_to_dot(gm))
    log.info("IR written to %s.{json,dot}", stem)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
