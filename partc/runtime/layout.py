"""How the testbed (``partc.runtime.testbed``) lays a build out on one host.

- **Chain.** The testbed's chain is the build's (its stages with index 0, in order), and
  model inputs come from the first tier: when the first stage runs there, the driver's hop
  is local and unshaped (a camera attached to the device); otherwise a node for the driver
  (``DRIVER``) on the first tier comes first, and inputs cross the shaped link(s) to stage 0.
- **Path.** Nodes on tiers ``a`` and ``c`` cross the cluster's links ``a .. c-1``: their hop
  gets the narrowest bandwidth and the summed latency. Consecutive nodes on one tier get
  an unshaped hop.
- **Tiles.** A tier's further nodes (``edge.1``..., which run tiles for ``edge.0``) are each
  reached from their coordinator by a hop of their own, shaped as the tier's link to
  itself says (unshaped without one).
- **CPU.** A stage's share emulates its target's speed in cores of this host: the target's
  ``peak_gflops`` over the cost model's reference host's per-core ``peak_gflops``
  (``partc.costmodel``: the reference is this kind of host at one thread), clamped to
  [``MIN_SHARE``, cores of this host]. A target that needs more cores than this host has
  cannot be emulated: the testbed says so, and calibrates its predictions to the node it
  does run (``partc.runtime.testbed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from partc.manifest import Manifest
from partc.runtime.plans import links_between

MIN_SHARE = 0.05  # cores: below this a stage barely runs
DRIVER = "driver"  # the driver's node of the chain, when it needs a namespace of its own


@dataclass(frozen=True)
class Hop:
    """The link between two consecutive nodes as the testbed shapes it.

    Attributes:
        src, dst: node names (``src`` is ``DRIVER`` for the hop from where inputs come).
        key: the plan's link name(s), ``"edge->cloud"``; several joined by ``","`` for a path.
        bandwidth: bytes/s, or None when both nodes share a tier (unshaped).
        latency: one-way seconds.
        predicted_s: the primary plan's predicted transfer seconds (sum over the path).
        predicted_bytes: the primary plan's bytes per inference on the path's first link.
    """

    src: str
    dst: str
    key: str
    bandwidth: float | None
    latency: float
    predicted_s: float
    predicted_bytes: int


def chain(manifest: Manifest) -> list[tuple[str, str]]:
    """Return (name, tier) of every node of the testbed's chain: ``DRIVER`` first where the first
    stage does not run on the first tier (model inputs come from the first tier), then the stages."""
    first = manifest.tiers[0].name
    stages = [(s.name, s.tier) for s in manifest.chain]
    return stages if stages[0][1] == first else [(DRIVER, first), *stages]


def hops(manifest: Manifest) -> list[Hop]:
    """Return the hops between consecutive nodes of ``chain(manifest)``, shaped per the cluster's links."""
    predicted = manifest.plans[0].predicted
    transfer = predicted.transfer(manifest.prices)
    out = []
    nodes = chain(manifest)
    for (src, src_tier), (dst, dst_tier) in zip(nodes, nodes[1:], strict=False):
        links = links_between(manifest, src_tier, dst_tier)
        keys = [lk.name for lk in links]
        out.append(Hop(
            src, dst, ",".join(keys), min((lk.bandwidth for lk in links), default=None),
            sum(lk.latency for lk in links), sum(transfer.get(k, 0.0) for k in keys),
            predicted.link_bytes.get(keys[0], 0) if keys else 0,
        ))
    return out


def tile_hops(manifest: Manifest) -> list[Hop]:
    """Return the hop from each tier's first node to each of its further nodes, per the tier's own link."""
    links = {lk.src: lk for lk in manifest.links if lk.src == lk.dst}
    out = []
    for s in manifest.stages:
        if s.index > 0:
            link = links.get(s.tier)
            out.append(Hop(f"{s.tier}.0", s.name, link.name if link else "", link.bandwidth if link else None,
                           link.latency if link else 0.0, 0.0, 0))
    return out


def target_cores(target_name: str) -> float:
    """Cores of this host that run as fast as ``target_name``, unclamped (see the module docstring)."""
    from partc.costmodel import load_calibration
    from partc.targets import target

    reference = load_calibration().reference
    return target(target_name).peak_gflops / (reference.peak_gflops / reference.cores)


def cpu_share(target_name: str, host_cores: float) -> float:
    """Cores of this host that emulate ``target_name``'s speed: ``target_cores`` clamped to
    [``MIN_SHARE``, ``host_cores``]; a target beyond this host's cores is not emulated."""
    return min(max(target_cores(target_name), MIN_SHARE), float(host_cores))
