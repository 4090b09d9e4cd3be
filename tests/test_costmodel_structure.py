"""The cost model's structure: per-target dispatch, GPU utilisation, terms fitted where they bind, user targets."""

import dataclasses

import pytest

from partc.cli import main
from partc.costmodel import (
    DEFAULT,
    Calibration,
    ClassFit,
    dispatch_scale,
    fit_calibration,
    fit_target,
    predict_profile_total,
    predict_seconds,
    target_yaml,
)
from partc.errors import ClusterError
from partc.profile import NodeTiming, Profile, read_profile
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
