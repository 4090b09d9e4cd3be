"""partc's passes: pure functions from IR to IR, registered by their kebab-case names.

Each pass has the signature ``(gm: GraphModule, ctx: CompileContext) -> PassResult``,
never mutates its input (it ``clone``s it), and records its results in node metadata.
"""

from partc.passes.cut import select_cuts
from partc.passes.profile import annotate_profile
from partc.passes.tile import tile_conv_stages
from partc.pipeline import Pass

PASSES: dict[str, Pass] = {
    "annotate-profile": annotate_profile,
    "select-cuts": select_cuts,
    "tile-conv-stages": tile_conv_stages,
}

# tile-conv-stages is not in the default pipeline yet: its tiles stay inside one stage until
# the manifest gives each tile its own stage and the runtime scatters them to the edge nodes.
DEFAULT_PIPELINE: tuple[str, ...] = ("annotate-profile", "select-cuts")
