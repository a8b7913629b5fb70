"""Atomic writes and checksums: a crash never leaves a file that later loads as if it were whole."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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
    if dest.exists() and not dest.is_dir():  # never turn a user's file into a folder (check_output_folder)
        raise OutputError(f"{dest} is a file, not a folder: choose a new folder for the output.")
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


# --------------------------------------------------------------------------- JSON with a depth bound

MAX_JSON_DEPTH = 64  # the deepest document tl_deploy writes nests 5 levels; 64 leaves room, 100,000 is an attack
MAX_JSON_BYTES = 64 << 20


def parse_json(text: str | bytes, source: str | os.PathLike[str]) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``MAX_JSON_DEPTH`` before parsing them.

    Python's parser recurses once per level, so a few hundred kilobytes of ``[[[[...`` would end in a
    ``RecursionError``; here they are a ``ValueError`` naming ``source``, like any other bad JSON.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{source} nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    try:
        return json.loads(text)
    except RecursionError:  # a smaller interpreter stack than assumed: still one clear line
        raise ValueError(f"{source} nests too deeply to parse") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, ignoring brackets inside strings."""
    if "[" not in text and "{" not in text:
        return 0
    brackets = _JSON_STRING.sub("", text)
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in ``path``; a bad, huge or too deeply nested one raises ``ValueError``."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {size / 2**20:.0f} MiB, more than the {MAX_JSON_BYTES >> 20} MiB a JSON "
                         "file of tl_deploy may have")
    with open(path, "rb") as fh:
        return parse_json(fh.read(), path)


# --------------------------------------------------------------------------- the output rule
#
# Every verb writes through one rule: an output folder is either new (or empty), or holds an earlier
# output of the same kind, recognised by its marker file below; then it is replaced atomically
# (atomic_dir). Anything else - the run's own inputs, the data, a folder of artifacts, a stranger's
# folder, a regular file - is refused before any work. Reports (single files) never land inside a
# tl_deploy folder or an input, and only replace an earlier file of their own type.

# kind -> (marker file, value of its "format" key). The formats are those artifact.FORMAT,
# export.MANIFEST_FORMAT and experiments write (tests/test_outputs.py keeps them in step).
OUTPUT_KINDS: dict[str, tuple[str, str | None]] = {
    "model artifact": ("config.json", "tl_deploy.model"),  # tl_deploy.finetune
    "export": ("export.json", "tl_deploy.export"),  # tl_deploy.export
    "dataset": ("dataset.json", None),  # tl_deploy.datasets: any dataset.json object it wrote
    "transfer curve": ("results.json", "tl_deploy.transfer-curve"),  # tl_deploy.experiments
}
_MARKER_MAX_BYTES = 16 << 20


def output_kind(folder: str | os.PathLike[str]) -> str | None:
    """The kind of tl_deploy output ``folder`` holds, from its marker file; None for anything else."""
    folder = Path(folder)
    for kind, (marker, fmt) in OUTPUT_KINDS.items():
        path = folder / marker
        try:
            if not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
                continue
            doc = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and (fmt is None or doc.get("format") == fmt):
            return kind
    return None


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()  # a link to the source is the source


def _refuse_under_file_or_output(dest: Path, shown: Path, option: str, what: str) -> None:
    for parent in dest.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{option} {shown} is under {parent}, which is a file, not a folder: "
                              f"choose another {option}.")
        kind = output_kind(parent) if parent.is_dir() else None
        if kind is not None:
            raise OutputError(f"{option} {shown} is inside the {kind} {parent}, and {what} never go inside one: "
                              "choose a path outside it.")


def _refuse_inputs(dest: Path, shown: Path, option: str, inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    for label, source in inputs.items():
        if source is None:
            continue
        src = _resolved(source)
        if dest == src:
            raise OutputError(f"{option} {shown} is the {label} this run reads: choose another {option}.")
        if dest in src.parents:
            raise OutputError(f"{option} {shown} contains the {label} this run reads ({source}): "
                              f"choose another {option}.")
        if src in dest.parents:
            raise OutputError(f"{option} {shown} is inside the {label} this run reads ({source}): "
                              f"choose another {option}.")


def check_output_folder(out: str | os.PathLike[str], kind: str, *, option: str = "--out",
                        inputs: Mapping[str, str | os.PathLike[str] | None] | None = None) -> None:
    """The output rule for a folder: refuse ``out`` unless it is new, empty, or an earlier ``kind``.

    ``inputs`` names what the run reads (label -> path): ``out`` may not be, contain or lie inside
    any of them. Call it before any work; the folder is then written with ``atomic_dir``.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    shown = Path(out)
    dest = _resolved(out)
    _refuse_inputs(dest, shown, option, inputs or {})
    _refuse_under_file_or_output(dest, shown, option, "outputs")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{option} {shown} is a file, not a folder: choose a new folder for {option}.")
    if not dest.is_dir():
        return
    found = output_kind(dest)
    if found == kind:
        return  # an earlier run of the same kind: replaced as a whole, atomically
    if found is not None:
        raise OutputError(f"{option} {shown} holds a {found}, not a {kind}: choose another {option}.")
    if any(dest.iterdir()):
        marker = OUTPUT_KINDS[kind][0]
        raise OutputError(
            f"{option} {shown} is a non-empty folder that holds no earlier {kind} (no tl_deploy {marker}), "
            f"so replacing it would delete files tl_deploy did not write: choose a new or empty folder."
        )


# What an existing file at a report path must look like to be replaced: an earlier report of that type.
_REPORT_TYPES = ("json", "md", "png")


def check_report_path(path: str | os.PathLike[str], option: str, content: str, *,
                      inputs: Mapping[str, str | os.PathLike[str] | None] | None = None) -> None:
    """The output rule for a report file (``content``: json, md or png).

    Refused: a folder, a path under a file, a path inside a tl_deploy output or an input, and an
    existing file that is not an earlier report of the same type (a model file, say).
    """
    if content not in _REPORT_TYPES:
        raise ValueError(f"unknown report type {content!r}")
    shown = Path(path)
    dest = _resolved(path)
    if dest.is_dir():
        raise OutputError(f"{option} {shown} is a folder: give a file path, e.g. {shown / f'report.{content}'}.")
    _refuse_inputs(dest, shown, option, inputs or {})
    _refuse_under_file_or_output(dest, shown, option, "reports")
    if dest.exists() and not _is_report(dest, content):
        raise OutputError(f"{option} {shown} exists and is not an earlier {content} report (it would be "
                          f"overwritten): choose another {option}.")


def _is_report(path: Path, content: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    if content == "png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if b"\x00" in data:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if content == "json":
        try:
            return isinstance(parse_json(text, path), dict)
        except ValueError:
            return False
    return True
