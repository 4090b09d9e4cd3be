"""The cost model's structure: per-target dispatch, GPU utilisation, terms fitted where they bind, user targets."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from partc.cli import main
from partc.costmodel import (
    DEFAULT,
    MEMORY_EFFICIENCY_MIN,
    Calibration,
    ClassFit,
    dispatch_scale,
    fit_calibration,
    fit_target,
    fit_target_to_totals,
    load_calibration,
    predict_graph,
    predict_profile_total,
    predict_seconds,
    target_yaml,
)
from partc.errors import ClusterError, PartcError
from partc.profile import NodeTiming, Profile, read_profile
from partc.report import trace_model
from partc.targets import TARGETS, parse_description, target

REFERENCE = dataclasses.replace(TARGETS["cloud-cpu"], name="ref", peak_gflops=100.0, memory_bandwidth_gbs=10.0,
                                clock_ghz=2.0, dispatch_us=8.0, source="test")
TRUTH = Calibration(REFERENCE, {DEFAULT: ClassFit(0.5, 0.5, 10.0), "conv2d": ClassFit(0.9, 0.8, 40.0)})


def _profile(cal: Calibration, desc, name="m") -> Profile:
    nodes = []
    for i in range(30):
        op, kind = ("conv2d", "conv") if i % 2 else ("relu", "elementwise")
        flops = (i + 1) * 10**7 * (20 if kind == "conv" else 0)
        nbytes = (31 - i) * 10**5
        t = predict_seconds(cal, op, kind, flops, nbytes, desc, nbytes // 3)
        nodes.append(NodeTiming(f"n{i}", op, kind, op, (1,), flops, nbytes // 3, nbytes - nbytes // 3, 0, t, t, t))
    return Profile(name, ("1",), "torch.fx", "", {"cpu": "test"}, 2, 1, 1, 0.0, 0.0, 0.0, tuple(nodes))


def test_dispatch_scales_by_the_targets_own_dispatch_else_by_clock():
    slow = dataclasses.replace(REFERENCE, dispatch_us=32.0)
    assert dispatch_scale(REFERENCE, slow) == pytest.approx(4.0)
    unknown = dataclasses.replace(REFERENCE, dispatch_us=0.0, clock_ghz=1.0)
    assert dispatch_scale(REFERENCE, unknown) == pytest.approx(2.0)
    tiny = predict_seconds(TRUTH, "relu", "elementwise", 0, 8, slow)  # a tiny node: dispatch dominates
    assert tiny == pytest.approx(40e-6, rel=1e-3)


def test_gpu_small_layers_run_at_the_fraction_they_fill():
    gpu = dataclasses.replace(REFERENCE, kind="gpu", launch_overhead_us=5.0, saturation_items=1000)
    flops, nbytes = 10**9, 1000
    full = predict_seconds(TRUTH, "conv2d", "conv", flops, nbytes, gpu, out_bytes=4 * 1000)
    quarter = predict_seconds(TRUTH, "conv2d", "conv", flops, nbytes, gpu, out_bytes=4 * 250)
    compute = flops / (100e9 * 0.9)
    assert full == pytest.approx(compute + 5e-6)
    assert quarter == pytest.approx(4 * compute + 5e-6)


def test_compute_bound_class_is_not_priced_as_memory_bound():
    """Compute-bound convolutions fit e, memory-bound elementwise nodes fit m: no absurd 0.03 memory efficiency."""
    cal = fit_calibration([_profile(TRUTH, REFERENCE, "a"), _profile(TRUTH, REFERENCE, "b")], REFERENCE)
    assert cal.classes["conv2d"].compute_efficiency == pytest.approx(0.9, rel=0.02)
    assert cal.classes["relu"].memory_efficiency == pytest.approx(0.5, rel=0.02)
    assert cal.classes["relu"].overhead_us == pytest.approx(10.0, rel=0.02)


def test_a_slow_memory_side_is_priced_by_compute():
    """Max pooling moves bytes at 0.05 of copy: its instructions limit it, so it follows the compute rate."""
    truth = Calibration(REFERENCE, {DEFAULT: ClassFit(0.5, 0.5, 10.0), "maxpool2d": ClassFit(0.5, 0.05, 10.0)})
    nodes = []
    for i in range(20):
        nbytes = (i + 1) * 10**6
        t = predict_seconds(truth, "maxpool2d", "pool", nbytes // 8, nbytes, REFERENCE)
        nodes.append(NodeTiming(f"n{i}", "maxpool2d", "pool", "maxpool2d", (1,), nbytes // 8, 0, nbytes, 0, t, t, t))
    profile = Profile("m", ("1",), "torch.fx", "", {"cpu": "test"}, 2, 1, 1, 0.0, 0.0, 0.0, tuple(nodes))
    fit = fit_calibration([profile], REFERENCE).classes["maxpool2d"]
    assert fit.memory_efficiency == MEMORY_EFFICIENCY_MIN and fit.op_efficiency > 0
    cal = Calibration(REFERENCE, {DEFAULT: fit})
    nbytes = 10**7
    at_reference = predict_seconds(cal, "maxpool2d", "pool", 0, nbytes, REFERENCE) - 10e-6
    assert at_reference == pytest.approx(nbytes / (10e9 * 0.05), rel=0.02)  # the measured rate
    faster_compute = dataclasses.replace(REFERENCE, peak_gflops=200.0)
    assert predict_seconds(cal, "maxpool2d", "pool", 0, nbytes, faster_compute) - 10e-6 == pytest.approx(
        at_reference / 2, rel=0.02)
    less_bandwidth = dataclasses.replace(REFERENCE, memory_bandwidth_gbs=0.1)  # now memory limits it
    assert predict_seconds(cal, "maxpool2d", "pool", 0, nbytes, less_bandwidth) - 10e-6 == pytest.approx(
        nbytes / (0.1e9 * MEMORY_EFFICIENCY_MIN))


def test_shipped_calibration_prices_3x3_convolutions_by_compute_on_every_cpu_target():
    """A 3x3 conv of 64 -> 64 channels at 56x56 (132 FLOP/byte) is compute-bound on every CPU target."""
    cal = load_calibration()
    fit = cal.fit_of("conv2d", "conv")
    assert fit.memory_efficiency >= MEMORY_EFFICIENCY_MIN  # not 0.08: no compute time absorbed in memory
    assert all(f.memory_efficiency >= MEMORY_EFFICIENCY_MIN for f in cal.classes.values())
    flops, activation, weights = 2 * 9 * 64 * 64 * 56 * 56, 4 * 64 * 56 * 56, 4 * 9 * 64 * 64
    nbytes = 2 * activation + weights
    for desc in TARGETS.values():
        if desc.kind != "cpu":
            continue
        compute = flops / (desc.peak_gflops * 1e9 * fit.compute_efficiency)
        dispatch = fit.overhead_us * 1e-6 * dispatch_scale(cal.reference, desc)
        assert nbytes / (desc.memory_bandwidth_gbs * 1e9 * fit.memory_efficiency) < compute / 2, desc.name
        assert predict_seconds(cal, "conv2d", "conv", flops, nbytes, desc, activation) == pytest.approx(
            compute + dispatch), desc.name


def _cost_model_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cost_model.py"
    spec = importlib.util.spec_from_file_location("cost_model_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scission_tier_ratios_from_the_shipped_calibration():
    """Scission's five models on its machines, from the shipped calibration (no profiling here).

    Fitted (its workflow, each model predicted by machines fitted to the other four): the issue's bar, ratios within
    25% and CPU totals within 2x. From the datasheet descriptions: the misses and why are in
    benchmarks/results/cost_model.md (Scission's i5 edge sits apart from the machines' rates).
    """
    bench = _cost_model_benchmark()
    rows = {r["model"]: r for r in bench.scission_table(load_calibration(), bench.scission_graphs())}
    assert set(rows) == {"vgg16", "resnet50", "inception_v3", "mobilenet_v2", "densenet121"}
    for name, row in rows.items():
        fitted, described = row["fitted"], row["described"]
        assert all(abs(fitted[ratio]["error_pct"]) <= 25 for ratio in ("device:edge", "edge:cloud-cpu")), name
        assert fitted["worst_cpu_factor"] <= 2, name
        predicted = described["predicted_ms"]
        assert predicted["rpi4"] > predicted["edge-x86"] > predicted["cloud-cpu"] > predicted["cloud-gpu"], name
        assert abs(described["device:cloud-cpu"]["error_pct"]) <= 25, name
        for tier in ("rpi4", "cloud-cpu"):
            assert 1 / 2.5 <= predicted[tier] / row["measured_ms"][tier] <= 2.5, (name, tier)


def test_fit_target_to_whole_model_times_predicts_another_model():
    graphs = {name: trace_model(f"torchvision:{name}", ["1,3,64,64"])
              for name in ("resnet18", "mobilenet_v2", "squeezenet1_0", "googlenet")}
    board = dataclasses.replace(REFERENCE, name="board", peak_gflops=40.0, memory_bandwidth_gbs=6.0, dispatch_us=20.0)
    seconds = {name: sum(predict_graph(TRUTH, gm, board).values()) for name, gm in graphs.items()}
    base = dataclasses.replace(REFERENCE, name="board")
    fitted = fit_target_to_totals(TRUTH, {n: (graphs[n], seconds[n]) for n in ("resnet18", "mobilenet_v2",
                                                                               "squeezenet1_0")}, base)
    assert fitted.source.startswith("fitted by partc.costmodel.fit_target_to_totals to whole-model times of "
                                    "mobilenet_v2, resnet18, squeezenet1_0")
    before = sum(predict_graph(TRUTH, graphs["googlenet"], base).values())
    after = sum(predict_graph(TRUTH, graphs["googlenet"], fitted).values())
    # the prior (the base's rates, 2.5x off) holds the fit back a little: within 15%, from over 50% off
    assert abs(after / seconds["googlenet"] - 1) < 0.15 < 0.5 < abs(before / seconds["googlenet"] - 1)
    with pytest.raises(PartcError, match="at least one model measured in a positive time"):
        fit_target_to_totals(TRUTH, {"resnet18": (graphs["resnet18"], 0.0)}, base)


def test_fit_target_recovers_a_machines_rates():
    board = dataclasses.replace(REFERENCE, name="board", peak_gflops=25.0, memory_bandwidth_gbs=4.0, dispatch_us=30.0)
    measured = _profile(TRUTH, board)
    fitted = fit_target(TRUTH, [measured], dataclasses.replace(REFERENCE, name="board"))
    assert fitted.peak_gflops == pytest.approx(25.0, rel=0.02)
    assert fitted.memory_bandwidth_gbs == pytest.approx(4.0, rel=0.02)
    assert fitted.dispatch_us == pytest.approx(30.0, rel=0.02)
    assert fitted.source.startswith("fitted by partc.costmodel.fit_target to measured profiles of m on test")
    want = predict_profile_total(TRUTH, measured, board)
    assert predict_profile_total(TRUTH, measured, fitted) == pytest.approx(want, rel=0.01)
    assert parse_description(target_yaml(fitted), "board.yaml") == fitted  # the file reads back exactly


def test_user_target_file_by_path(tmp_path):
    path = tmp_path / "my-board.yaml"
    mine = dataclasses.replace(TARGETS["rpi4"], name="my-board", peak_gflops=33.0)
    path.write_text(target_yaml(mine))
    assert target(str(path)) == mine
    with pytest.raises(ClusterError, match="target description file not found"):
        target(str(tmp_path / "missing.yaml"))
    path.write_text("name: x\n")
    with pytest.raises(ClusterError, match=f"{path}: missing field 'summary'"):
        target(str(path))
    path.write_text(target_yaml(mine) + "bogus: 1\n")
    with pytest.raises(ClusterError, match=f"{path}: unknown field 'bogus'"):
        target(str(path))


def test_shipped_descriptions_state_their_new_numbers():
    assert TARGETS["cloud-gpu"].saturation_items > 0 and "SM" in TARGETS["cloud-gpu"].source
    for name in ("rpi4", "edge-x86", "cloud-cpu"):
        assert TARGETS[name].dispatch_us > 0 and "dispatch_us" in TARGETS[name].source


def test_cli_profile_fit_target(tmp_path, capsys):
    out, fitted = tmp_path / "mlp.json", tmp_path / "host.yaml"
    code = main(["profile", "tests/models.py:mlp", "--input-shape", "1,16", "-o", str(out), "--repeats", "3",
                 "--warmup", "1", "--threads", "1", "--fit-target", str(fitted)])
    capsys.readouterr()
    assert code == 0
    desc = target(str(fitted))
    assert desc.name == "host" and desc.cores == 1 and desc.peak_gflops > 0 and desc.dispatch_us > 0
    assert read_profile(out).model in desc.source


def test_cli_profile_fit_target_bad_name(tmp_path, capsys):
    code = main(["profile", "tests/models.py:mlp", "--input-shape", "1,16", "-o", str(tmp_path / "p.json"),
                 "--fit-target", str(tmp_path / "host.txt")])
    _, err = capsys.readouterr()
    assert code == 2
    assert err == (f"partc: error: {tmp_path / 'host.txt'}: --fit-target: the file name must end in .yaml (a "
                   "cluster file's tier names a target file by that suffix)\n")
    assert not (tmp_path / "p.json").exists()
