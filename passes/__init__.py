"""partc's passes: pure functions from IR to IR, registered by their kebab-case names.

Each pass has the signature ``(gm: GraphModule, ctx: CompileContext) -> PassResult``,
never mutates its input (it ``clone``s it), and records its results in node metadata.
"""

from partc.passes.cut import select_cuts
from partc.pipeline import Pass

PASSES: dict[str, Pass] = {"select-cuts": select_cuts}

DEFAULT_PIPELINE: tuple[str, ...] = ("select-cuts",)
