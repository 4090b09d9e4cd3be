"""Bundles: what one tier's machines need from a build, as one ``.tar.gz`` that checks itself.

``bundle`` writes, all under one folder named after the build, ``SHA256SUMS`` first (the
sha256 of every other member, in ``sha256sum`` format), ``manifest.json``, the tier's
``README.md``, and for each stage of the tier its artifacts, ``serve-<stage>.sh``,
``<stage>.env`` and ``partc-<stage>.service``. Members are regular files in that order,
with fixed owner, modes and time, and the gzip stream carries no name or time: the same
build gives the same bytes. A file of the build that is a symbolic link out of the build
folder is refused, not archived.

``unpack`` takes such an archive apart only as far as it is one. Every member must be a
regular file named ``BUILD/FILE`` (no absolute path, no ``..``, no subfolder, no link, no
device), ``SHA256SUMS`` first, every later member listed there and matching its sha256,
every listed file present, and each artifact's sha256 equal to the manifest's. Files are
written, never through a link, into a new hidden folder beside the destination, which is
renamed into place only when all of it checks out; anything else leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from partc.deployment import stage_files, tier_readme
from partc.errors import ManifestError, PartcError
from partc.manifest import MANIFEST, manifest_stages, read_manifest

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
SUFFIXES = (".tar.gz", ".tgz")
_CHUNK = 1 << 20
_MAX_SUMS_BYTES = 1 << 20


def is_bundle(path: Path | str) -> bool:
    """Whether ``path`` names a bundle archive (a file ending in ``.tar.gz`` or ``.tgz``)."""
    return str(path).endswith(SUFFIXES) and Path(path).is_file()


def bundle(build: Path | str, tier: str, output: Path | str) -> list[str]:
    """Python twin of ``partc bundle``: write what ``tier``'s machines need as a .tar.gz.

    See the module docstring for what it holds. The artifacts are verified against the
    manifest first; the archive is written to a temporary file and renamed into place.
    Returns the archived file names, in archive order.

    Raises:
        ManifestError: for a bad manifest or a missing or tampered artifact.
        PartcError: if no stage of the build runs on ``tier``, or a file of the build is a
            symbolic link to a file outside it.
    """
    build = Path(build)
    folder = build if build.is_dir() else build.parent
    manifest = read_manifest(build)
    names = [s.name for s in manifest.stages if s.tier == tier]
    if not names:
        tiers = ", ".join(dict.fromkeys(s.tier for s in manifest.stages))
        raise PartcError(f"no stage of this build runs on tier {tier!r}; tiers with stages: {tiers}")
    manifest_stages(manifest, folder, verify=names)
    top, output = folder.resolve().name, Path(output)
    files: dict[str, Path | bytes] = {MANIFEST: _inside(folder, MANIFEST),
                                      "README.md": tier_readme(manifest, tier, top, output.name).encode()}
    files |= {name: _inside(folder, name) for stage in names for name in stage_files(manifest, stage)}
    sums = "".join(f"{_sha256(data)}  {name}\n" for name, data in files.items()).encode()
    if output.is_dir():
        raise PartcError(f"{output}: is a folder; give the archive's file name (e.g. {output / (tier + '.tar.gz')})")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PartcError(f"{output.parent}: cannot make the archive's folder: {err.strerror or err}") from None
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in {SUMS: sums, **files}.items():
                with _open(data) as source:
                    size = source.seek(0, io.SEEK_END)
                    source.seek(0)
                    archive.addfile(_member(f"{top}/{name}", size), source)
        tmp.replace(output)
    except OSError as err:
        raise PartcError(f"{output}: cannot write the archive: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return [SUMS, *files]


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` with links followed, refusing one that leads out of ``folder``."""
    path = folder / name
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise PartcError(f"{path}: a symbolic link to {real}, outside the build; a bundle holds only the build's own "
                         "files: copy the file into the build or recompile")
    if not real.is_file():
        raise PartcError(f"{path}: not found; recompile the build")
    return real


def _open(data: Path | bytes):
    """A binary file object of ``data`` (a file, or its bytes)."""
    return io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")


