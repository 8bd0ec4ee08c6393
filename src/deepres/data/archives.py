"""Files on disk: the cache folder, verified downloads and safe archive extraction.

Archives come from the internet or from users, so extraction trusts nothing: a member that would land outside the
destination (an absolute name, a ``..`` component, a symbolic or hard link, a device) is refused with an error naming
it, and nothing is left half-extracted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path
from urllib.request import urlopen

__all__ = [
    "cache_root",
    "download",
    "extract_archive",
    "extract_into",
    "extracted_archive",
    "file_fingerprint",
    "is_archive",
    "md5sum",
]

log = logging.getLogger("deepres.data")

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Written last into an extraction folder: its presence means the extraction completed.
_COMPLETE = ".deepres-extracted"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where extracted archives and decoded folders are kept: ``cache_dir``, else $DEEPRES_DATA/cache, else
    $XDG_CACHE_HOME/deepres (``~/.cache/deepres``). Never beside the data, which may be read-only."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DEEPRES_DATA")
    if env:
        return Path(env).expanduser() / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deepres"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def file_fingerprint(path: Path) -> str:
    """A short key for a file's identity and version (resolved path, size, modification time)."""
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str | None = None) -> Path:
    """Fetch ``url`` to ``target`` (through ``target.part``), verifying ``md5`` when given.

    A checksum mismatch removes the partial file and raises ValueError naming both checksums; a network failure
    raises OSError (callers turn it into a FileNotFoundError that says where to put the file by hand).
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, target)
    with urlopen(url, timeout=60) as response:  # fails before anything is created when offline
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(part, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    if md5 is not None and digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {digest.hexdigest()}; the download was removed "
            f"(not written to {target})"
        )
    part.replace(target)
    return target


def _check_member(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The member's safe relative path ('/'-separated), None for entries to ignore; ValueError for anything unsafe."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"unsafe archive member {name!r} in {archive}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\\" in name:
        raise ValueError(f"unsafe archive member {name!r} in {archive}: path escapes the destination")
    if member.issym() or member.islnk():
        raise ValueError(f"unsafe archive member {name!r} in {archive}: links ({member.linkname!r}) are not extracted")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"unsafe archive member {name!r} in {archive}: not a regular file or folder")
    return "/".join(parts) if parts else None


def extract_archive(archive: Path, destination: Path) -> Path:
    """Extract a tar(.gz) archive into ``destination`` safely (see module doc). Writes into a temporary sibling and
    renames it at the end, so an interrupted or refused extraction leaves nothing behind."""
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        extract_into(archive, tmp)
        (tmp / _COMPLETE).write_text(str(archive.resolve()) + "\n")
        if destination.exists():
            shutil.rmtree(destination)
        tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def extract_into(archive: Path, root: Path) -> None:
    """Extract ``archive``'s members into the existing folder ``root``, beside what it holds, each member checked as
    :func:`extract_archive` checks it (any Python: no reliance on ``tarfile``'s extraction filters, which Python 3.10
    has only from 3.10.12)."""
    made: set[str] = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _extract_member(tar, member, Path(archive), str(root), made)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot extract {archive}: {exc}") from None


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, root: str, made: set) -> None:
    rel = _check_member(member, archive)
    if rel is None:
        return
    out = os.path.join(root, rel)
    folder = out if member.isdir() else os.path.dirname(out)
    if folder not in made:  # one mkdir per folder, not per file: 60k-file archives extract twice as fast
        os.makedirs(folder, exist_ok=True)
        made.add(folder)
    if member.isdir():
        return
    source = tar.extractfile(member)
    # Reads sized to the member: a fixed large chunk makes tarfile's reader allocate it for every small file
    # (shutil.copyfileobj's 1 MiB made a 60k-image archive extract 3x slower).
    chunk = max(1, min(member.size, 16 << 20))
    with open(out, "wb") as f:
        while block := source.read(chunk):
            f.write(block)


def extracted_archive(archive: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``archive``'s contents: extracted once under the cache root, reused while the archive's
    size and modification time are unchanged."""
    archive = Path(archive)
    destination = cache_root(cache_dir) / "extracted" / f"{archive_stem(archive)}-{file_fingerprint(archive)}"
    if (destination / _COMPLETE).is_file():
        return destination
    log.info("extracting %s to %s", archive, destination)
    return extract_archive(archive, destination)
