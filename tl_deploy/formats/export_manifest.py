"""An export folder's ``export.json``: the one list of the files it holds, each with its sha256.

``python -m tl_deploy.export`` writes it (``make_export_manifest``); every reader goes through
``read_export_manifest`` (the manifest is checked: every entry names a plain file inside the
folder) and opens a listed file with ``export_file`` (listed, present, and matching its sha256).
``usable_files`` are the entries a runtime may pick: exported fine, float32 NCHW input.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError
from tl_deploy.fileio import read_json, sha256_file
from tl_deploy.formats.names import EXPORT_MANIFEST, FLOAT_NCHW

MANIFEST_FORMAT = "tl_deploy.export"
MANIFEST_VERSION = 1


def make_export_manifest(*, tl_deploy_version: str, source: Mapping[str, Any], metadata: Mapping[str, Any],
                         options: Mapping[str, Any], versions: Mapping[str, Any],
                         files: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``export.json`` dict of an export folder (pure, but for the creation time)."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tl_deploy_version": tl_deploy_version,
        "source": dict(source),
        "metadata": dict(metadata),
        "options": dict(options),
        "versions": dict(versions),
        "files": [dict(f) for f in files],
    }


def is_export_folder(path: Path) -> bool:
    """Whether ``path`` holds an ``export.json`` (not whether it is valid: ``read_export_manifest`` says)."""
    return (path / EXPORT_MANIFEST).is_file()


def read_export_manifest(folder: Path, *, model_dir: Path | None = None) -> dict[str, Any]:
    """An export folder's ``export.json``, checked: every entry names a plain file inside the folder.

    ``model_dir``: the artifact the export should come from, named in the fix when there is no export.
    """
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        source = model_dir if model_dir is not None else "MODEL_DIR"
        raise ArtifactError(f"Export folder not found: {folder} (no {EXPORT_MANIFEST}). Run python -m "
                            f"tl_deploy.export {source} --int8, or pass --export DIR.")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"Corrupt {path}: {exc}. Re-run the export.") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ArtifactError(f"{path} is not a tl_deploy export manifest. Re-run the export.")
    for entry in manifest["files"]:
        name = entry.get("file") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{path} lists {name!r}, which is not a file there: an export manifest "
                                f"names only plain file names inside {folder}. Re-run the export.")
    return manifest


def listed_files(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The file entries of a checked manifest."""
    return [f for f in manifest["files"] if isinstance(f, Mapping)]


def usable_files(files: Sequence[Any]) -> list[Mapping[str, Any]]:
    """The file entries a runtime may pick by itself: exported fine, with float32 NCHW input (a
    baked-preprocess file is loaded by path only)."""
    return [f for f in files if isinstance(f, Mapping) and f.get("status") == "ok"
            and f.get("input_layout", FLOAT_NCHW) == FLOAT_NCHW]


def export_file(folder: Path, name: str, manifest: Mapping[str, Any], *, verify: bool = True) -> Path:
    """The one way to open a file of an export folder: ``name`` must be a file there that
    ``manifest`` lists, and (``verify``) match its recorded sha256. Returns its path."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or not path.is_file():
        raise ArtifactError(f"{folder / EXPORT_MANIFEST} lists {name!r}, which is not a file there. "
                            "Re-run the export.")
    if not any(f.get("file") == name for f in listed_files(manifest)):
        raise ArtifactError(f"{path} is not listed in {folder / EXPORT_MANIFEST}. Re-run the export.")
    if verify:
        verify_export_file(path, manifest)
    return path


def verify_export_file(path: Path, manifest: Mapping[str, Any] | None = None) -> None:
    """Check ``path`` against the sha256 its folder's export.json records; a lone file passes.

    Raises ``ArtifactError`` when the file was modified, or when export.json lists it without a
    checksum. Only files that the manifest names are checked (an engine also has its sidecar).
    """
    folder = path.parent
    if manifest is None:
        if not is_export_folder(folder):
            return
        manifest = read_export_manifest(folder)
    entries = [f for f in listed_files(manifest) if f.get("file") == path.name]
    if not entries:
        return
    expected = entries[0].get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ArtifactError(f"{folder / EXPORT_MANIFEST} records no sha256 for {path.name}. Re-run the export.")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"Export file {path} was modified (sha256 {actual[:12]}..., {EXPORT_MANIFEST} says "
            f"{expected[:12]}...). Re-export it, or load with verify=False (--no-verify) to use it anyway."
        )
