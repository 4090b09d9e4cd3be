"""The cluster file: ``load_cluster`` reads and validates it into a ``CompileContext``.

The context types live in ``partc.context``; this module is the parser, and checks each
tier's ``target`` and ``backend`` against ``partc.targets``. The cluster file is YAML::

    tiers:                       # in data-flow order: data only moves down this list
      - {name: device, target: rpi4,        backend: torchscript}
      - {name: edge,   target: jetson-nano, backend: onnx, nodes: 2}
      - {name: cloud,  target: cloud-cpu,   backend: tvm}
    # or, for a fleet: many devices feeding shared tiers (priced by partc.partition.load)
    #   - {name: device, target: rpi4,      backend: torchscript, instances: 50, rate: 5/s}
    #   - {name: edge,   target: edge-x86,  backend: onnx, replicas: 2, max_batch: 8}
    #   - {name: cloud,  target: cloud-cpu, backend: onnx, replicas: {min: 1, max: 8}, max_batch: 8}
    links:                       # from an earlier tier to a later one, or within a tier
      - {from: device, to: edge,  bandwidth: 20Mbit/s, latency: 5ms}
      - {from: edge,   to: cloud, bandwidth: 5Mbit/s,  latency: 30ms,
         codecs: [none, none+zstd-1, int8+zstd-1]}   # optional, default [none]
      - {from: edge,   to: edge,  bandwidth: 1Gbit/s,  latency: 0.2ms}   # between edge's nodes
    objective: latency           # or: throughput (optional, default latency)
    constraints:                 # optional, and so is each of its keys
      pin: {device: [conv1, bn1, "layer1.*"]}   # node names or fnmatch globs per tier
      forbid: [edge]                            # tiers that must run no node
      max_link_bytes: {device->edge: 2MB}       # most bytes per inference on a link
      max_memory: {device: 512MB}               # most parameter + activation bytes per tier
    compression:                 # optional; needed by any lossy codec in links[].codecs
      budget: 0.99               # least top-1 agreement with the uncompressed pipeline
      calibration: calib.npy     # a batch of inputs, or MODULE:FUNCTION returning one

- ``tiers`` (required, at least one): ``name`` (unique), ``target`` (a key of
  ``partc.targets.TARGETS``), ``backend`` (a key of ``partc.targets.BACKENDS``:
  ``torchscript``, ``onnx``, ``tvm``, ``export``), ``nodes`` (optional, a positive integer, default 1:
  machines that serve one request together, through tiles and branches). The load
  (optional, ``partc.context.Scaling``): ``instances`` (a positive integer, default 1; not on
  the last tier, never more than the tier before has): independent copies of the tier, each
  feeding the next; ``rate`` (first tier only; needed with ``instances``): each instance's
  requests per second, ``5/s``, ``30/min`` or ``100/h``; ``replicas`` (not on the first
  tier): copies of each instance serving its requests, a positive integer or autoscaling
  bounds ``{min: 1, max: 8}``; ``max_batch`` (not on the first tier, default 1): most
  requests a replica runs as one batch.
- ``links`` (required when there are two tiers or more): ``from`` and ``to`` name tiers,
  ``from`` before ``to``; at most one link per pair; every tier after the first must be
  reachable from the first through links (a multi-hop path is fine). A link from a tier
  to itself is the network between that tier's nodes, over which ``tile-conv-stages``
  scatters tiles and gathers them back; only a tier with ``nodes`` > 1 may have one, it
  takes no ``codecs`` (tiles cross it raw), and it reaches no other tier. ``codecs``
  (optional, default ``[none]``): the feature-map codecs (``partc.codec`` names:
  ``none``, ``fp16``, ``int8``, ``int8c``, each optionally ``+zstd``, ``+zstd-N`` or
  ``+lz4``) the ``compress-cut-tensors`` pass may choose from for the tensors crossing that
  link. Links are lossless by default: a lossy codec (fp16, int8, int8c) needs
  ``compression`` with both keys.
- ``compression`` (optional): ``budget``, the least top-1 agreement, in (0, 1], between the
  compressed and the uncompressed pipeline on the calibration inputs; ``calibration``, a
  ``.npy`` file holding a batch of model inputs (first axis = samples; a relative path is
  relative to the cluster file) or ``MODULE:FUNCTION``, a function of no arguments that
  returns such a batch (one array, or a list with one array per model input).
- Units are required, never guessed. Bandwidth: ``bit/s``, ``kbit/s``, ``Mbit/s``,
  ``Gbit/s``, ``B/s``, ``kB/s``, ``MB/s``, ``GB/s`` (k, M, G are powers of 1000, as
  networks count). Latency: ``s``, ``ms``, ``us``. Sizes: ``B``, ``kB``, ``MB``, ``GB``
  (powers of 1000) and ``KiB``, ``MiB``, ``GiB`` (powers of 1024). A number may have a
  decimal point and a space before its unit (``2.5 MB/s``).
- Unknown keys are errors, so that a typo does not silently drop a setting.

Every error is a ``ClusterError`` that names the file and the key path
(``cluster.yaml: links[1].bandwidth: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from partc.codec import parse_codec
from partc.context import (
    OBJECTIVES,
    BackendOptions,
    CompileContext,
    Compression,
    Constraints,
    Link,
    Scaling,
    Tier,
)
from partc.errors import ClusterError, PartcError
from partc.targets import backend, target

_BANDWIDTH_UNITS = {
    "bit/s": 1 / 8,
    "kbit/s": 1e3 / 8,
    "Mbit/s": 1e6 / 8,
    "Gbit/s": 1e9 / 8,
    "B/s": 1.0,
    "kB/s": 1e3,
    "MB/s": 1e6,
    "GB/s": 1e9,
}
_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_RATE_UNITS = {"/s": 1.0, "/min": 1 / 60, "/h": 1 / 3600}
_SIZE_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_DECIMAL = r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"
_QUANTITY = re.compile(rf"\s*({_DECIMAL})\s*([A-Za-z/]+)\s*")
_BARE_NUMBER = re.compile(rf"\s*{_DECIMAL}\s*")
_SMALLEST, _LARGEST = 1e-12, 1e18  # bytes, bytes/s or s: every price stays finite, with room to scale
MAX_INSTANCES = 10**6  # instances of one tier
MAX_REPLICAS = 1024  # replicas or batch size: partc.partition.load sums over each, so keep them bounded
MAX_NODES = 16  # nodes of one tier: spatial tiles beyond that are slivers, and the tile pass grows with each


def parse_bandwidth(text: str) -> float:
    """Parse ``20Mbit/s`` or ``2.5MB/s`` into bytes per second (k, M, G = 1000-based).

    Raises:
        ValueError: with a message saying what is wrong and which units are accepted.
    """
    return _parse_quantity(text, _BANDWIDTH_UNITS, "e.g. 5Mbit/s, 2.5MB/s")


def parse_duration(text: str) -> float:
    """Parse ``5ms``, ``0.2s`` or ``150us`` into seconds.

    Raises:
        ValueError: with a message saying what is wrong and which units are accepted.
    """
    return _parse_quantity(text, _DURATION_UNITS, "e.g. 5ms, 0.2s, 150us")


def parse_rate(text: str) -> float:
    """Parse ``5/s``, ``30/min`` or ``100/h`` into requests per second.

    Raises:
        ValueError: with a message saying what is wrong and which units are accepted.
    """
    return _parse_quantity(text, _RATE_UNITS, "e.g. 5/s, 30/min, 100/h")


def parse_size(text: str) -> int:
    """Parse ``2MB`` (10**6 bytes) or ``512MiB`` (2**20 bytes) into bytes.

    Raises:
        ValueError: with a message saying what is wrong and which units are accepted.
    """
    return round(_parse_quantity(text, _SIZE_UNITS, "e.g. 2MB, 512MiB, 1.5GB"))


def _parse_quantity(text, units: Mapping[str, float], example: str) -> float:
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a quantity with a unit ({example}), got {type(text).__name__}")
    if not isinstance(text, str) or _BARE_NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} has no unit; use {example}")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a number followed by a unit; use {example}")
    number, unit = match.groups()
    if unit not in units:
        raise ValueError(f"{text!r} has an unknown unit; use {example} (units: {', '.join(units)})")
    value = float(number) * units[unit]
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    if not _SMALLEST <= value <= _LARGEST:
        raise ValueError(f"{text!r} is out of range; use {example}")
    return value


def load_cluster(
    path: Path | str, profiles: Mapping[str, Path] | None = None, options: BackendOptions | None = None
) -> CompileContext:
    """Read and validate a cluster file (syntax in the module docstring).

    ``profiles`` (target name -> measured profile file, from ``--profile``) is stored in
    the context as is; see ``parse_profile_args``. So are ``options`` (the backends'
    settings from the command line; None gives the defaults).

    Raises:
        ClusterError: for a missing or unreadable file, or any invalid field; the message
            names the file and the key path.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"{path}: cluster file not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise ClusterError(f"{path}: not a readable YAML file: {err}") from None
    except UnicodeDecodeError as err:
        raise ClusterError(f"{path}: not a text file (byte {err.start} is not UTF-8); a cluster file is YAML") from None
    except RecursionError:
        raise ClusterError(f"{path}: nested too deeply to be a cluster file; see partc.cluster for its keys") from None
    return cluster_from_dict(data, source=str(path), profiles=profiles, base=path.parent, options=options)


