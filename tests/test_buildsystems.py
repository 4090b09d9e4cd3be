"""examples/build driven by real make, ninja and CMake (+ ninja): partc compile as a build step.

Each tool builds the example (compile + one bundle per tier), then must find nothing to do,
then must find the build out of date after any input listed in partc's depfile is touched
(asked with a dry run, the input's time put back after); make then rebuilds for real after
the model source is touched, to the same bytes. ninja and cmake come from PyPI (the ``test``
extra).
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import partc.targets
import partc.version

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent  # the venv's partc, ninja and cmake
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
SHIPPED = Path(partc.targets.__file__).resolve().parent
# Files the tests do not own: their times are put back, under a lock, since tests run in parallel.
SHARED_INPUTS = {"target description": SHIPPED / "descriptions" / "rpi4.yaml",
                 "calibration": SHIPPED / "calibration.json", "partc version": Path(partc.version.__file__)}

pytestmark = pytest.mark.slow


def _tool(name):
    path = shutil.which(name, path=ENV["PATH"])
    if path is None:
        pytest.skip(f"{name} not found: pip install -e '.[test]' (ninja, cmake) or apt-get install make")
    return path


def _run(argv, cwd):
    result = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout + result.stderr


@pytest.fixture
def example(tmp_path):
    """A copy of examples/build and the model beside it, as in the repository."""
    (tmp_path / "examples").mkdir()
    shutil.copytree(ROOT / "examples" / "build", tmp_path / "examples" / "build")
    shutil.copy(ROOT / "examples" / "tiny_cnn.py", tmp_path / "examples")
    return tmp_path / "examples" / "build"


class Tool:
    """How to build, and dry-run, examples/build with one build system; ``out`` holds the results."""

    def __init__(self, name, folder, tmp):
        self.name, self.folder = name, folder
        if name == "make":
            self.build, self.dry, self.out = [_tool("make")], [_tool("make"), "-n"], folder / "out"
        elif name == "ninja":
            self.build, self.dry, self.out = [_tool("ninja")], [_tool("ninja"), "-n"], folder / "out"
        else:
            self.out = tmp / "cmake-build"
            _run([_tool("cmake"), "-S", str(folder), "-B", str(self.out), "-G", "Ninja",
                  f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"], folder)
            self.build = [_tool("cmake"), "--build", str(self.out)]
            self.dry = [_tool("ninja"), "-C", str(self.out), "-n"]
        self.manifest = self.out / "tiny" / "manifest.json"

    def run(self):
        return _run(self.build, self.folder)

    def out_of_date(self):
        return "partc compile" in _run(self.dry, self.folder)


@pytest.fixture
def inputs_lock():
    """A lock on the target descriptions' folder, held shared for the whole test; ``_touched`` holds it
    alone while a shared input is newer than it was."""
    lock = os.open(SHIPPED / "descriptions", os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield lock
    finally:
        os.close(lock)


@contextlib.contextmanager
def _touched(path, lock):
    """``path`` a minute newer than anything built, then its times as they were."""
    fcntl.flock(lock, fcntl.LOCK_EX)
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, time.time_ns() + 60 * 10**9))
    try:
        yield
    finally:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        fcntl.flock(lock, fcntl.LOCK_SH)


@pytest.mark.parametrize("name", ["make", "ninja", "cmake"])
def test_a_build_system_rebuilds_exactly_when_an_input_changes(name, example, tmp_path, inputs_lock):
    tool = Tool(name, example, tmp_path)
    assert "partc compile" in tool.run()
    bundles = [tool.out / f"{tier}.tar.gz" for tier in ("device", "cloud")]
    assert tool.manifest.is_file() and all(b.is_file() for b in bundles)
    built = tool.manifest.stat().st_mtime_ns
    first = tmp_path / "first"
    shutil.copytree(tool.out / "tiny", first)

    assert "partc" not in tool.run()  # no-op
    assert tool.manifest.stat().st_mtime_ns == built and not tool.out_of_date()
    for what, path in {"model source": example.parent / "tiny_cnn.py", "cluster file": example / "cluster.yaml",
                       **SHARED_INPUTS}.items():
        with _touched(path, inputs_lock):
            assert tool.out_of_date(), f"{name} does not rebuild when the {what} changes"
        assert not tool.out_of_date()

    if name != "make":
        return  # the dry runs above are the tool's own decision; what a rebuild does is partc's, the same for all
    os.utime(example.parent / "tiny_cnn.py")  # touch: now newer than the build
    log = tool.run()
    assert "partc compile" in log and "partc bundle" in log
    assert tool.manifest.stat().st_mtime_ns > built and not tool.out_of_date()
    assert "partc" not in tool.run()

    # the same inputs give the same bytes, manifest and artifacts included
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in (tool.out / "tiny").iterdir())
    for file in names:
        assert (first / file).read_bytes() == (tool.out / "tiny" / file).read_bytes(), file
