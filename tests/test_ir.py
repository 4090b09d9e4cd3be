import pytest
import torch

from partc.ir import META_TIER, clone, lint
from partc.report import trace_model


def test_clone_shares_weights_and_copies_metadata():
    gm = trace_model("tests/models.py:residual", ["1,8,16,16"])
    copy = clone(gm)
    assert copy.graph is not gm.graph
    assert copy.conv1.weight is gm.conv1.weight
    node = next(n for n in copy.graph.nodes if n.name == "conv1")
    node.meta[META_TIER] = "edge"
    assert META_TIER not in next(n for n in gm.graph.nodes if n.name == "conv1").meta
    x = torch.randn(1, 8, 16, 16)
    assert torch.equal(copy(x), gm(x))
    assert copy.meta["partc.inputs"] == gm.meta["partc.inputs"]


def test_clone_keeps_export_calling_convention():
    gm = trace_model("tests/models.py:shape_branch", ["2,8"])
    x = torch.randn(2, 8)
    assert torch.equal(clone(gm)(x), gm(x))


def test_lint_rejects_data_flowing_back_a_tier():
    gm = trace_model("tests/models.py:residual", ["1,8,16,16"])
    tiers = ("device", "edge")
    for n in gm.graph.nodes:
        n.meta[META_TIER] = "device" if n.name in ("x", "conv1") else "edge"
    lint(gm, tiers)
    next(n for n in gm.graph.nodes if n.name == "add").meta[META_TIER] = "device"
    with pytest.raises(RuntimeError, match=r"feeds add \(device\): data flows back a tier"):
        lint(gm, tiers)
