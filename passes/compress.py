"""``compress-cut-tensors``: choose the cut and each link's feature-map codec together.

Each link of the cluster lists the codecs it allows (``links[i].codecs``, default
``[none]``). For every combination of one allowed codec per link the pass solves the cut
exactly (``partc.partition.solve``) on two kinds of prices:

1. each link at its *effective bandwidth* (``partc.codec.LinkCodec.effective_bandwidth``), with
   the codec's ratio aggregated, bytes-weighted, over every tensor the model makes (the
   candidate cut tensors);
2. per compressed link, every tensor at its own measured ratio on that link (the other links
   keep their aggregate price): exact per tensor for a one-link cluster. Skipped under
   ``constraints.max_link_bytes``, whose caps count raw bytes.

Each plan found, and the cut already on the IR, is then re-priced with the ratios measured on
the tensors it actually sends over each link. The joint choice is thus exact for
the per-codec aggregate ratio, then re-priced on the real cut tensors: not a proof of
optimality over every (cut, codec) pair when the ratios differ from tensor to tensor and
there are two links or more.

Plans are taken fastest first (``ctx.objective``); a lossless one is taken as is, a lossy
one only if its top-1 agreement with the uncompressed model on the calibration inputs
(``partc.compression.top1_agreement``) meets ``compression.budget``; the faster ones that
miss it are refused and named in the summary with their agreement. When no lossy plan
passes, the best lossless plan is used. Byte caps keep counting raw bytes. Ratios are measured
on the calibration inputs (without ``compression.calibration``, for lossless codecs only, on
the seeded example inputs). Speeds are not measured: a link encodes at the cost model's speed
for its sending tier's target and decodes at the one for its receiving tier's target
(``partc.costmodel.codec_rates``, from the shipped calibration), so the same inputs give the
same plan and entries on any compiling host. When every link allows only ``none`` the pass
writes the default entries and runs nothing: compile time does not grow.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx

from partc.codec import NO_CODEC, LinkCodec
from partc.compression import (
    Measurements,
    calibration_inputs,
    cut_codecs,
    measure_codecs,
    run_pipeline,
    top1_agreement,
)
from partc.context import CompileContext
from partc.costmodel import codec_rates, load_calibration
from partc.errors import ClusterError, PartcError
from partc.ir import META_CODEC_MEASUREMENTS, META_LINK_CODECS, META_TIER, clone, link_name
from partc.partition.cost import Cost, CostGraph, evaluate
from partc.partition.model import cost_graph, priced
from partc.partition.solve import solve
from partc.pipeline import PassResult
from partc.targets import target


@dataclass(frozen=True)
class _Candidate:
    tiers: np.ndarray
    entries: tuple[LinkCodec, ...]
    cost: Cost

    @property
    def lossy(self) -> bool:
        return not all(e.lossless for e in self.entries)

    @property
    def codecs(self) -> tuple[str, ...]:
        return tuple(e.codec for e in self.entries)


def compress_cut_tensors(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Choose the cut and one codec per link together, minimising ``ctx.objective``.

    Reads meta[META_TIER] (run select-cuts first), meta[META_BYTES] and what ``cost_graph``
    reads, and the shipped calibration (``partc.costmodel.load_calibration``) for the codecs'
    speeds; writes gm.meta[META_CODEC_MEASUREMENTS] (what it measured, when it measured) and
    gm.meta[META_LINK_CODECS] (link ``"src->dst"`` -> entry, see
    ``partc.compression.Measurements.entry``) for every link between consecutive tiers and,
    when the chosen cut differs, meta[META_TIER] on every node (the output node on the last
    tier that computes one of its inputs, as select-cuts does). When every link allows only
    ``none``, only the default entries are written and the model is not run.

    Raises:
        ClusterError: if the calibration inputs do not fit the model, or no plan meets
            ``compression.budget`` and some link allows no lossless codec (the cluster
            parser, ``partc.context``, refuses a lossy codec without a budget).
        PartcError: if a node has no tier or profile, or the calibration has no speed for a codec.
    """
    gm = clone(gm)
    names = ctx.tier_names
    links = [ctx.link(a, b) for a, b in zip(names, names[1:], strict=False)]
    allowed = [link.codecs if link else ("none",) for link in links]
    link_names = [link_name(a, b) for a, b in zip(names, names[1:], strict=False)]
    if all(codecs == ("none",) for codecs in allowed):
        gm.meta[META_LINK_CODECS] = dict.fromkeys(link_names, NO_CODEC)
        return PassResult(gm, "every link allows only codec none: tensors cross raw" if links else "one tier, no links")
    missing = [n.name for n in gm.graph.nodes if META_TIER not in n.meta]
    if missing:
        raise PartcError(f"node {missing[0]!r} has no tier; run select-cuts before compress-cut-tensors")
    graph = cost_graph(gm, ctx)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    current = np.array([names.index(n.meta[META_TIER]) for n in nodes], dtype=np.int64)
    inputs = calibration_inputs(gm, ctx.compression, ctx.source)
    measured = measure_codecs(gm, inputs, sorted({c for codecs in allowed for c in codecs} - {"none"}))
    try:
        candidates = _candidates(graph, measured, _rated(ctx, allowed), current, ctx.objective)
    except ClusterError as err:
        raise ClusterError(f"{ctx.source}: {err}") from err
    budget = ctx.compression.budget if ctx.compression else None
    reference, chosen, agreement, refused = None, None, None, []
    for candidate in candidates:
        if not candidate.lossy:
            chosen = candidate
            break
        if reference is None:
            with torch.no_grad():
                reference = [gm(*call) for call in inputs]
        outputs = run_pipeline(gm, _tier_map(gm, candidate.tiers), candidate.codecs, inputs)
        agreement = top1_agreement(reference, outputs)
        if agreement >= budget:
            chosen = candidate
            break
        refused.append(f"{_described(candidate, link_names)}: agreement {agreement:.4f} < {budget}")
        agreement = None
    if chosen is None:
        raise ClusterError(
            f"{ctx.source}: compression.budget: no plan keeps top-1 agreement >= {budget} "
            f"({'; '.join(refused)}); allow a lossless codec such as none on every link"
        )
    samples = sum(len(call[0]) for call in inputs) if agreement is not None else measured.samples
    gm.meta[META_CODEC_MEASUREMENTS] = measured
    gm.meta[META_LINK_CODECS] = {
        name: replace(entry, agreement=agreement, samples=samples)
        for name, entry in zip(link_names, chosen.entries, strict=True)
    }
    moved = not np.array_equal(chosen.tiers, current)
    if moved:
        by_name = {n.name: n for n in gm.graph.nodes}
        for name, tier in _tier_map(gm, chosen.tiers).items():
            by_name[name].meta[META_TIER] = names[tier]
    raw = evaluate(graph, current).value(ctx.objective)
    summary = (
        f"{ctx.objective} {chosen.cost.value(ctx.objective) * 1e3:.2f} ms with {_described(chosen, link_names)} "
        f"(select-cuts' plan uncompressed: {raw * 1e3:.2f} ms); cut {'moved' if moved else 'kept'}"
        + (f"; top-1 agreement {agreement:.4f} on {samples} samples" if agreement is not None else "")
        + (f"; refused: {'; '.join(refused)}" if refused else "")
    )
    return PassResult(gm, summary)


