"""Feature-map compression at cut points: measure codec ratios on real tensors, price links, check top-1.

The codecs themselves live in ``partc.codec`` (one implementation each); this module
runs the model on calibration inputs and measures how much they shrink its tensors:

- ``calibration_inputs``: the cluster's ``compression.calibration`` batch (or the seeded
  example inputs), split into model calls of the traced batch size;
- ``measure_codecs``: every node's output tensor (nodes with ``META_BYTES`` > 0) encoded with
  every codec: raw and wire bytes, summed over at most ``MEASURE_SAMPLES`` calibration inputs;
  ``Measurements.entry`` aggregates them (bytes-weighted) over a set of nodes into one
  ``META_LINK_CODECS`` entry. Nothing is timed: a link's encode and decode speeds are the cost
  model's for its sending and receiving targets (``partc.costmodel.codec_rates``), so the same
  inputs give the same entries;
- ``run_pipeline`` runs the model as the partitioned pipeline does, each tensor crossing a
  link decoded from that link's codec, hop by hop (a tensor going two tiers down is decoded
  and encoded again in between, as the runtime's workers do); ``top1_agreement`` compares
  its outputs with the uncompressed ones.

Agreement is top-1 only: the fraction of output rows (every position of the output but its
last axis, i.e. per sample for a classifier) whose argmax over the last axis is unchanged.
For a model that is not a classifier this is still the figure checked; a bound on the
absolute error is ``Codec.max_error``'s business, not this module's.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from partc.codec import Codec, LinkCodec, decode, encode, parse_codec
from partc.context import Compression
from partc.errors import ClusterError, PartcError
from partc.ir import META_BYTES
from partc.partition.cost import CostGraph

MEASURE_SAMPLES = 8  # most calibration inputs that ratios are measured on


@dataclass(frozen=True)
class Measurements:
    """Codecs measured on the output of every node, summed over the calibration inputs.

    Attributes:
        names: node names in graph order, every node but the output (cost-graph order).
        samples: how many calibration inputs (samples, first-axis rows) were measured.
        raw: (n,) raw bytes of each node's output tensors (0: no tensor, nothing to send).
        wire: codec name -> (n,) encoded bytes.
    """

    names: tuple[str, ...]
    samples: int
    raw: np.ndarray
    wire: dict[str, np.ndarray]

    def entry(self, link: LinkCodec, mask: np.ndarray | None = None) -> LinkCodec:
        """Return ``link`` (a codec at its speeds) with its ratio measured over the nodes in ``mask`` (all: None).

        ``ratio`` is raw bytes / wire bytes, summed over the nodes (bytes-weighted); codec
        ``none`` has ratio 1.0 and speeds None (free), and so has any codec when the nodes hold
        no bytes. ``agreement`` is None (set it once checked).
        """
        mask = np.ones(len(self.raw), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        raw = float(self.raw[mask].sum())
        if link.codec == "none" or raw == 0:
            return LinkCodec(samples=self.samples)
        return LinkCodec(
            codec=link.codec,
            ratio=raw / float(self.wire[link.codec][mask].sum()),
            encode_bytes_per_s=link.encode_bytes_per_s,
            decode_bytes_per_s=link.decode_bytes_per_s,
            samples=self.samples,
        )


def cut_codecs(
    measured: Measurements, graph: CostGraph, links: Sequence[LinkCodec], tiers: np.ndarray
) -> tuple[LinkCodec, ...]:
    """Each link's codec (``links[b]``'s on link b, at its speeds) with its ratio measured on the tensors
    ``tiers`` sends over it (``none`` where it sends none); ``measured`` holds the nodes of ``graph``."""
    reach = graph.last_consumer(tiers)
    return tuple(measured.entry(link, (tiers <= b) & (reach > b)) for b, link in enumerate(links))


def calibration_inputs(
    gm: fx.GraphModule, compression: Compression | None, source: str = "<cluster>"
) -> list[tuple[torch.Tensor, ...]]:
    """Return the calibration inputs as model calls: one tuple of input tensors per call.

    The batch from ``compression.calibration`` (a ``.npy`` file or ``MODULE:FUNCTION``; one
    array, or a list with one array per model input; first axis = samples) is split into
    calls of the traced batch size. Without a calibration, the seeded example inputs
    (``gm.meta["partc.inputs"]``) make the one call.

    Raises:
        ClusterError: if the batch cannot be loaded or does not fit the model's inputs; the
            message names ``source`` and ``compression.calibration``.
    """
    specs = gm.meta["partc.inputs"]
    if compression is None or compression.calibration is None:
        return [tuple(spec.example() for spec in specs)]
    where = f"{source}: compression.calibration"
    batch = _load_batch(compression.calibration, where)
    arrays = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if len(arrays) != len(specs):
        raise ClusterError(f"{where}: {len(arrays)} array(s) for a model with {len(specs)} input(s)")
    count = len(arrays[0]) if isinstance(arrays[0], np.ndarray) and arrays[0].ndim else -1
    step = specs[0].shape[0]
    for i, (array, spec) in enumerate(zip(arrays, specs, strict=True)):
        shape = getattr(array, "shape", type(array).__name__)
        if not isinstance(array, np.ndarray) or array.ndim == 0 or shape != (count, *spec.shape[1:]):
            raise ClusterError(
                f"{where}: input {i} has shape {shape}; expected (SAMPLES, {', '.join(map(str, spec.shape[1:]))}) "
                f"with the same SAMPLES for every input"
            )
    if count == 0 or count % step:
        raise ClusterError(f"{where}: {count} samples is not a positive multiple of the traced batch size {step}")
    dtypes = [getattr(torch, spec.dtype) for spec in specs]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(d) for a, d in zip(arrays, dtypes, strict=True)]
    return [tuple(t[start : start + step] for t in tensors) for start in range(0, count, step)]


def _load_batch(calibration: str, where: str):
    if calibration.endswith(".npy"):
        try:
            return np.load(calibration, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ClusterError(f"{where}: cannot read {calibration}: {err}") from None
    module, _, function = calibration.partition(":")
    try:
        loader = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ClusterError(f"{where}: cannot import {calibration}: {err}") from None
    try:
        batch = loader()
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ClusterError(f"{where}: {calibration}() raised {type(err).__name__}: {first}") from err
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().numpy()
    if isinstance(batch, (list, tuple)):
        return [b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b for b in batch]
    return batch


def measure_codecs(
    gm: fx.GraphModule,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    codecs: Sequence[str],
    only: Collection[str] | None = None,
) -> Measurements:
    """Encode every node's output with every codec on the first calls of ``inputs``; nothing is timed.

    Calls are measured until ``MEASURE_SAMPLES`` samples are covered. Only nodes with
    ``META_BYTES`` > 0 whose value is a tensor (or a tuple or list of tensors) are measured,
    and of those only the ones named in ``only`` unless it is None. Reads meta[META_BYTES].

    Raises:
        PartcError: for an unknown codec name.
    """
    parsed = [parse_codec(name) for name in codecs]
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    raw = np.zeros(len(nodes))
    wire = {c.name: np.zeros(len(nodes)) for c in parsed}

    def visit(node: fx.Node, value) -> None:
        if node not in index or node.meta.get(META_BYTES, 0) <= 0 or (only is not None and node.name not in only):
            return
        i = index[node]
        for array in _arrays(value):
            raw[i] += array.nbytes
            for codec in parsed:
                wire[codec.name][i] += len(encode(array, codec))

    samples = 0
    for call in inputs:
        if samples >= MEASURE_SAMPLES:
            break
        with torch.no_grad():
            _Capture(gm, visit).run(*call)
        samples += len(call[0]) if call and call[0].dim() else 1
    return Measurements(tuple(n.name for n in nodes), samples, raw, wire)


def run_pipeline(
    gm: fx.GraphModule,
    tiers: Mapping[str, int],
    codecs: Sequence[str],
    inputs: Sequence[tuple[torch.Tensor, ...]],
) -> list:
    """Run ``gm`` as its partitioned pipeline would, once per call in ``inputs``; return the outputs.

    ``tiers`` maps every node name (the output included) to its tier index; ``codecs[b]``
    names the codec of link b, from tier b to tier b + 1 (as in ``partc.partition.cost``). A
    tensor made on tier i and read on tier k > i reaches its reader after an encode and a
    decode on each link i .. k-1. With every codec ``none`` (or lossless) the outputs are
    exactly the model's.

    Raises:
        PartcError: for an unknown codec name.
    """
    per_link = [parse_codec(name) for name in codecs]
    outputs = []
    with torch.no_grad():
        for call in inputs:
            outputs.append(_Pipeline(gm, tiers, per_link).run(*call))
    return outputs


def top1_agreement(reference: Sequence, outputs: Sequence) -> float:
    """Return the fraction of output rows whose argmax over the last axis matches ``reference``.

    Both are lists of model outputs (one tensor per call, as ``run_pipeline`` returns).

    Raises:
        PartcError: if an output is not one tensor.
    """
    same = total = 0
    for ref, out in zip(reference, outputs, strict=True):
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise PartcError("top-1 agreement needs a model whose output is one tensor (e.g. class scores)")
        hits = ref.argmax(dim=-1) == out.argmax(dim=-1)
        same += int(hits.sum())
        total += hits.numel()
    return same / total if total else 1.0


def _arrays(value) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [v.detach().cpu().numpy() for v in value]
    return []


def _roundtrip(value, codec: Codec):
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        return torch.from_numpy(decode(encode(array, codec), codec, array.shape, array.dtype).copy())
    if isinstance(value, (tuple, list)):
        return type(value)(_roundtrip(v, codec) for v in value)
    return value


class _Capture(fx.Interpreter):
    """Runs the graph and hands every node's value to ``visit``."""

    def __init__(self, gm: fx.GraphModule, visit):
        super().__init__(gm)
        self.visit = visit

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.visit(n, value)
        return value


class _Pipeline(fx.Interpreter):
    """Runs the graph with each value read on a later tier than its producer's going through the links' codecs."""

    def __init__(self, gm: fx.GraphModule, rank: Mapping[str, int], per_link: Sequence[Codec]):
        super().__init__(gm)
        self.rank = rank
        self.per_link = per_link
        self.copies: dict[tuple[fx.Node, int], object] = {}

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        tier = self.rank[n.name]
        args = fx.node.map_arg(n.args, lambda a: self._on(a, tier))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self._on(a, tier))
        return args, kwargs

    def _on(self, node: fx.Node, tier: int):
        value = self.env[node]
        for link in range(self.rank[node.name], tier):
            codec = self.per_link[link]
            if codec.name != "none":
                if (node, link) not in self.copies:
                    self.copies[node, link] = _roundtrip(value, codec)
                value = self.copies[node, link]
        return value
