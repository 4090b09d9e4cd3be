"""The pass manager: passes as values, a pipeline as a value, run in order with checks.

A ``Pass`` carries its name and the passes it needs; ``run_passes`` refuses an order that
runs a pass before one it needs, lints the IR after every pass and dumps it on request. A
``Pipeline`` is the whole road from a traced model to a build's plans: the passes run on the
whole model (they choose the primary plan), then the passes run on each plan of the build
once its tiers are assigned. ``partc plan`` and ``partc compile`` run the same value
(``partc.passes.DEFAULT_PIPELINE``, through ``partc.compilation.compile_plans``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from partc.context import CompileContext
from partc.draw import ir_to_dot
from partc.errors import PartcError
from partc.ir import lint

log = logging.getLogger(__name__)

TRACE = "trace"  # the name --dump-after uses for the IR as traced, before any pass


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new IR and a one-line summary for progress output."""

    gm: fx.GraphModule
    summary: str = ""


@dataclass(frozen=True)
class Pass:
    """A pass: a pure function from IR to IR, with its name and the passes it needs.

    Attributes:
        name: kebab-case, as on the command line and in dumps (``select-cuts``).
        run: ``(gm, ctx) -> PassResult``; never mutates ``gm``.
        requires: passes that must have run before it (when they run in the same sequence,
            ``run_passes`` refuses an order that puts them after it).
    """

    name: str
    run: Callable[[fx.GraphModule, CompileContext], PassResult]
    requires: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Pipeline:
    """The passes of a compile, as a value to print, compare and reuse.

    Attributes:
        model: run on the whole model, in order: they choose the primary plan.
        plan: run on each plan of the build, in order, once its tiers are assigned.
    """

    model: tuple[Pass, ...]
    plan: tuple[Pass, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every pass name, in the order they run."""
        return tuple(p.name for p in (*self.model, *self.plan))

    def __str__(self) -> str:
        return ", ".join(p.name for p in self.model) + (
            f"; on each plan: {', '.join(p.name for p in self.plan)}" if self.plan else "")

    def check_dumps(self, dump_after: Iterable[str]) -> None:
        """Raise if ``--dump-after`` names a pass this pipeline does not run.

        Raises:
            PartcError: naming the pass.
        """
        unknown = sorted(set(dump_after) - {TRACE, *self.names})
        if unknown:
            raise PartcError(f"--dump-after {unknown[0]!r}: that pass is not in this pipeline "
                             f"({', '.join([TRACE, *self.names])})")


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    ctx: CompileContext,
    *,
    dump_after: Iterable[str] = (),
    dump_dir: Path = Path("partc-dump"),
    first: int = 1,
    suffix: str = "",
    progress: Callable[[str], None] = lambda _: None,
    timings: dict[str, float] | None = None,
) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm``.

    The IR is linted after every pass. For every name in ``dump_after`` (a pass name, or
    ``"trace"`` for the IR before the first pass when ``first`` is 1) the IR is written to
    ``dump_dir`` as ``NN-NAME{suffix}.json`` and ``.dot``, NN the pass's place in the whole
    pipeline (``first`` for the first of ``passes``). ``progress`` is called with each
    pass's name as it starts; ``timings`` (pass name -> seconds), when given, adds up the
    seconds each pass takes.

    Raises:
        PartcError: if a pass runs before one it requires, or a pass fails on bad input;
            the message names the pass, and the pass's own error is chained.
    """
    dump_after = set(dump_after)
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        late = [r for r in p.requires if r in names[i + 1:]]
        if late:
            raise PartcError(f"pass {p.name!r} needs {late[0]!r}, which this pipeline runs after it")
    if TRACE in dump_after and first == 1:
        dump_ir(gm, dump_dir / f"00-{TRACE}{suffix}", ctx.tier_names)
    for index, p in enumerate(passes, start=first):
        progress(f"pass {p.name}" + (f" ({suffix.lstrip('-')})" if suffix else ""))
        started = time.perf_counter()
        try:
            result = p.run(gm, ctx)
        except PartcError as err:
            raise type(err)(f"pass {p.name!r} failed: {err}") from err
        if timings is not None:
            timings[p.name] = timings.get(p.name, 0.0) + time.perf_counter() - started
        gm = result.gm
        lint(gm, ctx.tier_names)
        log.info("%s: %s", p.name, result.summary or "done")
        if p.name in dump_after:
            dump_ir(gm, dump_dir / f"{index:02d}-{p.name}{suffix}", ctx.tier_names)
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


def dump_ir(gm: fx.GraphModule, stem: Path, tiers: Sequence[str] = ()) -> None:
    """Write the IR to ``stem.json`` and ``stem.dot`` (``partc.draw.ir_to_dot``; ``tiers`` in data-flow order)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(ir_to_json(gm), indent=1, sort_keys=True) + "\n")
    stem.with_suffix(".dot").write_text(ir_to_dot(gm, tiers, title=stem.name))
    log.info("IR written to %s.{json,dot}", stem)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
