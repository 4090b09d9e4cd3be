"""Measurements that are measurements: warm-up before timing, and warnings when a host's figures are unreliable."""

import dataclasses

from partc.build import _timed
from partc.profile import SPREAD_BOUND, NodeTiming, Profile, profile_model, reliability_warnings
from partc.report import trace_model


def _node(name: str, median: float, p10: float, p90: float) -> NodeTiming:
    return NodeTiming(name, "conv2d", "conv", "conv2d", (1, 8, 4, 4), 1000, 512, 512, 0, median, p10, p90)


def _profile(nodes, load=0.0, threads=1, whole=(0.01, 0.0095, 0.0105)) -> Profile:
    return Profile("m", ("1,8,4,4",), "torch.fx", "2026-01-01T00:00:00+00:00", {}, threads, 3, 15,
                   *whole, tuple(nodes), load_average=load)


def test_quiet_tight_profile_has_no_warnings():
    profile = _profile([_node("a", 1e-3, 0.9e-3, 1.2e-3), _node("b", 2e-3, 1.9e-3, 2.2e-3)])
    assert reliability_warnings(profile, cores=4) == ()


def test_busy_host_warns_and_says_what_to_do():
    profile = _profile([_node("a", 1e-3, 0.9e-3, 1.2e-3)], load=3.0, threads=2)
    (warning,) = reliability_warnings(profile, cores=4)
    assert warning.startswith("host busy: load average 3.00 before profiling, plus 2 profiling threads, on 4 cores")
    assert warning.endswith("Profile on a quiet host, or with fewer threads (--threads 1)")


def test_spread_samples_warn_naming_the_worst_node():
    wide = _node("conv_7", 28e-3, 0.9e-3, 60e-3)
    profile = _profile([_node("a", 1e-3, 0.9e-3, 1.2e-3), wide])
    (warning,) = reliability_warnings(profile, cores=4)
    assert warning.startswith(f"samples spread: 1 of 2 nodes of 0.1 ms or more (97% of their summed median) "
                              f"have p90/p10 above {SPREAD_BOUND:g} (worst conv_7:")
    assert warning.endswith("with more --repeats (now 15)")


def test_spread_of_tiny_nodes_or_a_small_share_is_tolerated():
    tiny = _node("view", 5e-6, 1e-6, 40e-6)  # below SPREAD_MIN_S: timer noise
    small = _node("relu", 0.2e-3, 0.05e-3, 0.5e-3)  # spread, but 2% of the time
    profile = _profile([_node("a", 10e-3, 9.5e-3, 10.5e-3), tiny, small])
    assert reliability_warnings(profile, cores=4) == ()


def test_spread_whole_model_warns():
    profile = _profile([_node("a", 1e-3, 0.9e-3, 1.2e-3)], whole=(0.03, 0.001, 0.06))
    (warning,) = reliability_warnings(profile, cores=4)
    assert warning.startswith("whole-model runs spread: p10 1 ms, median 30 ms, p90 60 ms")


def test_profile_model_keeps_its_warnings_and_load():
    gm = trace_model("tests/models.py:mlp", ["1,16"])
    profile = profile_model(gm, model="mlp", warmup=1, repeats=3, threads=1)
    assert profile.load_average is not None
    assert profile.warnings == reliability_warnings(dataclasses.replace(profile, warnings=()), _cores())


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def test_profile_warm_up_runs_every_node_before_timing(monkeypatch):
    """Every node's first call happens in a warm-up run: the timed samples never include it."""
    import importlib

    profile_module = importlib.import_module("partc.profile")  # partc.profile is the function

    calls: dict[str, int] = {}
    recorded_first: list[str] = []
    original = profile_module._NodeTimer.run_node

    def run_node(self, n):
        calls[n.name] = calls.get(n.name, 0) + 1
        if self.record and calls[n.name] == 1:
            recorded_first.append(n.name)
        return original(self, n)

    monkeypatch.setattr(profile_module._NodeTimer, "run_node", run_node)
    gm = trace_model("tests/models.py:mlp", ["1,16"])
    profile = profile_model(gm, warmup=1, repeats=2, threads=1)
    assert recorded_first == [] and all(calls[n.name] == 3 for n in profile.nodes)


def test_compile_timing_skips_first_calls():
    """``_timed`` (compile's artifact timing) records nothing for a program's first ``warmup`` calls."""
    measured: dict[str, list[float]] = {}
    seen = []
    fn = _timed(lambda tensors: seen.append(tensors) or tensors, measured, "edge.0", 3)
    for i in range(8):
        assert fn(i) == i
    assert seen == list(range(8)) and len(measured["edge.0"]) == 5
