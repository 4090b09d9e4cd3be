"""Bundles that check themselves: bundle, unpack, serve from the archive, ping; hostile archives refused."""

import gzip
import hashlib
import io
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from clusters import two_tier

from partc.build import compile_model
from partc.cli import main
from partc.errors import PartcError
from partc.runtime.bundle import bundle, unpack
from partc.runtime.deploy import connect_build, serve
from partc.runtime.local import load
from partc.runtime.ping import ping

CLUSTER = two_tier("bandwidth: 10Mbit/s, latency: 5ms") + "constraints:\n  pin: {device: [conv1], cloud: [conv2]}\n"
TIER_FILES = ["SHA256SUMS", "manifest.json", "README.md", "cloud.0.onnx", "serve-cloud.0.sh", "cloud.0.env",
              "partc-cloud.0.service"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "cluster.yaml").write_text(CLUSTER)
    return compile_model("tests/models.py:residual", ["1,8,16,16"], folder / "cluster.yaml", folder / "b").path


@pytest.fixture
def good(build, tmp_path):
    path = tmp_path / "cloud.tar.gz"
    assert bundle(build, "cloud", path) == TIER_FILES
    return path


def test_a_bundle_is_the_same_bytes_every_time_and_sha256sum_checks_it(build, good, tmp_path):
    again = tmp_path / "again" / "cloud.tar.gz"
    again.parent.mkdir()
    bundle(build, "cloud", again)
    assert good.read_bytes() == again.read_bytes()
    with tarfile.open(good) as tar:
        assert [m.name for m in tar] == [f"b/{n}" for n in TIER_FILES]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar} == {(0, 0, 0, 0o644), (0, 0, 0, 0o755)}
        tar.extractall(tmp_path / "plain", filter="data")
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "plain" / "b", capture_output=True,
                           text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(TIER_FILES) - 1
    readme = (tmp_path / "plain" / "b" / "README.md").read_text()
    assert readme.startswith('# partc bundle: tier "cloud" of build "b"')
    assert '/opt/partc/venv/bin/pip install "partc[runtime,onnx]"' in readme
    assert 'open it to the machine serving "device.0" and the machine running the driver' in readme


def test_unpack_checks_then_replaces_an_older_bundle_keeping_its_settings(build, good, tmp_path, capsys):
    assert main(["unpack", str(good)]) == 0
    dest = tmp_path / "cloud"
    assert capsys.readouterr().out == f"unpacked {good} into {dest}\n"
    assert sorted(p.name for p in dest.iterdir()) == sorted(TIER_FILES)
    env = (dest / "cloud.0.env").read_text()
    assert f'PARTC="{Path(sys.executable).with_name("partc")}"' in env  # the partc that unpacked it
    (dest / "cloud.0.env").write_text(env.replace('PARTC_TOKEN_FILE=""', 'PARTC_TOKEN_FILE="/etc/partc/token"'))
    assert unpack(good) == dest and 'PARTC_TOKEN_FILE="/etc/partc/token"' in (dest / "cloud.0.env").read_text()
    newer = tmp_path / "newer.tar.gz"  # another bundle: its README names another archive
    bundle(build, "cloud", newer)
    unpack(newer, dest)
    assert "newer.tar.gz" in (dest / "README.md").read_text()
    assert 'PARTC_TOKEN_FILE="/etc/partc/token"' in (dest / "cloud.0.env").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud", "cloud.tar.gz", "newer.tar.gz"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").touch()
    with pytest.raises(PartcError, match=r"mine: exists and is not an unpacked partc bundle; remove it or unpack"):
        unpack(good, tmp_path / "mine")


