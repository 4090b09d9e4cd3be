"""The Linux plumbing of the testbed (``partc.runtime.testbed``): namespaces, links, CPU quotas.

- **Namespaces.** Each node gets a network namespace with its loopback up; two nodes are
  joined by a veth pair whose addresses (``<subnet>.1`` and ``<subnet>.2``) exist only
  inside the namespaces, so parallel testbeds never collide.
- **Bandwidth.** Each direction of a link is shaped by an egress ``tbf`` qdisc on its end
  of the veth (netem is not available: tbf shapes the rate, its ``latency`` only bounds
  the queue). tbf counts whole frames, so TCP payload gets about 95% of the rate, as on a
  real link of that line rate.
- **Latency.** One-way delay is emulated in user space: a forwarding proxy
  (``python -m partc.runtime.delayproxy``) in the receiving namespace holds every chunk, in
  either direction, until its arrival + the link's latency before passing it on. The
  runtime's transport is untouched. The delay is changed at run time through the proxy's
  stdin.
- **CPU.** A process is limited by a cgroup (v1 ``cpu`` controller) under ``CGROUP_CPU``
  with ``cfs_quota_us = share x cfs_period_us``. The period is short (``CFS_PERIOD_US``,
  20 ms): a stage that waits between requests starts each one with a full period's quota, and
  runs at this host's full speed until it has used it up; with the kernel's default 100 ms a
  0.45-core stage computed 14 ms bursts at full speed (googlenet in
  ``benchmarks/results/tiling.md``), twice as fast as its share. 20 ms keeps the smallest
  share (``partc.runtime.layout.MIN_SHARE``, 0.05 cores) at the kernel's least quota, 1 ms.

Everything here needs root; ``check_privileges`` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from partc.errors import PartcError, RunError

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 20_000  # see the module docstring


def check_privileges() -> None:
    """Raise unless this process can make namespaces, shape links and make cgroups.

    Raises:
        PartcError: when not root, when ``ip`` or ``tc`` is missing, or without a cgroup v1
            ``cpu`` controller at ``CGROUP_CPU``.
    """
    if os.geteuid() != 0:
        raise PartcError("partc testbed needs root (network namespaces, tc and cgroups); run it with sudo")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise PartcError(f"partc testbed needs '{missing[0]}' (iproute2); install the iproute2 package")
    if not (CGROUP_CPU / "cpu.cfs_quota_us").is_file():
        raise PartcError(f"partc testbed needs the cgroup v1 cpu controller mounted at {CGROUP_CPU}")


def _sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RunError(f"testbed: '{' '.join(argv)}' failed: {result.stderr.strip() or result.returncode}")


def add_namespace(ns: str) -> None:
    """Make the network namespace ``ns`` with its loopback up (none is left if that fails).

    Raises:
        RunError: if ``ip`` fails.
    """
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    except RunError:
        remove_namespace(ns)
        raise


def remove_namespace(ns: str) -> None:
    """Delete the network namespace ``ns`` (its veth pairs go with it).

    Raises:
        RunError: naming the namespace, if ``ip`` fails.
    """
    result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
    if result.returncode != 0:
        raise RunError(f"namespace {ns}: {result.stderr.strip()}")


def add_veth(src: tuple[str, str], dst: tuple[str, str], subnet: str) -> None:
    """Join two namespaces by a veth pair, up, addressed ``<subnet>.1/24`` and ``<subnet>.2/24``.

    ``src`` and ``dst`` are (namespace, device name of the pair's end there).

    Raises:
        RunError: if ``ip`` fails.
    """
    (src_ns, out), (dst_ns, into) = src, dst
    _sh("ip", "link", "add", out, "netns", src_ns, "type", "veth", "peer", "name", into, "netns", dst_ns)
    for ns, dev, host in ((src_ns, out, 1), (dst_ns, into, 2)):
        _sh("ip", "-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")


def set_rate(ends: Iterable[tuple[str, str]], bandwidth: float) -> None:
    """Limit the egress of each (namespace, device) of ``ends`` to ``bandwidth`` bytes/s (tbf).

    Takes effect at once, also for transfers under way.

    Raises:
        RunError: if ``tc`` fails.
    """
    rate = f"{round(bandwidth * 8)}bit"
    burst = str(max(4096, round(bandwidth * 0.005)))
    limit = str(max(65536, round(bandwidth * 0.1)))
    for ns, dev in ends:
        _sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
            "limit", limit)


def make_cgroup(name: str, share: float) -> Path:
    """Make the cgroup ``CGROUP_CPU/name``, limited to ``share`` cores; return its folder.

    Raises:
        OSError: if it cannot be made or limited (then none is left).
    """
    cgroup = CGROUP_CPU / name
    cgroup.mkdir()
    try:
        (cgroup / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cgroup / "cpu.cfs_quota_us").write_text(str(max(1000, round(share * CFS_PERIOD_US))))
    except OSError:
        cgroup.rmdir()
        raise
    return cgroup


def move_to_cgroup(cgroup: Path, pid: int) -> None:
    """Move process ``pid``, every thread of it, into ``cgroup``.

    Raises:
        OSError: if the kernel refuses.
    """
    (cgroup / "cgroup.procs").write_text(str(pid))


def remove_cgroup(cgroup: Path) -> None:
    """Move the processes left in ``cgroup`` back to the root cgroup, then remove it.

    Raises:
        OSError: if the kernel refuses.
    """
    for pid in (cgroup / "cgroup.procs").read_text().split():
        (CGROUP_CPU / "cgroup.procs").write_text(pid)
    cgroup.rmdir()


def start_proxy(ns: str, listen: str, to: str, delay: float, ready: Path, log_path: Path) -> subprocess.Popen:
    """Start a delay proxy in namespace ``ns`` from ``listen`` to ``to``, without waiting for it.

    It writes ``ready`` once it listens (``partc.runtime.deploy.wait_ready``) and its output
    to ``log_path``; ``set_delay`` changes its delay.
    """
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "partc.runtime.delayproxy",
            "--listen", listen, "--to", to, "--delay", repr(delay), "--ready-file", str(ready)]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT)


def set_delay(proxy: subprocess.Popen, latency: float) -> None:
    """Make ``proxy`` (from ``start_proxy``) delay the chunks that arrive from now on by ``latency`` s."""
    proxy.stdin.write(f"{latency!r}\n".encode())
    proxy.stdin.flush()
