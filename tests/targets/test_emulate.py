"""Cross-compiled aarch64 TVM stages run under qemu-user: in compile's check, in ``partc run`` and in its workers.

The aarch64 Python these tests need is made by ``examples/qemu/make-sysroot.sh DIR`` (``.ci/run``
makes it in the default folder below); ``PARTC_QEMU_SYSROOT`` names another one. The tests give it
to partc explicitly (``qemu_sysroot``, ``--qemu-sysroot``).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from partc.build import compile_model
from partc.cli import build_parser, main
from partc.runtime.local import load
from tests.models import conv_stack

SYSROOT_VARIABLE = "PARTC_QEMU_SYSROOT"  # the command line's default of --qemu-sysroot
SYSROOT = Path(os.environ.get(SYSROOT_VARIABLE) or Path.home() / ".cache/partc/aarch64-sysroot")

# conv, BN, ReLU, pool, grouped conv, ReLU on the Raspberry Pi (TVM for aarch64); the head on an x86 edge
CLUSTER = """\
tiers:
  - {name: device, target: rpi4, backend: tvm}
  - {name: edge, target: edge-x86, backend: torchscript}
links:
  - {from: device, to: edge, bandwidth: 20Mbit/s, latency: 5ms}
constraints:
  pin: {device: [_0, _1, _2, _3, _4, _5], edge: [_6, _7, _8]}
"""


@pytest.fixture
def cluster(tmp_path):
    pytest.importorskip("tvm")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross compiler: apt-get install gcc-aarch64-linux-gnu")
    if not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")):
        pytest.skip("no qemu-aarch64-static: apt-get install qemu-user-static")
    path = tmp_path / "pi.yaml"
    path.write_text(CLUSTER)
    return path


@pytest.mark.slow
def test_compile_and_run_check_the_aarch64_stage_under_qemu(cluster, tmp_path, capsys):
    if not (SYSROOT / "complete").is_file():
        pytest.skip(f"no aarch64 sysroot in {SYSROOT}: run examples/qemu/make-sysroot.sh {SYSROOT} "
                    f"(or set {SYSROOT_VARIABLE} to one)")
    said = []
    build = compile_model("tests/models.py:conv_stack", ["1,3,32,32"], cluster, tmp_path / "b", qemu_sysroot=SYSROOT,
                          progress=said.append)

    assert any(line.startswith("starting device.0 (aarch64 tvm module under qemu-aarch64") for line in said)
    (checked,) = [line for line in said if line.startswith("device.0: the aarch64 tvm module under qemu-")]
    assert float(checked.rpartition(" ")[2]) <= 1e-5 * build.manifest.output_scale
    assert build.measured["device.0"] is None and build.measured["edge.0"] is not None  # emulated: not timed
    assert build.manifest.max_abs_diff <= 1e-5 * build.manifest.output_scale

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = conv_stack()(x).numpy()
    (got,) = load(build, qemu_sysroot=SYSROOT)(x).values()  # partc run in process: the device stage under qemu
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    capsys.readouterr()
    # a worker process per stage, device.0's given --qemu-sysroot; each result checked against the in-process run
    code = main(["-q", "run", str(build.path), "--distributed", "--requests", "2", "--verify", "--json",
                 "--qemu-sysroot", str(SYSROOT)])
    assert code == 0 and json.loads(capsys.readouterr().out)["requests"] == 2


@pytest.mark.slow
def test_a_sysroot_naming_an_empty_folder_is_one_line(cluster, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["-q", "compile", "tests/models.py:conv_stack", "--input-shape", "1,3,32,32", "--cluster",
                 str(cluster), "-o", str(tmp_path / "b"), "--qemu-sysroot", str(empty)])

    assert code == 2 and not (tmp_path / "b").exists()
    assert capsys.readouterr().err == (
        f"partc: error: qemu sysroot {empty} (--qemu-sysroot or {SYSROOT_VARIABLE}): not a finished sysroot "
        "(stage device.0 is aarch64); make one with examples/qemu/make-sysroot.sh DIR\n"
    )


def test_the_sysroot_variable_is_only_the_default_of_the_option(monkeypatch):
    monkeypatch.setenv(SYSROOT_VARIABLE, "/from/env")
    for argv in (["compile", "m.py:f", "--input-shape", "1", "--cluster", "c.yaml", "-o", "b"], ["run", "b"],
                 ["serve", "b", "--stage", "edge.0"]):
        assert build_parser().parse_args(argv).qemu_sysroot == Path("/from/env")
        assert build_parser().parse_args([*argv, "--qemu-sysroot", "given"]).qemu_sysroot == Path("given")
    monkeypatch.delenv(SYSROOT_VARIABLE)
    assert build_parser().parse_args(["run", "b"]).qemu_sysroot is None
