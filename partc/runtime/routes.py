"""What each worker of a chain does with a request, fixed before it starts.

A plan's chain is a sequence of ``StageSpec``: each stage reads some tensors and writes
others. ``plan_routes`` turns a chain into one ``Route`` per stage: what its function
reads and writes, what it forwards to the next stage (what a later stage reads), and which
model outputs it replies with. A stage with no inputs and no outputs only passes tensors on
(the tier's machine relays them to the next tier). A worker serves one route per plan
(``partc.runtime.worker``); a request names its plan and cannot make a worker send anything
anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from partc.codec import parse_codec
from partc.errors import PartcError


@dataclass(frozen=True)
class StageSpec:
    """A stage as the runtime sees it: where it runs and the tensors it reads and writes.

    Attributes:
        name: stage name, ``<tier>.<index>``.
        address: host:port of its worker ("" for the in-process transport).
        inputs: names of the tensors its function reads.
        outputs: names of the tensors its function writes.
    """

    name: str
    address: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """What one worker does with a request.

    Attributes:
        stage: stage name.
        inputs: tensors its function reads.
        outputs: tensors its function writes.
        forward: tensors it sends to the next stage (read by a later stage).
        results: model outputs its function writes; replied with the next stage's reply.
        next_stage: name of the next stage, None for the last.
        next_address: host:port of the next stage's worker, None for the last.
        codecs: codec name (``partc.codec``) per forwarded tensor; others go raw.
        receive_codecs: the codecs (canonical names) tensors may arrive with: the hop's
            into this stage; a tensor with any other is refused.
    """

    stage: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    forward: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    next_stage: str | None = None
    next_address: str | None = None
    codecs: Mapping[str, str] = field(default_factory=dict)
    receive_codecs: tuple[str, ...] = ("none",)

    @property
    def receives(self) -> tuple[str, ...]:
        """Tensors a request to this stage must hold: what it reads or only passes on."""
        passed_on = [n for n in self.forward + self.results if n not in self.outputs]
        return tuple(dict.fromkeys(self.inputs + tuple(passed_on)))


def plan_routes(
    stages: Sequence[StageSpec],
    model_inputs: Sequence[str],
    model_outputs: Sequence[str],
    codecs: Sequence[str] | None = None,
) -> tuple[Route, ...]:
    """Return the route of each stage of a chain, in order.

    ``codecs`` gives the codec of each hop, from stage i to stage i + 1 (default ``none``):
    every tensor crossing that hop is sent with it, and stage i + 1 accepts no other. A
    stage with no inputs and no outputs only passes tensors on.

    Raises:
        PartcError: if there is no stage, a stage reads a tensor that neither the model
            inputs nor an earlier stage provide, no stage writes a model output, or a codec
            name is unknown.
    """
    if not stages:
        raise PartcError("a pipeline needs at least one stage")
    codecs = list(codecs or ["none"] * (len(stages) - 1))
    if len(codecs) != len(stages) - 1:
        raise PartcError(f"{len(stages)} stages have {len(stages) - 1} hops, but {len(codecs)} codecs were given")
    codecs = [parse_codec(name).name for name in codecs]
    available = set(model_inputs)
    problems = []
    for s in stages:
        problems += [
            f"stage {s.name!r} reads {n!r}, which no earlier stage writes" for n in s.inputs if n not in available
        ]
        available.update(s.outputs)
    problems += [f"no stage writes the model output {n!r}" for n in model_outputs if n not in available]
    if problems:
        raise PartcError("; ".join(problems))
    routes = []
    available = set(model_inputs)
    for i, s in enumerate(stages):
        available.update(s.outputs)
        later = {n for t in stages[i + 1 :] for n in t.inputs}
        nxt = stages[i + 1] if i + 1 < len(stages) else None
        routes.append(
            Route(
                stage=s.name,
                inputs=s.inputs,
                outputs=s.outputs,
                forward=tuple(sorted(later & available)),
                results=tuple(n for n in model_outputs if n in s.outputs),
                next_stage=nxt.name if nxt else None,
                next_address=nxt.address if nxt else None,
                codecs={n: codecs[i] for n in sorted(later & available) if codecs[i] != "none"} if nxt else {},
                receive_codecs=(codecs[i - 1],) if i else ("none",),
            )
        )
    return tuple(routes)
