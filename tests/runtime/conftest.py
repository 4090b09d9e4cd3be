"""Fixtures for the runtime tests: worker processes and in-process gRPC servers, always cleaned up."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import stagefns

from partc.runtime.routes import plan_routes
from partc.runtime.transport import NO_SECURITY
from partc.runtime.worker import serve_stage

HERE = Path(__file__).parent
START_TIMEOUT = 90.0  # seconds for worker processes to come up (importing partc imports torch)


def bounded(fn, seconds):
    """Run ``fn()`` in a thread; fail the test if it has not returned within ``seconds``.

    Returns what ``fn`` returned, or raises what it raised.
    """
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: the runtime hung")
    if "error" in box:
        raise box["error"]
    return box["value"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Processes:
    specs: list  # StageSpec with addresses, in chain order
    procs: dict  # stage name -> Popen
    logs: dict  # stage name -> log path

    def log_tail(self):
        return "\n".join(f"--- {n}\n{p.read_text()[-2000:]}" for n, p in self.logs.items() if p.exists())


@pytest.fixture(scope="module")
def worker_processes(tmp_path_factory):
    """Start the three stages of ``stagefns`` as ``python -m partc.runtime.worker`` processes."""
    started = []
    tmp_path = tmp_path_factory.mktemp("workers")

    def start(factory="stagefns:make", token=None):
        ports = [free_port() for _ in stagefns.STAGES]
        specs = [dataclasses.replace(s, address=f"127.0.0.1:{p}") for s, p in zip(stagefns.STAGES, ports, strict=True)]
        routes = plan_routes(specs, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        procs, logs, ready = {}, {}, {}
        for spec, route in zip(specs, routes, strict=True):
            ready[spec.name] = tmp_path / f"{spec.name}.ready"
            logs[spec.name] = tmp_path / f"{spec.name}.log"
            argv = [
                sys.executable,
                "-m",
                "partc.runtime.worker",
                "--stage",
                spec.name,
                "--fn",
                factory,
                "--listen",
                spec.address,
                "--ready-file",
                str(ready[spec.name]),
                "--reads",
                ",".join(route.inputs),
                "--writes",
                ",".join(route.outputs),
                "--forward",
                ",".join(route.forward),
                "--results",
                ",".join(route.results),
                "--threads",
                "8",
            ]
            if route.next_stage:
                argv += ["--next", f"{route.next_stage}={route.next_address}"]
            if token:
                (tmp_path / "token").write_text(token + "\n")
                argv += ["--token-file", str(tmp_path / "token")]
            with open(logs[spec.name], "w") as log:
                procs[spec.name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
            started.append(procs[spec.name])
        result = Processes(specs, procs, logs)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(p.exists() for p in ready.values()):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"workers did not start (exited: {dead}):\n{result.log_tail()}")
            time.sleep(0.05)
        for spec in specs:
            assert json.loads(ready[spec.name].read_text())["address"] == spec.address
        return result

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def grpc_chain():
    """Serve the stages of ``stagefns`` over gRPC from threads of this process (real sockets)."""
    servers = []

    def start(fns=None, security=NO_SECURITY, **options):
        fns = fns or stagefns.FNS
        routes = plan_routes(stagefns.STAGES, stagefns.MODEL_INPUTS, stagefns.MODEL_OUTPUTS)
        chain, next_address = [], None
        for route in reversed(routes):
            route = dataclasses.replace(route, next_address=next_address)
            server = serve_stage({0: route}, {0: fns[route.stage]}, "127.0.0.1:0", security, **options)
            servers.append(server)
            chain.insert(0, server)
            next_address = server.address
        return [dataclasses.replace(s, address=srv.address) for s, srv in zip(stagefns.STAGES, chain, strict=True)]

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl CLI; the cryptography package is not installed)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(tmp / "key.pem"),
            "-out",
            str(tmp / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return tmp / "cert.pem", tmp / "key.pem"