def _rated(ctx: CompileContext, allowed: list[tuple[str, ...]]) -> list[tuple[LinkCodec, ...]]:
    """Each link's allowed codecs at their speeds on it (ratio 1.0 until measured): encoding on the
    sending tier's target, decoding on the receiving tier's (``partc.costmodel.codec_rates``)."""
    calibration = load_calibration()
    names = ctx.tier_names
    rated = []
    for (a, b), codecs in zip(zip(names, names[1:], strict=False), allowed, strict=True):
        sender, receiver = target(ctx.tier(a).target), target(ctx.tier(b).target)
        rated.append(tuple(LinkCodec(c, 1.0, *codec_rates(calibration, c, sender, receiver)) for c in codecs))
    return rated


def _candidates(
    graph: CostGraph, measured: Measurements, allowed: list[tuple[LinkCodec, ...]], current: np.ndarray, objective: str
) -> list[_Candidate]:
    """Every plan worth checking, fastest first: per codec combination (``allowed``: each link's codecs at
    their speeds on it), its solved cuts and the current one."""
    found: dict[tuple, _Candidate] = {}
    for combo in itertools.product(*allowed):
        overall = [measured.entry(link) for link in combo]
        plans = [current, solve(priced(graph, dict(zip(graph.links, overall, strict=True))), objective).tiers]
        if np.isinf(graph.max_link_bytes).all():  # per-tensor pricing rescales bytes: only without byte caps
            plans += [solve(g, objective).tiers for g in _per_tensor_graphs(graph, measured, combo)]
        for tiers in plans:
            tiers = np.asarray(tiers, dtype=np.int64)
            entries = cut_codecs(measured, graph, combo, tiers)
            key = (tiers.tobytes(), tuple(e.codec for e in entries))
            if key not in found:
                paying = priced(graph, dict(zip(graph.links, entries, strict=True)))
                found[key] = _Candidate(tiers, entries, evaluate(paying, tiers))
    return sorted(found.values(), key=lambda c: (c.cost.value(objective), c.lossy))


