"""Run a cross-compiled TVM stage on this machine under qemu-user, to check it before it ships.

A TVM module compiled for another architecture (an ``rpi4`` tier's aarch64 ``.so``) cannot be
loaded by this process. Where ``qemu-<arch>-static`` (Debian: ``qemu-user-static``) or
``qemu-<arch>`` is on PATH and the caller gives a sysroot, a folder made by
``examples/qemu/make-sysroot.sh DIR`` (``DIR/root``: the target's Python 3.11 and its
libraries; ``DIR/site``: tvm and numpy wheels for the target; ``DIR/complete``: the
architecture and versions, written last), the stage runs in that Python under qemu instead.
The sysroot is a setting (``qemu_sysroot`` of ``partc.compile``, ``partc.load`` and
``partc.runtime.deploy.serve``; ``--qemu-sysroot`` on the command line, whose default
``PARTC_QEMU_SYSROOT`` only ``partc.cli`` reads).

Each loaded stage is one long-lived child process (loading it takes ~20-30 s under emulation,
mostly ``import tvm``) running ``emulated_runner.py`` by path: the inputs and outputs go through
``.npz`` files in a temporary folder, one request line per call on its stdin (the protocol is in
the runner's docstring). Emulated times say nothing about the target, so nothing times them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partc.errors import PartcError, RunError
from partc.plan import Artifact, StageFn

SYSROOT_SCRIPT = "examples/qemu/make-sysroot.sh"
PYTHON = "usr/bin/python3.11"  # under DIR/root
RUNNER = Path(__file__).with_name("emulated_runner.py")


@dataclass(frozen=True)
class Emulator:
    """qemu-user and a sysroot that together run the target's Python here."""

    qemu: Path
    sysroot: Path

    @property
    def name(self) -> str:
        """The emulator's command name, for messages ("qemu-aarch64-static")."""
        return self.qemu.name


def find_emulator(artifact: Artifact, sysroot: Path | None) -> Emulator | None:
    """Return the emulator that runs ``artifact`` (a module that ``runs_here`` says this machine
    cannot load) here in ``sysroot``, or None: not a TVM module, or no sysroot given.

    Raises:
        PartcError: if a sysroot is given but qemu for the artifact's architecture is not on
            PATH, or the folder is not a finished sysroot for that architecture.
    """
    arch = artifact.info.get("arch")
    if artifact.backend != "tvm" or not arch or sysroot is None:
        return None
    what = f"qemu sysroot {sysroot} (--qemu-sysroot or PARTC_QEMU_SYSROOT)"
    qemu = shutil.which(f"qemu-{arch}-static") or shutil.which(f"qemu-{arch}")
    if qemu is None:
        raise PartcError(f"{what}: qemu-{arch}-static is not on PATH to run stage {artifact.stage} in it; install "
                         "it (Debian: apt-get install qemu-user-static)")
    stamp = sysroot / "complete"
    made = stamp.read_text().split()[0] if stamp.is_file() and stamp.read_text().strip() else None
    if made != arch or not (sysroot / "root" / PYTHON).is_file():
        problem = f"a sysroot for {made}, not {arch}" if made else "not a finished sysroot"
        raise PartcError(f"{what}: {problem} (stage {artifact.stage} is {arch}); make one with "
                         f"{SYSROOT_SCRIPT} DIR")
    return Emulator(Path(qemu), sysroot)


def emulated_stage_fn(artifact: Artifact, emulator: Emulator) -> StageFn:
    """Start ``artifact``'s module in the target's Python under ``emulator`` and wait until it is
    loaded (tens of seconds: nothing else competes with what the caller times next); return a
    ``StageFn`` that sends it one request per call (calls from several threads take turns). The
    child process ends when the returned function is garbage collected.

    Raises:
        RunError: if the child exits (now or during a call), or the module fails on the inputs.
    """
    work = Path(tempfile.mkdtemp(prefix=f"partc-{artifact.stage}-qemu-"))
    log_path = work / "stderr.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [str(emulator.qemu), "-L", str(emulator.sysroot / "root"), str(emulator.sysroot / "root" / PYTHON),
             str(RUNNER), str(artifact.path.resolve()), str(work)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env={"PYTHONPATH": str(emulator.sysroot / "site"), "PYTHONNOUSERSITE": "1"},
        )
    lock = threading.Lock()
    where = f"stage {artifact.stage} ({artifact.path.name}) under {emulator.name}"

    def reply() -> str:
        line = child.stdout.readline().strip()
        if not line:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise RunError(f"{where}: the emulated Python exited ({lines[-1] if lines else 'no output'})")
        if line.startswith("error: "):
            raise RunError(f"{where}: {line.removeprefix('error: ')}")
        return line

    def run(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with lock:
            np.savez(work / "in.npz", *[np.ascontiguousarray(tensors[t.name]) for t in artifact.inputs])
            try:
                child.stdin.write("run\n")
                child.stdin.flush()
            except BrokenPipeError:
                pass  # the child has exited: reply() says so, with its last words
            reply()
            with np.load(work / "out.npz") as arrays:
                return {t.name: arrays[f"arr_{i}"] for i, t in enumerate(artifact.outputs)}

    weakref.finalize(run, _stop, child, work)
    reply()  # "ready": the module is loaded
    return run


def _stop(child: subprocess.Popen, work: Path) -> None:
    """End ``child`` (closing its stdin ends it; kill it if it does not) and remove its folder."""
    child.stdin.close()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    child.stdout.close()
    shutil.rmtree(work, ignore_errors=True)
