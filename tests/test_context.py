import subprocess
import sys
from pathlib import Path

import pytest

from partc.cluster import (
    cluster_from_dict,
    load_cluster,
    parse_bandwidth,
    parse_duration,
    parse_profile_args,
    parse_size,
)
from partc.context import BackendOptions, Compression, Constraints, Link, Tier
from partc.errors import ClusterError, PartcError
from partc.partition.model import link_price

DESIGN_CLUSTER = """\
tiers:
  - {name: device, target: rpi4,        backend: torchscript}
  - {name: edge,   target: jetson-nano, backend: onnx, nodes: 2}
  - {name: cloud,  target: cloud-cpu,   backend: tvm}
links:
  - {from: device, to: edge,  bandwidth: 20Mbit/s, latency: 5ms}
  - {from: edge,   to: cloud, bandwidth: 5Mbit/s,  latency: 30ms}
objective: latency
constraints:
  pin: {device: [conv1, bn1]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def cluster_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ClusterError) as info:
        load_cluster(write(tmp_path, text))
    return str(info.value).replace(str(tmp_path) + "/", "")


def test_design_cluster(tmp_path):
    ctx = load_cluster(write(tmp_path, DESIGN_CLUSTER))
    assert ctx.tiers == (
        Tier("device", "rpi4", "torchscript", 1),
        Tier("edge", "jetson-nano", "onnx", 2),
        Tier("cloud", "cloud-cpu", "tvm", 1),
    )
    assert ctx.links == (Link("device", "edge", 20e6 / 8, 0.005), Link("edge", "cloud", 5e6 / 8, 0.030))
    assert ctx.objective == "latency"
    assert ctx.constraints == Constraints(pin={"device": ("conv1", "bn1")})
    assert ctx.source == str(tmp_path / "cluster.yaml")
    assert link_price(ctx, ctx.link("edge", "cloud")).transfer_seconds(625_000) == pytest.approx(1.030)


def test_all_constraints_and_one_and_two_tiers(tmp_path):
    ctx = load_cluster(
        write(
            tmp_path,
            """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: cloud, target: cloud-gpu, backend: onnx}
links:
  - {from: device, to: cloud, bandwidth: 2.5 MB/s, latency: 150us}
objective: throughput
constraints:
  pin: {cloud: "fc*"}
  forbid: [device]
  max_link_bytes: {device->cloud: 2MB}
  max_memory: {cloud: 512MiB}