def cluster_from_dict(
    data,
    *,
    source: str = "<cluster>",
    profiles: Mapping[str, Path] | None = None,
    base: Path | None = None,
    options: BackendOptions | None = None,
) -> CompileContext:
    """Validate a parsed cluster file (a dict, as YAML gives it) into a ``CompileContext``.

    A relative ``compression.calibration`` path is taken relative to ``base`` (the cluster
    file's folder; the current folder when None). ``profiles`` and ``options`` are stored
    as ``load_cluster`` says.

    Raises:
        ClusterError: for any invalid field, naming ``source`` and the key path.
    """
    optional = ("links", "objective", "constraints", "compression")
    root = _mapping(data, source, "the top level", required=("tiers",), optional=optional)
    tiers = _tiers(root["tiers"], source)
    names = tuple(t.name for t in tiers)
    links = _links(root.get("links", []), tiers, source)
    objective = root.get("objective", "latency")
    if objective not in OBJECTIVES:
        raise ClusterError(f"{source}: objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    constraints = _constraints(root.get("constraints", {}), names, source)
    compression = _compression(root["compression"], source, base) if "compression" in root else None
    for i, link in enumerate(links):
        for j, name in enumerate(link.codecs):
            if parse_codec(name).lossless:
                continue
            if compression is None or compression.budget is None or compression.calibration is None:
                raise ClusterError(
                    f"{source}: links[{i}].codecs[{j}]: {name!r} is lossy and links are lossless by default; "
                    "add compression: {budget: 0.99, calibration: calib.npy} to check it on real inputs"
                )
    return CompileContext(
        tiers, links, objective, constraints, dict(profiles or {}), source, compression, options or BackendOptions()
    )


def _mapping(value, source: str, where: str, *, required: Iterable[str] = (), optional: Iterable[str] = ()) -> dict:
    """Check that ``value`` is a mapping with all ``required`` keys and no unknown ones."""
    if not isinstance(value, dict):
        raise ClusterError(f"{source}: {where}: expected a mapping, got {_type_name(value)}")
    required, optional = tuple(required), tuple(optional)
    for key in required:
        if key not in value:
            raise ClusterError(f"{source}: {where}: missing key {key!r}")
    if required or optional:
        for key in value:
            if key not in required + optional:
                raise ClusterError(f"{source}: {where}: unknown key {key!r}; expected {', '.join(required + optional)}")
    return value


def _type_name(value) -> str:
    return "nothing" if value is None else type(value).__name__


def _tiers(value, source: str) -> tuple[Tier, ...]:
    if not isinstance(value, list) or not value:
        raise ClusterError(f"{source}: tiers: expected a non-empty list of tiers, got {_type_name(value)}")
    tiers = []
    for i, item in enumerate(value):
        where = f"tiers[{i}]"
        entry = _mapping(item, source, where, required=("name", "target", "backend"),
                         optional=("nodes", "instances", "rate", "replicas", "max_batch"))
        name = entry["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            raise ClusterError(f"{source}: {where}.name: {name!r} is not a name (letters, digits, '_', '-')")
        if name in (t.name for t in tiers):
            raise ClusterError(f"{source}: {where}.name: tier {name!r} is defined twice")
        for key, lookup in (("target", target), ("backend", backend)):
            try:
                lookup(str(entry[key]))
            except ClusterError as err:
                raise ClusterError(f"{source}: {where}.{key}: {err}") from None
        nodes = entry.get("nodes", 1)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ClusterError(f"{source}: {where}.nodes: {nodes!r} is not a positive integer")
        if nodes > MAX_NODES:
            raise ClusterError(f"{source}: {where}.nodes: {nodes} nodes; a tier has at most {MAX_NODES} (its tiles "
                               "would be slivers); give fewer")
        scaling = _scaling(entry, i, len(value), tiers[-1].scaling if tiers else None, source)
        tiers.append(Tier(name, str(entry["target"]), str(entry["backend"]), nodes, scaling))
    if tiers[0].scaling.rate is None and any(t.scaling.instances > 1 for t in tiers):
        raise ClusterError(f"{source}: tiers[0].rate: missing; with instances, give each first-tier instance's "
                           "request rate, e.g. rate: 5/s")
    return tuple(tiers)


def _scaling(entry: dict, i: int, count: int, previous: Scaling | None, source: str) -> Scaling:
    """The ``instances``, ``rate``, ``replicas`` and ``max_batch`` of tier ``i`` of ``count``."""
    where = f"tiers[{i}]"
    instances = _count(entry.get("instances", 1), MAX_INSTANCES, source, f"{where}.instances")
    if instances > 1 and i == count - 1:
        raise ClusterError(f"{source}: {where}.instances: the last tier feeds no other tier; give it replicas "
                           "instead")
    if previous is not None and instances > previous.instances:
        raise ClusterError(f"{source}: {where}.instances: {instances} instances, more than the "
                           f"{previous.instances} of the tier before; each instance is fed by those before it")
    rate = None
    if "rate" in entry:
        if i:
            raise ClusterError(f"{source}: {where}.rate: requests start on the first tier; give rate there")
        rate = _quantity(parse_rate, entry["rate"], source, f"{where}.rate")
    replicas = entry.get("replicas", 1)
    if isinstance(replicas, dict):
        bounds = _mapping(replicas, source, f"{where}.replicas", required=("min", "max"))
        low, high = (_count(bounds[k], MAX_REPLICAS, source, f"{where}.replicas.{k}") for k in ("min", "max"))
        if low > high:
            raise ClusterError(f"{source}: {where}.replicas: min {low} is above max {high}")
    else:
        low = high = _count(replicas, MAX_REPLICAS, source, f"{where}.replicas")
    max_batch = _count(entry.get("max_batch", 1), MAX_REPLICAS, source, f"{where}.max_batch")
    for key in ("replicas", "max_batch"):
        if i == 0 and key in entry:
            raise ClusterError(f"{source}: {where}.{key}: each instance of the first tier serves its own requests; "
                               "give instances instead")
    return Scaling(instances, rate, low, high, max_batch)


def _count(value, most: int, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterError(f"{source}: {where}: {value!r} is not a positive integer")
    if value > most:
        raise ClusterError(f"{source}: {where}: {value} is above the most partc prices, {most}")
    return value


def _links(value, tiers: tuple[Tier, ...], source: str) -> tuple[Link, ...]:
    names = tuple(t.name for t in tiers)
    if not isinstance(value, list):
        raise ClusterError(f"{source}: links: expected a list of links, got {_type_name(value)}")
    links = []
    for i, item in enumerate(value):
        where = f"links[{i}]"
        entry = _mapping(item, source, where, required=("from", "to", "bandwidth", "latency"), optional=("codecs",))
        src = _tier_name(entry["from"], names, source, f"{where}.from")
        dst = _tier_name(entry["to"], names, source, f"{where}.to")
        if src == dst and tiers[names.index(src)].nodes < 2:
            raise ClusterError(
                f"{source}: {where}: link {src} -> {dst} is the network between the nodes of tier {src!r}, "
                "which has one node; give the tier nodes: 2 or more, or remove the link"
            )
        if src == dst and "codecs" in entry:
            raise ClusterError(
                f"{source}: {where}.codecs: tiles cross the link {src} -> {dst} within tier {src!r} raw; remove codecs"
            )
        if names.index(src) > names.index(dst):
            raise ClusterError(
                f"{source}: {where}: link {src} -> {dst} goes backwards; data only moves down the tiers "
                f"list ({' -> '.join(names)})"
            )
        if any((lk.src, lk.dst) == (src, dst) for lk in links):
            raise ClusterError(f"{source}: {where}: a second link {src} -> {dst}; give one link per pair")
        bandwidth = _quantity(parse_bandwidth, entry["bandwidth"], source, f"{where}.bandwidth")
        latency = _quantity(parse_duration, entry["latency"], source, f"{where}.latency")
        links.append(Link(src, dst, bandwidth, latency, _codecs(entry.get("codecs", ["none"]), source, where)))
    reached = {names[0]}
    for name in names[1:]:
        if any(lk.dst == name and lk.src in reached and lk.src != lk.dst for lk in links):
            reached.add(name)
        else:
            raise ClusterError(
                f"{source}: links: no link reaches tier {name!r} from {names[0]!r}; "
                f"add e.g. {{from: {names[names.index(name) - 1]}, to: {name}, "
                "bandwidth: 20Mbit/s, latency: 5ms}"
            )
    return tuple(links)


def _codecs(value, source: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ClusterError(
            f"{source}: {where}.codecs: expected a non-empty list of codec names, got {_type_name(value)}"
        )
    names: list[str] = []
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise ClusterError(f"{source}: {where}.codecs[{j}]: expected a codec name such as int8+zstd-1")
        try:
            name = parse_codec(item).name
        except PartcError as err:
            raise ClusterError(f"{source}: {where}.codecs[{j}]: {err}") from None
        if name in names:
            raise ClusterError(f"{source}: {where}.codecs[{j}]: {name!r} is listed twice")
        names.append(name)
    return tuple(names)


def _compression(value, source: str, base: Path | None) -> Compression:
    entry = _mapping(value, source, "compression", optional=("budget", "calibration"))
    budget = entry.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise ClusterError(f"{source}: compression.budget: {budget!r} is not a fraction in (0, 1], e.g. 0.99")
    calibration = entry.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, str) or not calibration:
            raise ClusterError(f"{source}: compression.calibration: expected a .npy path or MODULE:FUNCTION")
        if calibration.endswith(".npy"):
            path = (base or Path()) / calibration
            if not path.is_file():
                raise ClusterError(f"{source}: compression.calibration: file {calibration!r} not found")
            calibration = str(path.resolve())
        elif not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", calibration):
            raise ClusterError(
                f"{source}: compression.calibration: {calibration!r} is neither a .npy file nor MODULE:FUNCTION"
            )
    return Compression(None if budget is None else float(budget), calibration)


def _tier_name(value, names: tuple[str, ...], source: str, where: str) -> str:
    if value not in names:
        raise ClusterError(f"{source}: {where}: unknown tier {value!r}; tiers are: {', '.join(names)}")
    return value


def _quantity(parse, value, source: str, where: str):
    try:
        return parse(value)
    except ValueError as err:
        raise ClusterError(f"{source}: {where}: {err}") from None


def _constraints(value, names: tuple[str, ...], source: str) -> Constraints:
    entry = _mapping(value, source, "constraints", optional=("pin", "forbid", "max_link_bytes", "max_memory"))
    pin = {}
    for tier, patterns in _mapping(entry.get("pin", {}), source, "constraints.pin").items():
        where = f"constraints.pin.{tier}"
        _tier_name(tier, names, source, where)
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ClusterError(f"{source}: {where}: expected a list of node names or glob patterns")
        pin[tier] = tuple(patterns)
    forbid = entry.get("forbid", [])
    if not isinstance(forbid, list):
        raise ClusterError(f"{source}: constraints.forbid: expected a list of tier names, got {_type_name(forbid)}")
    for i, tier in enumerate(forbid):
        _tier_name(tier, names, source, f"constraints.forbid[{i}]")
        if tier in pin:
            raise ClusterError(f"{source}: constraints.forbid[{i}]: tier {tier!r} is forbidden but has pinned nodes")
    if len(set(forbid)) == len(names):
        raise ClusterError(f"{source}: constraints.forbid: every tier is forbidden; nothing could run")
    max_link_bytes = {}
    for key, size in _mapping(entry.get("max_link_bytes", {}), source, "constraints.max_link_bytes").items():
        where = f"constraints.max_link_bytes.{key}"
        src, sep, dst = str(key).partition("->")
        if not sep:
            raise ClusterError(f"{source}: {where}: expected a key 'SRC->DST' naming two tiers")
        pair = (_tier_name(src.strip(), names, source, where), _tier_name(dst.strip(), names, source, where))
        if pair[0] == pair[1]:
            raise ClusterError(f"{source}: {where}: a cap applies to a link between two tiers; the link within "
                               f"tier {pair[0]!r} carries tiles, not the cut")
        max_link_bytes[pair] = _quantity(parse_size, size, source, where)
    max_memory = {}
    for tier, size in _mapping(entry.get("max_memory", {}), source, "constraints.max_memory").items():
        where = f"constraints.max_memory.{tier}"
        max_memory[_tier_name(tier, names, source, where)] = _quantity(parse_size, size, source, where)
    return Constraints(pin, tuple(forbid), max_link_bytes, max_memory)


def parse_profile_args(specs: Iterable[str]) -> dict[str, Path]:
    """Parse ``--profile TARGET=FILE`` values into target name -> profile path.

    Raises:
        ClusterError: for a value without ``=``, an unknown target, a target given twice,
            or a file that does not exist or is not text.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ClusterError(f"--profile {spec!r}: expected TARGET=FILE, e.g. rpi4=rpi4.profile.json")
        try:
            target(name)
        except ClusterError as err:
            raise ClusterError(f"--profile {spec!r}: {err}") from None
        if name in out:
            raise ClusterError(f"--profile {spec!r}: target {name!r} already has profile {out[name]}")
        if not Path(file).is_file():
            raise ClusterError(f"--profile {spec!r}: file {file!r} not found; write it with 'partc profile'")
        try:
            Path(file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ClusterError(f"--profile {spec!r}: {file!r} is not a readable text file ({err}); give the JSON "
                               "profile that 'partc profile' wrote") from None
        out[name] = Path(file)
    return out