def test_serve_takes_the_bundle_and_ping_checks_reach_token_and_build(build, good, tmp_path, capsys, caplog):
    (tmp_path / "token").write_text("s3cret\n")
    with caplog.at_level(logging.WARNING, logger="partc.runtime.deploy"):
        server = serve(good, "cloud.0", listen="0.0.0.0:0")
    try:
        assert "stage cloud.0 listens on 0.0.0.0:0 without a token: anyone who reaches that port" in caplog.text
        address = f"127.0.0.1:{server.address.rpartition(':')[2]}"
        assert main(["ping", str(build), "--stage", "device.0", "--connect", f"cloud.0={address}"]) == 0
        line = capsys.readouterr().out
        assert line.startswith(f"cloud.0 at {address}: ok in ") and "serves this build" in line
        assert main(["ping", str(build), "--connect", f"cloud.0={address}"]) == 2
        assert capsys.readouterr().err == "partc: error: no address for stage 'device.0'; give --connect " \
                                          "device.0=HOST:PORT\n"
        other = tmp_path / "other"  # the same stages, another build: its manifest differs by a byte
        shutil.copytree(build, other)
        (other / "manifest.json").write_text((other / "manifest.json").read_text() + " ")
        (answer,) = ping(other, {"cloud.0": address})
        assert not answer.ok and answer.detail.startswith("serves another build (manifest.json sha256 ")
        (answer,) = ping(build, {"device.0": address})
        assert not answer.ok and answer.detail == "serves stage 'cloud.0', not 'device.0': check the address"
    finally:
        server.stop()
    server = serve(tmp_path / "cloud", "cloud.0", security=_token(tmp_path))
    try:
        code = main(["ping", str(build), "--stage", "device.0", "--connect", f"cloud.0={server.address}"])
        out, err = capsys.readouterr()
        assert code == 1 and "FAILED" in out and "refused a call with no token" in out
        assert err == "partc: error: 1 of 1 stages failed the check: cloud.0\n"
        assert main(["ping", str(build), "--stage", "device.0", "--connect", f"cloud.0={server.address}",
                     "--token-file", str(tmp_path / "token")]) == 0
    finally:
        server.stop()


def _token(tmp_path):
    from partc.runtime.transport import Security

    return Security.from_files(tmp_path / "token")


def test_a_served_bundle_computes_what_the_build_does(build, good):
    server = serve(good, "cloud.0")
    device = serve(build, "device.0", next_address=server.address)
    x = {"x": np.random.default_rng(0).standard_normal((1, 8, 16, 16), dtype=np.float32)}
    try:
        with connect_build(build, {"device.0": device.address, "cloud.0": server.address}) as driver:
            np.testing.assert_array_equal(driver.run_one(x)["output"], load(build)(x)["output"])
    finally:
        device.stop()
        server.stop()