def _per_tensor_graphs(graph: CostGraph, measured: Measurements, combo: tuple[LinkCodec, ...]) -> list[CostGraph]:
    """Per compressed link b, a cost graph pricing every tensor on b with its own ratio, at ``combo[b]``'s speeds.

    A node's "bytes" become its nanoseconds on link b (wire bytes / bandwidth + encode +
    decode) and link b's bandwidth 1e9; every other link keeps its total seconds over all
    tensors (its bandwidth scaled in proportion). Exact per tensor for a one-link cluster.
    """
    seconds = np.zeros((len(graph.nbytes), len(combo)))
    for b, link in enumerate(combo):
        seconds[:, b] = graph.nbytes / graph.bandwidth[b]
        if link.codec != "none":
            raw = np.where(measured.raw > 0, measured.raw, 1.0)
            per_byte = measured.wire[link.codec] / graph.bandwidth[b] + measured.raw * link.coding_seconds_per_byte
            seconds[:, b] = np.where(measured.raw > 0, graph.nbytes * per_byte / raw, seconds[:, b])
    totals = seconds.sum(axis=0)
    graphs = []
    for b, link in enumerate(combo):
        if link.codec == "none" or totals[b] == 0:
            continue
        nbytes = np.where(graph.nbytes > 0, np.maximum(np.rint(seconds[:, b] * 1e9), 1), 0).astype(np.int64)
        bandwidth = np.where(totals > 0, 1e9 * totals[b] / np.where(totals > 0, totals, 1), graph.bandwidth)
        graphs.append(replace(graph, nbytes=nbytes, bandwidth=bandwidth))
    return graphs


def _tier_map(gm: fx.GraphModule, tiers: np.ndarray) -> dict[str, int]:
    """Node name -> tier index, the output node on the last tier of its inputs."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    out = {n.name: int(t) for n, t in zip(nodes, tiers.tolist(), strict=True)}
    for node in gm.graph.nodes:
        if node.op == "output":
            out[node.name] = max((out[a.name] for a in node.all_input_nodes), default=0)
    return out


def _described(candidate: _Candidate, link_names: list[str]) -> str:
    return ", ".join(
        f"{name} {e.codec}" + (f" ({e.ratio:.1f}x)" if e.codec != "none" else "")
        for name, e in zip(link_names, candidate.entries, strict=True)
    )