""",
        )
    )
    assert ctx.links == (Link("device", "cloud", 2.5e6, 150e-6),)
    assert ctx.objective == "throughput"
    assert ctx.constraints == Constraints(
        pin={"cloud": ("fc*",)},
        forbid=("device",),
        max_link_bytes={("device", "cloud"): 2_000_000},
        max_memory={"cloud": 512 * 2**20},
    )
    one = load_cluster(write(tmp_path, "tiers: [{name: edge, target: edge-x86, backend: tvm}]\n"))
    assert one.tier_names == ("edge",) and one.links == ()


def test_multi_hop_is_valid(tmp_path):
    ctx = load_cluster(write(tmp_path, DESIGN_CLUSTER))
    assert ctx.link("device", "cloud") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20Mbit/s", 2.5e6),
        ("1 Gbit/s", 1.25e8),
        ("8bit/s", 1.0),
        ("100kbit/s", 12_500.0),
        ("2.5MB/s", 2.5e6),
        ("1GB/s", 1e9),
        ("3kB/s", 3000.0),
        ("7B/s", 7.0),
    ],
)
def test_bandwidth_units(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


def test_duration_and_size_units():
    assert parse_duration("5ms") == pytest.approx(0.005)
    assert parse_duration("0.2s") == pytest.approx(0.2)
    assert parse_duration("150us") == pytest.approx(150e-6)
    assert parse_size("2MB") == 2_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert [parse_size(f"1{u}") for u in ("B", "kB", "KiB", "MiB", "GiB")] == [1, 1000, 1024, 2**20, 2**30]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("5 Mbps", "'5 Mbps' has an unknown unit; use e.g. 5Mbit/s, 2.5MB/s"),
        ("5", "'5' has no unit; use e.g. 5Mbit/s, 2.5MB/s"),
        ("fast", "'fast' is not a number followed by a unit; use e.g. 5Mbit/s, 2.5MB/s"),
        ("0Mbit/s", "'0Mbit/s' must be positive"),
    ],
)
def test_bad_bandwidth(bad, message):
    with pytest.raises(ValueError) as info:
        parse_bandwidth(bad)
    assert str(info.value).startswith(message)


def test_wrong_unit_is_an_error_with_the_key_path(tmp_path):
    text = DESIGN_CLUSTER.replace("5Mbit/s,  latency: 30ms", "5 Mbps, latency: 30ms")
    assert cluster_error(tmp_path, text) == (
        "cluster.yaml: links[1].bandwidth: '5 Mbps' has an unknown unit; use e.g. 5Mbit/s, 2.5MB/s "
        "(units: bit/s, kbit/s, Mbit/s, Gbit/s, B/s, kB/s, MB/s, GB/s)"
    )
    text = DESIGN_CLUSTER.replace("latency: 5ms", "latency: 5")
    assert cluster_error(tmp_path, text) == "cluster.yaml: links[0].latency: 5 has no unit; use e.g. 5ms, 0.2s, 150us"


def test_unknown_target_lists_known_ones(tmp_path):
    assert cluster_error(tmp_path, DESIGN_CLUSTER.replace("rpi4", "rpi5")) == (
        "cluster.yaml: tiers[0].target: unknown target 'rpi5'; known targets are: "
        "cloud-cpu, cloud-gpu, edge-x86, jetson-nano, rpi4"
    )


def test_unknown_backend(tmp_path):
    assert cluster_error(tmp_path, DESIGN_CLUSTER.replace("backend: onnx", "backend: tensorrt")) == (
        "cluster.yaml: tiers[1].backend: unknown backend 'tensorrt'; known backends are: export, onnx, torchscript, tvm"
    )


def test_backwards_link(tmp_path):
    text = DESIGN_CLUSTER.replace("{from: edge,   to: cloud", "{from: cloud, to: edge")
    assert cluster_error(tmp_path, text) == (
        "cluster.yaml: links[1]: link cloud -> edge goes backwards; data only moves down the tiers list "
        "(device -> edge -> cloud)"
    )


def test_unreachable_tier(tmp_path):
    text = DESIGN_CLUSTER.replace("  - {from: edge,   to: cloud, bandwidth: 5Mbit/s,  latency: 30ms}\n", "")
    assert cluster_error(tmp_path, text) == (
        "cluster.yaml: links: no link reaches tier 'cloud' from 'device'; "
        "add e.g. {from: edge, to: cloud, bandwidth: 20Mbit/s, latency: 5ms}"
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("{name: edge,   target", "{target", "tiers[1]: missing key 'name'"),
        ("nodes: 2", "nodes: two", "tiers[1].nodes: 'two' is not a positive integer"),
        ("nodes: 2", "node: 2", "tiers[1]: unknown key 'node'; expected name, target, backend, nodes, "
         "instances, rate, replicas, max_batch"),
        ("objective: latency", "objective: speed", "objective: 'speed' is not one of latency, throughput"),
        (
            "{from: device, to: edge,",
            "{from: device, to: egde,",
            "links[0].to: unknown tier 'egde'; tiers are: device, edge, cloud",
        ),
        (
            "pin: {device:",
            "pin: {phone:",
            "constraints.pin.phone: unknown tier 'phone'; tiers are: device, edge, cloud",
        ),
        (
            "{name: cloud,  target: cloud-cpu",
            "{name: edge, target: cloud-cpu",
            "tiers[2].name: tier 'edge' is defined twice",
        ),
    ],
)
def test_field_errors(tmp_path, old, new, message):
    assert old in DESIGN_CLUSTER
    assert cluster_error(tmp_path, DESIGN_CLUSTER.replace(old, new)) == f"cluster.yaml: {message}"


def test_constraint_errors(tmp_path):
    base = DESIGN_CLUSTER.replace("  pin: {device: [conv1, bn1]}\n", "")
    assert cluster_error(tmp_path, base + "  forbid: [device, edge, cloud]\n") == (
        "cluster.yaml: constraints.forbid: every tier is forbidden; nothing could run"
    )
    assert cluster_error(tmp_path, base + "  max_link_bytes: {device-edge: 2MB}\n") == (
        "cluster.yaml: constraints.max_link_bytes.device-edge: expected a key 'SRC->DST' naming two tiers"
    )
    assert cluster_error(tmp_path, base + "  max_link_bytes: {edge->edge: 2MB}\n") == (
        "cluster.yaml: constraints.max_link_bytes.edge->edge: a cap applies to a link between two tiers; the link "
        "within tier 'edge' carries tiles, not the cut"
    )
    assert cluster_error(tmp_path, base + "  max_memory: {device: 512}\n") == (
        "cluster.yaml: constraints.max_memory.device: 512 has no unit; use e.g. 2MB, 512MiB, 1.5GB"
    )


def test_file_errors(tmp_path):
    with pytest.raises(ClusterError, match="cluster file not found"):
        load_cluster(tmp_path / "missing.yaml")
    assert cluster_error(tmp_path, "tiers: [").startswith("cluster.yaml: not a readable YAML file")
    assert cluster_error(tmp_path, "- a\n") == "cluster.yaml: the top level: expected a mapping, got list"
    assert cluster_error(tmp_path, "tiers: []\n") == (
        "cluster.yaml: tiers: expected a non-empty list of tiers, got list"
    )


def test_profile_args(tmp_path):
    profile = tmp_path / "rpi4.json"
    profile.write_text("{}")
    assert parse_profile_args([f"rpi4={profile}"]) == {"rpi4": profile}
    with pytest.raises(ClusterError) as info:
        parse_profile_args(["rpi4"])
    assert str(info.value) == "--profile 'rpi4': expected TARGET=FILE, e.g. rpi4=rpi4.profile.json"
    with pytest.raises(ClusterError, match="unknown target 'pi'; known targets are: cloud-cpu"):
        parse_profile_args([f"pi={profile}"])
    with pytest.raises(ClusterError, match="file 'nope.json' not found"):
        parse_profile_args(["rpi4=nope.json"])


COMPRESSED_CLUSTER = DESIGN_CLUSTER.replace(
    "5Mbit/s,  latency: 30ms}", "5Mbit/s,  latency: 30ms, codecs: [none, none+zstd, int8+zstd-1]}"
) + "compression: {budget: 0.99, calibration: calib.npy}\n"


def test_link_codecs_and_compression(tmp_path):
    (tmp_path / "calib.npy").write_bytes(b"")
    ctx = load_cluster(write(tmp_path, COMPRESSED_CLUSTER))
    assert [lk.codecs for lk in ctx.links] == [("none",), ("none", "none+zstd-1", "int8+zstd-1")]
    assert ctx.compression == Compression(0.99, str(tmp_path / "calib.npy"))
    assert load_cluster(write(tmp_path, DESIGN_CLUSTER)).compression is None
    loader = COMPRESSED_CLUSTER.replace("calib.npy", "mypkg.data:calibration")
    assert load_cluster(write(tmp_path, loader)).compression == Compression(0.99, "mypkg.data:calibration")
    lossless = DESIGN_CLUSTER.replace("latency: 5ms}", "latency: 5ms, codecs: [none+lz4]}")
    assert load_cluster(write(tmp_path, lossless)).links[0].codecs == ("none+lz4",)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "int8+zstd-1]",
            "int9]",
            "links[1].codecs[2]: unknown codec 'int9'; use none, fp16, int8 or int8c, optionally followed by "
            "+zstd, +zstd-LEVEL or +lz4 (e.g. int8+zstd-1)",
        ),
        (
            "[none, none+zstd, int8+zstd-1]",
            "int8",
            "links[1].codecs: expected a non-empty list of codec names, got str",
        ),
        ("none+zstd, int8+zstd-1]", "none+zstd-1, none+zstd]", "links[1].codecs[2]: 'none+zstd-1' is listed twice"),
        (
            "compression: {budget: 0.99, calibration: calib.npy}",
            "compression: {calibration: calib.npy}",
            "links[1].codecs[2]: 'int8+zstd-1' is lossy and links are lossless by default; "
            "add compression: {budget: 0.99, calibration: calib.npy} to check it on real inputs",
        ),
        (
            "compression: {budget: 0.99, calibration: calib.npy}",
            "objective: latency",
            "links[1].codecs[2]: 'int8+zstd-1' is lossy and links are lossless by default; "
            "add compression: {budget: 0.99, calibration: calib.npy} to check it on real inputs",
        ),
        ("budget: 0.99", "budget: 1.5", "compression.budget: 1.5 is not a fraction in (0, 1], e.g. 0.99"),
        ("budget: 0.99", "budget: yes", "compression.budget: True is not a fraction in (0, 1], e.g. 0.99"),
        ("calibration: calib.npy", "calibration: gone.npy", "compression.calibration: file 'gone.npy' not found"),
        (
            "calibration: calib.npy",
            "calibration: data.csv",
            "compression.calibration: 'data.csv' is neither a .npy file nor MODULE:FUNCTION",
        ),
        ("budget: 0.99,", "samples: 8,", "compression: unknown key 'samples'; expected budget, calibration"),
    ],
)
def test_compression_errors(tmp_path, old, new, message):
    (tmp_path / "calib.npy").write_bytes(b"")
    assert old in COMPRESSED_CLUSTER
    assert cluster_error(tmp_path, COMPRESSED_CLUSTER.replace(old, new)) == f"cluster.yaml: {message}"


WITHIN_EDGE = DESIGN_CLUSTER.replace(
    "latency: 30ms}\n", "latency: 30ms}\n  - {from: edge,   to: edge,  bandwidth: 1Gbit/s, latency: 0.2ms}\n"
)


def test_link_within_a_tier_joins_its_nodes(tmp_path):
    ctx = load_cluster(write(tmp_path, WITHIN_EDGE))
    assert ctx.link("edge", "edge") == Link("edge", "edge", 1e9 / 8, 0.0002)
    assert ctx.link("device", "edge") == Link("device", "edge", 20e6 / 8, 0.005)
    assert ctx.link("edge", "cloud") == Link("edge", "cloud", 5e6 / 8, 0.030)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "nodes: 2",
            "nodes: 1",
            "links[2]: link edge -> edge is the network between the nodes of tier 'edge', which has one node; "
            "give the tier nodes: 2 or more, or remove the link",
        ),
        (
            ", backend: onnx, nodes: 2}",
            ", backend: onnx}",
            "links[2]: link edge -> edge is the network between the nodes of tier 'edge', which has one node; "
            "give the tier nodes: 2 or more, or remove the link",
        ),
        (
            "latency: 0.2ms}",
            "latency: 0.2ms, codecs: [none+zstd]}",
            "links[2].codecs: tiles cross the link edge -> edge within tier 'edge' raw; remove codecs",
        ),
        (
            "latency: 0.2ms}",
            "latency: 0.2ms}\n  - {from: edge, to: edge, bandwidth: 10Gbit/s, latency: 0.1ms}",
            "links[3]: a second link edge -> edge; give one link per pair",
        ),
        (
            "  - {from: device, to: edge,  bandwidth: 20Mbit/s, latency: 5ms}\n",
            "",
            "links: no link reaches tier 'edge' from 'device'; "
            "add e.g. {from: device, to: edge, bandwidth: 20Mbit/s, latency: 5ms}",
        ),
    ],
)
def test_link_within_a_tier_errors(tmp_path, old, new, message):
    assert old in WITHIN_EDGE
    assert cluster_error(tmp_path, WITHIN_EDGE.replace(old, new)) == f"cluster.yaml: {message}"


def test_backend_options_reach_the_context(tmp_path):
    assert load_cluster(write(tmp_path, DESIGN_CLUSTER)).options == BackendOptions(0, None)
    options = BackendOptions(tvm_trials=8, tuning_db=tmp_path / "tuning")
    assert load_cluster(write(tmp_path, DESIGN_CLUSTER), options=options).options is options
    assert cluster_from_dict({"tiers": [{"name": "edge", "target": "edge-x86", "backend": "tvm"}]}).options == (
        BackendOptions()
    )


def test_bad_backend_options():
    with pytest.raises(PartcError) as info:
        BackendOptions(tvm_trials=-1)
    assert str(info.value) == "tvm: trials must be >= 0, not -1"
    with pytest.raises(PartcError) as info:
        BackendOptions(tvm_trials=4)
    assert str(info.value) == "tvm: tuning (trials > 0) needs a tuning database directory to keep its records"


def test_the_context_types_do_not_import_the_backends():
    code = "import sys, partc.context; print(sorted(m for m in sys.modules if m.startswith('partc.targets')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