def test_bundle_refuses_a_link_out_of_the_build_and_follows_one_within(build, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    outside = tmp_path / "elsewhere.onnx"
    (copy / "cloud.0.onnx").rename(outside)
    (copy / "cloud.0.onnx").symlink_to(outside)
    with pytest.raises(PartcError, match=rf"b/cloud.0.onnx: a symbolic link to {outside}, outside the build"):
        bundle(copy, "cloud", tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()
    shutil.move(outside, copy / "real.onnx")
    (copy / "cloud.0.onnx").unlink()
    (copy / "cloud.0.onnx").symlink_to("real.onnx")
    bundle(copy, "cloud", tmp_path / "x.tar.gz")
    with tarfile.open(tmp_path / "x.tar.gz") as tar:
        assert tar.getmember("b/cloud.0.onnx").isreg()


def _members(path):
    """(TarInfo, bytes) of every member of a bundle."""
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]


def _write(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _special(name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _sums(members):
    """``members`` with SHA256SUMS made to match them (a consistent forgery)."""
    text = "".join(f"{hashlib.sha256(d).hexdigest()}  {m.name.split('/', 1)[1]}\n" for m, d in members[1:])
    return [(members[0][0], text.encode()), *members[1:]]


def _flip(data):
    return data[:-1] + bytes([data[-1] ^ 1])


HOSTILE = {
    "dotdot": (lambda m: [*m, (tarfile.TarInfo("b/../evil"), b"x")], r"member 'b/\.\./evil': not BUILD/FILE"),
    "absolute": (lambda m: [*m, (tarfile.TarInfo("/tmp/partc-test-evil"), b"x")],
                 r"member '/tmp/partc-test-evil': not BUILD/FILE"),
    "subfolder": (lambda m: [*m, (tarfile.TarInfo("b/sub/evil"), b"x")], r"member 'b/sub/evil': not BUILD/FILE"),
    "other folder": (lambda m: [*m, (tarfile.TarInfo("c/evil"), b"x")], r"member 'c/evil': outside the bundle's"),
    "symlink": (lambda m: [*m, (_special("b/evil", tarfile.SYMTYPE, "/etc/passwd"), b"")],
                r"member 'b/evil' is a symbolic link; a bundle holds regular files only"),
    "hard link": (lambda m: [*m, (_special("b/evil", tarfile.LNKTYPE, "/etc/passwd"), b"")],
                  r"member 'b/evil' is a hard link"),
    "device": (lambda m: [*m, (_special("b/evil", tarfile.CHRTYPE), b"")], r"member 'b/evil' is a device file"),
    "unlisted": (lambda m: [*m, (tarfile.TarInfo("b/evil"), b"x")], r"member 'b/evil': not listed in SHA256SUMS"),
    "twice": (lambda m: [*m, m[3]], r"member 'b/cloud\.0\.onnx': appears twice"),
    "sums not first": (lambda m: m[1:] + m[:1], r"member 'b/manifest\.json': the first member must be b/SHA256SUMS"),
    "missing": (lambda m: m[:3] + m[4:], r"b/cloud\.0\.onnx is listed in SHA256SUMS but not in the archive"),
    "tampered": (lambda m: [*m[:3], (m[3][0], _flip(m[3][1])), *m[4:]],
                 r"member 'b/cloud\.0\.onnx': does not match its sha256 in SHA256SUMS \(corrupt or tampered\)"),
    "forged sums": (lambda m: _sums([*m[:3], (m[3][0], _flip(m[3][1])), *m[4:]]),
                    r"b/manifest\.json: stages\[1\]\.programs\[0\]\.artifact: 'cloud\.0\.onnx' is not the one"),
}


@pytest.mark.parametrize("case", [*HOSTILE, "truncated", "not gzip"])
def test_a_hostile_or_broken_archive_is_refused_and_nothing_is_written(case, good, tmp_path, capsys):
    bad = tmp_path / "bad.tar.gz"
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        expected = r"truncated or not a \.tar\.gz \(.*\); copy the bundle again"
    elif case == "not gzip":
        bad.write_bytes(gzip.compress(b"not a tar file" * 100))
        expected = r"truncated or not a \.tar\.gz"
    else:
        edit, expected = HOSTILE[case]
        _write(bad, edit(_members(good)))
    before = sorted(tmp_path.rglob("*"))
    assert main(["unpack", str(bad), "-o", str(tmp_path / "node")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"partc: error: {bad}: ") and re.search(expected, err), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the folder
    assert not Path("/tmp/partc-test-evil").exists()
    with pytest.raises(PartcError, match=re.escape(str(bad))):
        serve(bad, "cloud.0")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_start_script_says_what_is_missing_before_it_starts(build, tmp_path):
    bundle(build, "device", tmp_path / "device.tar.gz")
    folder = unpack(tmp_path / "device.tar.gz")
    script = [str(folder / "serve-device.0.sh")]
    result = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == (
        f"serve-device.0.sh: set PARTC_NEXT in {folder}/device.0.env to HOST:PORT of the machine serving stage "
        "cloud.0\n")
    env = folder / "device.0.env"
    env.write_text(re.sub(r'^PARTC=".*"$', 'PARTC=""', env.read_text(), flags=re.M))
    result = subprocess.run(script, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 127 and result.stderr == (
        "serve-device.0.sh: partc not found: install it (pip install 'partc[runtime]') and set PARTC in "
        f"{folder}/device.0.env to it\n")