def _sha256(data: Path | bytes) -> str:
    digest = hashlib.sha256()
    with _open(data) as f:
        for chunk in _chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o755 if name.endswith(".sh") else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack(archive: Path | str, dest: Path | str | None = None) -> Path:
    """Python twin of ``partc unpack``: check the bundle ``archive`` and unpack it into ``dest``.

    ``dest`` (default: the archive's path without ``.tar.gz``) receives the bundle's files
    directly. If it holds an older unpacked bundle, that is replaced (its ``*.env`` settings
    files are kept for the stages the new bundle has); if it holds this very bundle, it is
    left as it is. Each ``<stage>.env``'s empty ``PARTC`` is set to the partc running this,
    so the start scripts run it. Returns ``dest``.

    Raises:
        PartcError: naming the archive and the member, for an archive that is truncated,
            not a bundle, or holds anything but the checked files of one (see the module
            docstring); or if ``dest`` exists and is not an unpacked bundle.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise PartcError(f"{archive}: not found")
    if dest is None:
        if not archive.name.endswith(SUFFIXES):
            raise PartcError(f"{archive}: a bundle ends in .tar.gz; give the folder to unpack it into (-o DIR)")
        dest = archive.with_name(next(archive.name[: -len(s)] for s in SUFFIXES if archive.name.endswith(s)))
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise PartcError(f"{dest}: exists and is not a folder; remove it or unpack elsewhere (-o DIR)")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / SUMS).is_file():
        raise PartcError(f"{dest}: exists and is not an unpacked partc bundle; remove it or unpack elsewhere (-o DIR)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        top, sums = _extract(archive, staging)
        unpacked = staging / top
        _check_manifest(archive, unpacked, top, sums)
        if (dest / SUMS).is_file() and (dest / SUMS).read_bytes() == (unpacked / SUMS).read_bytes():
            log.info("%s: already unpacked in %s", archive, dest)
            return dest
        _set_partc(unpacked)
        if dest.is_dir():
            for old in dest.glob("*.env"):
                if (unpacked / old.name).is_file():
                    shutil.copyfile(old, unpacked / old.name)
            dest.rename(staging / ".old")
        try:
            unpacked.rename(dest)
        except OSError:
            if (staging / ".old").is_dir():
                (staging / ".old").rename(dest)
            raise
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Path, staging: Path) -> tuple[str, dict[str, str]]:
    """Write the members of ``archive`` under ``staging/BUILD``, checking each; return BUILD and the sums."""
    top, sums, seen = None, None, set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                where = f"{archive}: member {member.name!r}"
                kind = _kind(member)
                if kind:
                    raise PartcError(f"{where} is {kind}; a bundle holds regular files only, refused")
                parts = member.name.split("/")
                if len(parts) != 2 or not all(p and not p.startswith(".") and "\\" not in p for p in parts):
                    raise PartcError(f"{where}: not BUILD/FILE (an absolute path, '..' or a subfolder); refused")
                if top is None:
                    top = parts[0]
                    (staging / top).mkdir()
                name = parts[1]
                if parts[0] != top:
                    raise PartcError(f"{where}: outside the bundle's folder {top!r}; refused")
                if name in seen:
                    raise PartcError(f"{where}: appears twice; refused")
                if sums is None and name != SUMS:
                    raise PartcError(f"{where}: the first member must be {top}/{SUMS}; not a partc bundle")
                if sums is not None and name not in sums:
                    raise PartcError(f"{where}: not listed in {SUMS}; refused")
                if sums is None and member.size > _MAX_SUMS_BYTES:
                    raise PartcError(f"{where}: {member.size} bytes is too large for a {SUMS}; not a partc bundle")
                digest = _write(tar.extractfile(member), staging / top / name, member.mode)
                if sums is None:
                    sums = _parse_sums((staging / top / name).read_bytes(), where)
                elif digest != sums[name]:
                    raise PartcError(f"{where}: does not match its sha256 in {SUMS} (corrupt or tampered); "
                                     "copy the bundle again")
                seen.add(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise PartcError(f"{archive}: truncated or not a .tar.gz ({err}); copy the bundle again") from err
    if sums is None:
        raise PartcError(f"{archive}: empty; not a partc bundle")
    missing = sorted(set(sums) - seen)
    if missing:
        raise PartcError(f"{archive}: {top}/{missing[0]} is listed in {SUMS} but not in the archive (truncated?); "
                         "copy the bundle again")
    return top, sums


def _kind(member: tarfile.TarInfo) -> str:
    """What ``member`` is, when it is not a regular file ("" when it is)."""
    if member.isreg():
        return ""
    kinds = [(member.issym(), "a symbolic link"), (member.islnk(), "a hard link"), (member.isdir(), "a folder"),
             (member.ischr() or member.isblk(), "a device file"), (member.isfifo(), "a FIFO")]
    return next((text for test, text in kinds if test), "not a regular file")


def _write(source, path: Path, mode: int) -> str:
    """Copy ``source`` to the new file ``path`` (never through a link); return its sha256."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if mode & 0o111 else 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in _chunks(source):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _chunks(source) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        yield chunk


def _parse_sums(data: bytes, where: str) -> dict[str, str]:
    """``name -> sha256`` from ``sha256sum`` output."""
    sums = {}
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name or name.startswith(".") or name in sums:
            raise PartcError(f"{where}: line {i} is not 'SHA256  FILE' naming a new file; not a partc bundle")
        sums[name] = digest
    return sums


def _check_manifest(archive: Path, folder: Path, top: str, sums: dict[str, str]) -> None:
    """Check that the bundle's manifest is valid and names, with the same sha256, every artifact of its stages."""
    try:
        manifest = read_manifest(folder)
    except ManifestError as err:
        raise ManifestError(f"{archive}: " + str(err).replace(str(folder), top)) from None
    stages = {name[len("serve-"): -len(".sh")] for name in sums if name.startswith("serve-") and name.endswith(".sh")}
    for i, stage in enumerate(manifest.stages):
        for j, program in enumerate(stage.programs if stage.name in stages else ()):
            if sums.get(program.artifact) != program.sha256:
                state = "missing" if program.artifact not in sums else "not the one manifest.json names (sha256)"
                raise ManifestError(f"{archive}: {top}/{MANIFEST}: stages[{i}].programs[{j}].artifact: "
                                    f"{program.artifact!r} is {state}; the bundle was altered, make it again")


def _set_partc(folder: Path) -> None:
    """Fill the empty ``PARTC=""`` of each settings file with the partc running this."""
    script = Path(sys.executable).with_name("partc")
    command = str(script) if script.is_file() else f"{sys.executable} -m partc.cli"
    if any(c in command for c in '"$`\\\n'):
        return  # not expressible in the settings file's quotes: the start script looks for partc on PATH
    for env in folder.glob("*.env"):
        text = env.read_text()
        env.write_text(text.replace('\nPARTC=""\n', f'\nPARTC="{command}"\n', 1))
