"""Every price partc puts on a plan, written once.

The planner, the tile pass, ``partc plan``, the manifest and the runtime's plan selector
all price with these functions (no torch here: the runtime imports them):

- a link moves ``nbytes`` raw tensor bytes in ``nbytes / effective`` seconds, ``effective``
  being the raw bytes per second the link moves with its codec
  (``partc.codec.LinkCodec.effective_bandwidth``: compressed size, encoding and decoding
  included); its one-way latency is paid once per inference when the plan reaches past it;
- a node costs its ``META_PROFILE`` seconds on its tier (``partc.partition.model``), a
  stage the sum over its compute nodes;
- a tiled step (``tiled_step_seconds``) scatters each tile's inputs from the coordinator,
  computes the tiles in parallel and gathers their outputs; its local glue (crops, stitches)
  is priced as nodes of the coordinator's local steps;
- a plan (``Prediction``): latency = compute of every stage + every link's transfer (a
  request runs the stages one after the other); bottleneck = the slowest of each stage's
  compute and each link's streaming time (link latency does not limit a pipelined stream).
- a plan under a fleet's load (the cluster file's ``rate``): ``partc.partition.load``, from
  the ``Prediction`` and each tier's once-per-batch seconds.

``partc.partition.cost.evaluate`` prices an assignment on a cost graph (the solver's view,
links at their codec's effective bandwidth); for a plan without tiled stages its figures
are the ``Prediction``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from partc.codec import NO_CODEC, LinkCodec

# Fixed seconds of one call to another node of a tier on the calibration host, besides its
# bytes: encoding and decoding the frames, gRPC and the program's invocation on both sides.
# About 2 ms per tile step with unthrottled workers here (benchmarks/results/tiling.md); it is
# CPU work, so a tier's own figure scales with its nodes' speed
# (``partc.partition.model.call_seconds``). Without it the plan splits runs into parts too
# small to be worth a round trip.
CALL_SECONDS = 2e-3


@dataclass(frozen=True)
class LinkPrice:
    """A link as plans are priced on it.

    Attributes:
        name: ``"src->dst"`` (``partc.ir.link_name``).
        bandwidth: bytes per second, the cluster file's.
        latency: one-way seconds.
        codec: the codec its tensors cross with.
        call: fixed seconds of one call over it besides its bytes (a tier's link to itself: a
            call to another node of the tier, ``tiled_step_seconds``).
    """

    name: str
    bandwidth: float
    latency: float
    codec: LinkCodec = NO_CODEC
    call: float = CALL_SECONDS

    def stream_seconds(self, nbytes: float, bandwidth: float | None = None, codec: LinkCodec | None = None) -> float:
        """Seconds to move ``nbytes`` raw bytes at ``bandwidth`` (default: the link's) with ``codec``
        (default: the link's; a plan's own cut tensors may compress otherwise)."""
        codec = self.codec if codec is None else codec
        return nbytes / codec.effective_bandwidth(self.bandwidth if bandwidth is None else bandwidth)

    def transfer_seconds(self, nbytes: float, bandwidth: float | None = None) -> float:
        """One transfer of ``nbytes`` raw bytes: the link's latency plus its streaming time."""
        return self.latency + self.stream_seconds(nbytes, bandwidth)


def tiled_step_seconds(
    compute: Sequence[float], scatter: Sequence[float], gather: Sequence[float], link: LinkPrice
) -> float:
    """Return the seconds of one tiled step, from the coordinator (tile 0's node) holding its
    inputs to it holding every tile's outputs, as ``partc.tiling.schedule`` runs it.

    ``compute[t]`` is tile t's seconds, ``scatter[t]`` and ``gather[t]`` the raw bytes of
    its inputs and outputs (unused for tile 0), ``link`` the tier's link to itself. The
    coordinator's link carries one transfer at a time each way: it sends tiles 1, 2, ...
    their inputs one after the other, and receives their outputs one after the other, each
    once that tile is done (the earliest done first). Each call to another node also costs
    ``link.call`` seconds of its own. Tile t starts when its inputs have arrived; tile 0 computes
    on the coordinator meanwhile.
    """
    sent, done = 0.0, []
    for t in range(1, len(compute)):
        sent += link.call + link.transfer_seconds(scatter[t])
        done.append((sent + compute[t], gather[t]))
    received = 0.0
    for ready, nbytes in sorted(done):
        received = max(received, ready) + link.transfer_seconds(nbytes)
    return max(compute[0], received)


def remote_call_seconds(program: float, sent: float, returned: float, link: LinkPrice) -> float:
    """Return the seconds of one call to another node of a tier, from sending its ``sent`` input bytes
    to holding its ``returned`` output bytes, its program taking ``program`` seconds there: a tiled
    step whose only tile runs on that node (``tiled_step_seconds``)."""
    return tiled_step_seconds([0.0, program], [0, sent], [0, returned], link)


@dataclass(frozen=True)
class Prediction:
    """The predicted cost of one plan, re-priceable at other bandwidths.

    Attributes:
        compute: tier -> seconds of its stage (tiled steps priced), every tier in order.
        link_bytes: link -> raw tensor bytes per inference, every link in order.
        reached: the links the plan reaches past (their latency is paid).
        codecs: link -> its codec as measured on this plan's own cut tensors, where that
            differs from the link's (``LinkPrice.codec``).
    """

    compute: Mapping[str, float]
    link_bytes: Mapping[str, int]
    reached: tuple[str, ...] = field(default=())
    codecs: Mapping[str, LinkCodec] = field(default_factory=dict)

    def stream(self, link: LinkPrice, bandwidth: Mapping[str, float]) -> float:
        """Seconds to stream this plan's bytes over ``link``, with its codec on this plan's tensors."""
        return link.stream_seconds(self.link_bytes.get(link.name, 0), bandwidth.get(link.name),
                                   self.codecs.get(link.name))

    def transfer(self, links: Sequence[LinkPrice], bandwidth: Mapping[str, float] | None = None) -> dict[str, float]:
        """Seconds on each link, at ``bandwidth`` (link -> bytes/s; a link not in it: its own)."""
        bandwidth = bandwidth or {}
        return {
            link.name: (link.latency if link.name in self.reached else 0.0) + self.stream(link, bandwidth)
            for link in links
        }

    def latency(self, links: Sequence[LinkPrice], bandwidth: Mapping[str, float] | None = None) -> float:
        """End-to-end seconds of one request: every stage's compute and every link's transfer."""
        return sum(self.compute.values()) + sum(self.transfer(links, bandwidth).values())

    def bottleneck(self, links: Sequence[LinkPrice], bandwidth: Mapping[str, float] | None = None) -> float:
        """Seconds of the slowest pipeline stage: a tier's compute or a link's streaming time."""
        bandwidth = bandwidth or {}
        return max([*self.compute.values(), *(self.stream(link, bandwidth) for link in links)])

    def value(self, objective: str, links: Sequence[LinkPrice], bandwidth: Mapping[str, float] | None = None) -> float:
        """The figure ``objective`` minimises: latency or bottleneck."""
        return self.latency(links, bandwidth) if objective == "latency" else self.bottleneck(links, bandwidth)

    def to_json(self, links: Sequence[LinkPrice]) -> dict:
        """The manifest's ``plans[].predicted``: what it holds, and its figures at the links' bandwidths."""
        return {
            "compute": dict(self.compute), "link_bytes": dict(self.link_bytes), "reached": list(self.reached),
            "codecs": {name: codec.to_json() for name, codec in self.codecs.items()},
            "latency": self.latency(links), "bottleneck": self.bottleneck(links), "transfer": self.transfer(links),
        }

    @classmethod
    def from_json(cls, entry: Mapping) -> Prediction:
        """Return the prediction a manifest's ``plans[].predicted`` holds.

        Raises:
            KeyError: for a missing key (the manifest reader names it).
        """
        return cls(dict(entry["compute"]), dict(entry["link_bytes"]), tuple(entry["reached"]),
                   {name: LinkCodec.from_json(codec) for name, codec in entry["codecs"].items()})
