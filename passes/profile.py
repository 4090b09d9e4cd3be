"""``annotate-profile``: predicted seconds of every node on every tier."""

from __future__ import annotations

from torch import fx

from partc.context import CompileContext
from partc.costmodel import load_calibration, predict_graph
from partc.ir import META_PROFILE, clone
from partc.pipeline import PassResult
from partc.profile import check_matches, read_profile
from partc.targets import target


def annotate_profile(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Write each node's predicted seconds on every tier of ``ctx``.

    For a tier whose target has a measured profile in ``ctx.profiles``, the profile's
    per-node medians are used (nodes matched by name); otherwise the cost model
    (``partc.costmodel``, the calibration shipped with partc) predicts from the node's
    FLOPs and bytes and the target's description. Placeholders and outputs cost 0.0.

    Reads ``META_KIND``, ``META_FLOPS``, ``META_BYTES``, ``META_PARAM_BYTES``, ``META_OP``
    and ``META_SHAPE``; writes ``META_PROFILE`` = {tier name: seconds} on every node.

    Raises:
        ClusterError: if a tier's target is unknown.
        PartcError: if a profile file is unreadable or was measured on another model or
            input shape (the message names the file and the first mismatched node).
    """
    out = clone(gm)
    calibration = None
    per_target: dict[str, dict[str, float]] = {}
    how: dict[str, str] = {}
    sources = []
    for tier in ctx.tiers:
        if tier.target not in per_target:
            desc = target(tier.target)
            if tier.target in ctx.profiles:
                path = ctx.profiles[tier.target]
                profile = read_profile(path)
                check_matches(profile, out, path)
                per_target[tier.target] = profile.median_of()
                how[tier.target] = f"measured {path.name}"
            else:
                calibration = calibration or load_calibration()
                per_target[tier.target] = predict_graph(calibration, out, desc)
                how[tier.target] = "cost model"
        total = sum(per_target[tier.target].values())
        sources.append(f"{tier.name} ({tier.target}, {how[tier.target]}) {total * 1e3:.1f} ms")
    for node in out.graph.nodes:
        compute = node.op not in ("placeholder", "output")
        node.meta[META_PROFILE] = {
            tier.name: per_target[tier.target][node.name] if compute else 0.0 for tier in ctx.tiers
        }
    return PassResult(out, "; ".join(sources) if sources else "no tiers")

