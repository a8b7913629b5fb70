"""Atomic writes and checksums: a crash never leaves a file that later loads as if it were whole."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tl_deploy.errors import OutputError

_CHUNK = 1 << 20
CACHE_ENV = "TL_DEPLOY_CACHE"


def default_cache_dir() -> Path:
    """``$TL_DEPLOY_CACHE`` if set, else ``~/.cache/tl_deploy`` (downloads, feature cache)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_deploy"


MIN_FREE_BYTES = 200 * 2**20  # room for checkpoints and an artifact of a small model
# OSErrors that mean "this output cannot be written": reported as one line, not a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def check_output_writable(out: str | os.PathLike[str], need_bytes: int = MIN_FREE_BYTES,
                          option: str = "--out") -> None:
    """Fail now, not after an hour of work, when ``out`` cannot be created or the disk is nearly full.

    Creates the parent folder, writes and removes a probe file there (the folder that atomic writes
    use for their temporary files), and checks the free space against ``need_bytes``.
    """
    dest = Path(out)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".write-test", dir=parent)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"Cannot write to {parent} ({exc.strerror or exc}). Choose another {option} or fix its permissions."
        ) from exc
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OutputError(
            f"Only {free / 2**20:.0f} MiB free in {parent}, need at least {need_bytes / 2**20:.0f} MiB. "
            f"Free some space or choose another {option}."
        )


def describe_write_error(exc: OSError) -> str:
    """One line for a failed write (full disk, permissions): what failed and what to do."""
    where = f" writing {exc.filename}" if exc.filename else ""
    return (f"{exc.strerror or exc}{where}. Nothing half-written was kept: free space or fix permissions, "
            "then run again (training: add --resume to continue from the last checkpoint).")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success it replaces ``path``.

    The temporary file lives in the same folder so that ``os.replace`` is atomic; on any error it
    is removed and ``path`` keeps its previous content.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then move it into place.

    An existing folder at ``path`` is replaced only once the new one is complete, so readers see
    either the old folder or the new one, never a half-written mix.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for file in tmp.rglob("*"):
            os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~_umask())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # put the previous folder back: never leave no folder at all
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
