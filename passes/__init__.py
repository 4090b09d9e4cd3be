"""partc's passes: pure functions from IR to IR, registered by their kebab-case names.

Each pass has the signature ``(gm: GraphModule, ctx: CompileContext) -> PassResult``,
never mutates its input (it ``clone``s it), and records its results in node metadata.
"""

from partc.passes.compress import compress_cut_tensors
from partc.passes.cut import select_cuts
from partc.passes.profile import annotate_profile
from partc.passes.tile import tile_conv_stages
from partc.pipeline import Pass

PASSES: dict[str, Pass] = {
    "annotate-profile": annotate_profile,
    "select-cuts": select_cuts,
    "tile-conv-stages": tile_conv_stages,
    "compress-cut-tensors": compress_cut_tensors,
}

# Run on the whole model, in this order, by ``partc compile``: they choose the primary plan.
DEFAULT_PIPELINE: tuple[str, ...] = ("annotate-profile", "select-cuts", "compress-cut-tensors")

# Run by ``partc compile`` on each plan of a build once its tiers are assigned (the plan family
# and the fallbacks are chosen on the untiled model; each plan is then tiled on its own).
PLAN_PASSES: tuple[str, ...] = ("tile-conv-stages",)
