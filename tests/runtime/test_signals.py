"""A stop signal ends a command cleanly (issue 17, item 3): one line on stderr, exit 128 + the signal's number, and
nothing of the command is left behind: no worker or proxy process, no namespace, no cgroup, no temporary or
staging folder."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from clusters import two_tier

from partc.build import compile_model
from partc.runtime.netns import CGROUP_CPU

ROOT = Path(__file__).parents[2]
CLUSTER = two_tier("bandwidth: 100Mbit/s, latency: 1ms") + "constraints:\n  pin: {device: [conv1], cloud: [conv2]}\n"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    (folder / "cluster.yaml").write_text(CLUSTER)
    return compile_model("tests/models.py:residual", ["1,8,16,16"], folder / "cluster.yaml", folder / "b").path


# partc's command line, dumping every thread's stack on SIGUSR1 (to tell where it hangs, if it does)
PARTC = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "sys.argv[0] = 'partc'; from partc.cli import entry; entry()")


def start(tmp: Path, *argv):
    """``partc ARGV`` in a process of its own, its temporary files in ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen([sys.executable, "-c", PARTC, *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def ours(tmp: Path) -> list[str]:
    """What partc left in the temporary folder ``tmp`` (torch and ONNX Runtime keep caches there)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("partc-", ".b.")))


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid``."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_for(condition, process, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stop(process, signum):
    """Send ``signum``; return the exit code and stderr."""
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        process.kill()
        pytest.fail(f"still running 60 s after {signal.Signals(signum).name}:\n{process.communicate()[1][-8000:]}")
    return process.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_compile_stopped_while_emitting_leaves_no_staging_folder(tmp_path, signum):
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    (tmp_path / "tmp").mkdir()
    process = start(tmp_path / "tmp", "compile", "tests/models.py:residual", "--input-shape", "1,8,16,16",
                    "--cluster", tmp_path / "cluster.yaml", "-o", tmp_path / "b")
    lines = []
    wait_for(lambda: lines.append(process.stderr.readline()) or lines[-1].startswith("partc: emitting"), process)
    code, err = stop(process, signum)
    assert code == 128 + signum
    assert err.splitlines()[-1] == f"partc: error: stopped by {signal.Signals(signum).name}"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml", "tmp"]  # no staging folder
    assert ours(tmp_path / "tmp") == []


def test_run_distributed_stopped_leaves_no_worker_and_no_folder(build, tmp_path):
    process = start(tmp_path, "run", build, "--distributed", "--requests", "1000000")
    workers = set()

    def running():
        workers.update(descendants(process.pid))
        scratch = list(tmp_path.glob("partc-workers-*"))
        return len(workers) >= 2 and scratch and len(list(scratch[0].glob("*.ready"))) == 2

    wait_for(running, process)
    time.sleep(1.0)  # requests in flight
    code, err = stop(process, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "partc: error: stopped by SIGTERM" and "Traceback" not in err
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert ours(tmp_path) == []


def test_serve_stopped_and_continued_still_stops_on_sigterm(build, tmp_path):
    """A worker that was paused (SIGSTOP) and resumed (SIGCONT) still ends on the next SIGTERM, cleanly."""
    for trial in range(3):
        ready = tmp_path / f"ready-{trial}.json"
        process = start(tmp_path, "serve", build, "--stage", "cloud.0", "--ready-file", ready)
        wait_for(ready.exists, process)
        process.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        process.send_signal(signal.SIGCONT)
        code, err = stop(process, signal.SIGTERM)
        assert code == 0, err
        assert "Traceback" not in err and "stopped by SIGTERM" in err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None or not (CGROUP_CPU / "cpu.cfs_quota_us").is_file(),
                    reason="the testbed needs root, iproute2 (ip, tc) and the cgroup v1 cpu controller")
def test_testbed_stopped_leaves_no_namespace_cgroup_process_or_folder(build):
    tmp = Path(tempfile.mkdtemp(prefix="partc-test-"))  # short: the driver's Unix socket lives there
    try:
        stopped_testbed_leaves_nothing(build, tmp)
    finally:
        shutil.rmtree(tmp)


def stopped_testbed_leaves_nothing(build, tmp):
    process = start(tmp, "testbed", build, "--requests", "1000000")
    prefix = f"partc-{process.pid}-"
    made = set()

    def namespaces():
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.startswith(prefix)}

    def running():
        made.update(descendants(process.pid))
        scratch = list(tmp.glob("partc-testbed-*"))
        return scratch and len(list(scratch[0].glob("*.ready"))) == 3  # 2 workers, the cloud's delay proxy

    wait_for(running, process)
    assert len(namespaces()) == 2 and len(list(CGROUP_CPU.glob(prefix + "*"))) == 2
    time.sleep(1.0)  # requests in flight
    code, err = stop(process, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "partc: error: stopped by SIGTERM" and "Traceback" not in err
    assert namespaces() == set() and list(CGROUP_CPU.glob(prefix + "*")) == []
    assert len(made) >= 3 and not any(Path(f"/proc/{pid}").exists() for pid in made)
    assert ours(tmp) == []
