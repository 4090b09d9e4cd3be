import pytest

from partc.context import CompileContext, Link, Tier
from partc.errors import PartcError
from partc.ir import META_PROFILE, compute_nodes
from partc.passes import DEFAULT_PIPELINE, PASSES, passes_named
from partc.passes.profile import annotate_profile
from partc.pipeline import run_passes
from partc.profile import profile_model, write_profile
from partc.report import trace_model

THREE_TIERS = (
    Tier("device", "rpi4", "torchscript"),
    Tier("edge", "jetson-nano", "onnx", 2),
    Tier("cloud", "cloud-cpu", "tvm"),
)
LINKS = (Link("device", "edge", 2.5e6, 0.005), Link("edge", "cloud", 625e3, 0.03))


@pytest.fixture(scope="module")
def resnet18():
    return trace_model("torchvision:resnet18", ["1,3,224,224"])


def test_registered_first():
    assert PASSES["annotate-profile"].run is annotate_profile
    assert DEFAULT_PIPELINE.names[0] == "annotate-profile"


def test_every_node_gets_every_tier(resnet18):
    ctx = CompileContext(THREE_TIERS, LINKS)
    result = annotate_profile(resnet18, ctx)
    assert all(META_PROFILE not in n.meta for n in resnet18.graph.nodes)  # the input is untouched
    nodes = list(result.gm.graph.nodes)
    assert len(nodes) == len(resnet18.graph.nodes)
    for n in nodes:
        assert set(n.meta[META_PROFILE]) == {"device", "edge", "cloud"}
    assert nodes[0].meta[META_PROFILE] == {"device": 0.0, "edge": 0.0, "cloud": 0.0}
    assert nodes[-1].meta[META_PROFILE] == {"device": 0.0, "edge": 0.0, "cloud": 0.0}
    for n in compute_nodes(result.gm):
        times = n.meta[META_PROFILE]
        assert times["device"] > times["cloud"] > 0  # an RPi4 is slower than a cloud CPU on every layer
    assert result.summary.startswith("device (rpi4, cost model) ")


def test_slower_targets_predict_slower(resnet18):
    tiers = tuple(Tier(name, name, "onnx") for name in ("rpi4", "edge-x86", "cloud-cpu", "cloud-gpu"))
    links = tuple(Link(a.name, b.name, 1e6, 0.01) for a, b in zip(tiers, tiers[1:], strict=False))
    gm = annotate_profile(resnet18, CompileContext(tiers, links)).gm
    total = {t.name: sum(n.meta[META_PROFILE][t.name] for n in gm.graph.nodes) for t in tiers}
    assert total["rpi4"] > total["edge-x86"] > total["cloud-cpu"] > total["cloud-gpu"] > 0


def test_measured_profile_overrides_the_model(tmp_path):
    gm = trace_model("tests/models.py:residual", ["1,8,16,16"])
    profile = profile_model(gm, model="residual", warmup=1, repeats=3, threads=1)
    path = tmp_path / "rpi4.profile.json"
    write_profile(profile, path)
    tiers = (Tier("device", "rpi4", "torchscript"), Tier("cloud", "cloud-cpu", "tvm"))
    ctx = CompileContext(tiers, (Link("device", "cloud", 1e6, 0.01),), profiles={"rpi4": path})
    out = run_passes(gm, passes_named(["annotate-profile"]), ctx)
    measured = profile.median_of()
    modelled = annotate_profile(gm, CompileContext(tiers, ctx.links)).gm
    for n, m in zip(compute_nodes(out), compute_nodes(modelled), strict=True):
        assert n.meta[META_PROFILE]["device"] == measured[n.name]
        assert n.meta[META_PROFILE]["device"] != m.meta[META_PROFILE]["device"]
        assert n.meta[META_PROFILE]["cloud"] == m.meta[META_PROFILE]["cloud"]


def test_profile_of_another_input_shape_is_an_error(tmp_path):
    gm = trace_model("tests/models.py:residual", ["1,8,16,16"])
    path = tmp_path / "rpi4.profile.json"
    write_profile(profile_model(gm, model="residual", warmup=1, repeats=1, threads=1), path)
    other = trace_model("tests/models.py:residual", ["1,8,8,8"])
    ctx = CompileContext((Tier("device", "rpi4", "torchscript"),), profiles={"rpi4": path})
    with pytest.raises(PartcError) as info:
        run_passes(other, passes_named(["annotate-profile"]), ctx)
    assert str(info.value).startswith(
        f"pass 'annotate-profile' failed: {path}: node 'conv1': the profile measured it as conv2d [1, 8, 16, 16], "
        "not conv2d [1, 8, 8, 8]"
    )
