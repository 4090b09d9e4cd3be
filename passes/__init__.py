"""partc's passes: pure functions from IR to IR, registered by their kebab-case names.

Each pass has the signature ``(gm: GraphModule, ctx: CompileContext) -> PassResult``,
never mutates its input (it ``clone``s it), and records its results in node metadata.
"""

from partc.pipeline import Pass

PASSES: dict[str, Pass] = {}

DEFAULT_PIPELINE: tuple[str, ...] = ()
