"""A build deployed as a user would on separate machines: each tier in its own network namespace.

Every host gets only its tier's bundle and its own token and TLS files, made by the command
of the README's "Deploying to real machines" (run as written, with these hosts' addresses);
it unpacks the bundle, fills in the stage's settings file and starts the stage's script.
A driver in another namespace pings every stage and runs requests through them over TLS
with the token; the results equal the in-process run. Needs root, iproute2 and openssl.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clusters import three_tier

from partc.build import compile_model
from partc.cli import main
from partc.runtime.local import load
from partc.runtime.netns import add_namespace, remove_namespace

ROOT = Path(__file__).parent.parent.parent
PARTC = Path(sys.executable).with_name("partc")
HOSTS = {"device": "10.77.0.2", "edge": "10.77.0.3", "cloud": "10.77.0.4", "driver": "10.77.0.10"}
CLUSTER = three_tier(pin="{device: [conv1], edge: [conv2], cloud: [relu_1]}")
START_TIMEOUT = 120.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None,
                       reason="separate hosts need root (network namespaces), iproute2 and openssl"),
]


def _ip(*argv):
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@pytest.fixture
def lan():
    """One namespace per host, all on one bridge (itself in a namespace of its own); removed at the end."""
    prefix = f"partc-hosts-{os.getpid()}"
    made = []
    try:
        add_namespace(f"{prefix}-lan")
        made.append(f"{prefix}-lan")
        _ip("-n", f"{prefix}-lan", "link", "add", "br0", "type", "bridge")
        _ip("-n", f"{prefix}-lan", "link", "set", "br0", "up")
        for i, (host, address) in enumerate(HOSTS.items()):
            ns = f"{prefix}-{host}"
            add_namespace(ns)
            made.append(ns)
            _ip("link", "add", f"p{i}-{os.getpid()}"[:15], "netns", f"{prefix}-lan", "type", "veth", "peer",
                "name", "eth0", "netns", ns)
            _ip("-n", f"{prefix}-lan", "link", "set", f"p{i}-{os.getpid()}"[:15], "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield {host: f"{prefix}-{host}" for host in HOSTS}
    finally:
        for ns in reversed(made):
            remove_namespace(ns)


def _readme_certificates(folder: Path, hosts: list[str]) -> None:
    """Run the README's token-and-certificates command, as written, for ``hosts``."""
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```sh\n(# token and certificates.*?)```", readme, re.S)
    block, count = re.subn(r'^hosts=".*"$', f'hosts="{" ".join(hosts)}"', block, flags=re.M)
    assert count == 1
    subprocess.run(["sh", "-euc", block], cwd=folder, check=True, capture_output=True, timeout=120)


def _settings(env: Path, values: dict) -> None:
    text = env.read_text()
    for key, value in values.items():
        text, count = re.subn(rf'^{key}=".*"$', f'{key}="{value}"', text, flags=re.M)
        assert count == 1, key
    env.write_text(text)


def test_a_bundle_per_host_started_from_its_settings_serves_the_driver_over_tls(lan, tmp_path):
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    build = compile_model("tests/models.py:residual", ["1,8,16,16"], tmp_path / "cluster.yaml", tmp_path / "b").path
    pki = tmp_path / "pki"
    pki.mkdir()
    _readme_certificates(pki, [HOSTS[t] for t in ("device", "edge", "cloud")])
    chain = {"device.0": "device", "edge.0": "edge", "cloud.0": "cloud"}
    following = {"device.0": "edge", "edge.0": "cloud"}
    processes, logs = {}, {}
    try:
        for stage, tier in chain.items():  # each host: its bundle, its own TLS files and the token, nothing else
            host = tmp_path / tier
            host.mkdir()
            assert main(["bundle", str(build), "--tier", tier, "-o", str(host / f"{tier}.tar.gz")]) == 0
            for name in ("token", "ca.pem", f"{HOSTS[tier]}.pem", f"{HOSTS[tier]}.key"):
                shutil.copy(pki / name, host)
            assert main(["unpack", str(host / f"{tier}.tar.gz"), "-o", str(host / "b")]) == 0
            _settings(host / "b" / f"{stage}.env", {
                "PARTC_LISTEN": f"{HOSTS[tier]}:50051", "PARTC_TOKEN_FILE": host / "token",
                "PARTC_CERT": host / f"{HOSTS[tier]}.pem", "PARTC_KEY": host / f"{HOSTS[tier]}.key",
                "PARTC_ROOT": host / "ca.pem", "PARTC_THREADS": 1,
                **({"PARTC_NEXT": f"{HOSTS[following[stage]]}:50051"} if stage in following else {})})
            logs[stage] = host / "serve.log"
            with open(logs[stage], "wb") as log:
                processes[stage] = subprocess.Popen(
                    ["ip", "netns", "exec", lan[tier], str(host / "b" / f"serve-{stage}.sh")],
                    stdout=log, stderr=subprocess.STDOUT, cwd=host, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not all("serving stage" in logs[s].read_text() for s in chain):
            exited = {s: p.returncode for s, p in processes.items() if p.poll() is not None}
            assert not exited and time.monotonic() < deadline, {s: logs[s].read_text()[-1500:] for s in chain}
            time.sleep(0.2)
        assert not any("WARNING partc.runtime.deploy" in logs[s].read_text() for s in chain)  # token and TLS given

        driver = tmp_path / "driver"
        driver.mkdir()
        for name in ("token", "ca.pem"):
            shutil.copy(pki / name, driver)
        x = np.random.default_rng(0).standard_normal((1, 8, 16, 16), dtype=np.float32)
        np.save(driver / "x.npy", x)
        connect = [arg for stage, tier in chain.items() for arg in ("--connect", f"{stage}={HOSTS[tier]}:50051")]
        secure = ["--token-file", "token", "--root", "ca.pem"]
        on_driver = ["ip", "netns", "exec", lan["driver"], str(PARTC)]
        pinged = subprocess.run([*on_driver, "ping", str(build), *connect, *secure], cwd=driver,
                                capture_output=True, text=True, timeout=120)
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert [line.split(":")[0] for line in pinged.stdout.splitlines()] == [
            f"{stage} at {HOSTS[tier]}" for stage, tier in chain.items()]
        refused = subprocess.run([*on_driver, "ping", str(build), *connect, "--root", "ca.pem"], cwd=driver,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and refused.stdout.count("refused a call with no token") == 3
        ran = subprocess.run([*on_driver, "run", str(build), "--distributed", *connect, *secure, "--requests", "3",
                              "--input", "x.npy", "--output", "y.npy"], cwd=driver, capture_output=True, text=True,
                             timeout=180)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "\n3 requests in " in ran.stdout, ran.stdout
        want = load(build)({"x": x})["output"]
        np.testing.assert_allclose(np.load(driver / "y.npy"), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
