"""partc's passes: pure functions from IR to IR, registered by their kebab-case names.

Each pass has the signature ``(gm: GraphModule, ctx: CompileContext) -> PassResult``,
never mutates its input (it ``clone``s it), and records its results in node metadata.
A pass that does not apply (a tier with one node, links that allow only ``none``) returns
its input unchanged, so the pipeline never needs a condition around it.
"""

from collections.abc import Iterable

from partc.errors import PartcError
from partc.passes.branch import distribute_branches
from partc.passes.compress import compress_cut_tensors
from partc.passes.cut import select_cuts
from partc.passes.profile import annotate_profile
from partc.passes.tile import tile_conv_stages
from partc.pipeline import TRACE, Pass, Pipeline

PASSES: dict[str, Pass] = {
    "annotate-profile": Pass("annotate-profile", annotate_profile),
    "select-cuts": Pass("select-cuts", select_cuts, requires=("annotate-profile",)),
    "compress-cut-tensors": Pass("compress-cut-tensors", compress_cut_tensors, requires=("select-cuts",)),
    "distribute-branches": Pass("distribute-branches", distribute_branches, requires=("select-cuts",)),
    "tile-conv-stages": Pass("tile-conv-stages", tile_conv_stages, requires=("select-cuts",)),
}

# What ``partc plan`` and ``partc compile`` run: the first three choose the cut and codecs on the
# whole model; the build's plans are chosen on that cost graph, and each plan's tiers with several
# nodes then run fork/join branches and spatial tiles in parallel (``partc.compilation``).
DEFAULT_PIPELINE = Pipeline(
    model=(PASSES["annotate-profile"], PASSES["select-cuts"], PASSES["compress-cut-tensors"]),
    plan=(PASSES["distribute-branches"], PASSES["tile-conv-stages"]),
)


def passes_named(names: Iterable[str]) -> tuple[Pass, ...]:
    """Return the passes called ``names``, in order.

    Raises:
        PartcError: for an unknown name; the message lists the passes.
    """
    names = list(names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise PartcError(f"unknown pass {unknown[0]!r}; passes are: {', '.join([TRACE, *PASSES])}")
    return tuple(PASSES[n] for n in names)
