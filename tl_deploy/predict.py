"""Classify many image files with an exported model and write one row per image.

    tl-deploy predict export/animal-shape-efficientnet_lite0-lp-ft data/animal-shape/test --out preds.csv

MODEL: an export folder, one .onnx/.engine file or a model artifact (``tl_deploy.runtime.load``).
INPUT: image files, folders (walked recursively), globs, or ``@list.txt`` / a ``.txt`` file listing paths.
The output's extension picks its format: .csv, .jsonl or .parquet (pyarrow, the ``parquet`` extra).

CSV and JSONL are written append-only, whole lines, flushed and fsynced after every batch: a killed
run loses at most its current batch, and ``--resume`` skips the inputs already in the file (a torn
last line is dropped first). Parquet cannot be appended to; it is written once, atomically, at the end.

The pipeline: a thread pool decodes and preprocesses the next batches (``preprocess.prepare_batch``: the
classifier's own ``prepare``, bit for bit, at less than half the cost) while the main thread runs
``Classifier.infer`` on the current one;
``predict_batch`` (arrays in, rows out) is the unit ``--ray`` maps over batches on a Ray Data actor pool
(``tl_deploy.predict_ray``, imported only then).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tl_deploy.cli import (
    COUNT,
    EXIT_OK,
    POSITIVE_INT,
    add_threads,
    add_verbose,
    new_parser,
    refuse_unused,
    run_cli,
)
from tl_deploy.errors import ArtifactError, DataError, OutputError, UsageError
from tl_deploy.fileio import atomic_path, check_output_writable
from tl_deploy.preprocess import IMAGE_EXTENSIONS, PreprocessSpec, prepare_batch
from tl_deploy.runtime.base import usable_cpus

if TYPE_CHECKING:
    from tl_deploy.runtime import Classifier

_logger = logging.getLogger(__name__)

FORMATS = (".csv", ".jsonl", ".parquet")
APPENDABLE = (".csv", ".jsonl")
DEFAULT_BATCH = 32  # images per inference call when the backend sets no limit of its own
PREFETCH_BATCHES = 2  # batches decoded ahead of the one being inferred (at least; one per worker)
OUTPUT_FREE_BYTES = 16 * 2**20
_GLOB_CHARS = frozenset("*?[")
INTERRUPTED = "interrupted; the rows of every finished batch are in the output: add --resume to continue."


# --------------------------------------------------------------------------- inputs


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _list_file(path: Path) -> list[Path]:
    """The paths a list file names, one per line; blank lines and ``#`` comments are skipped, and
    relative paths are relative to the list file's folder (so a list travels with its images)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the list file {path} ({exc}): pass a UTF-8 text file of image paths.") from exc
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            out.append(entry if entry.is_absolute() else path.parent / entry)
    if not out:
        raise DataError(f"The list file {path} names no image: put one path per line in it.")
    return out


def _folder_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))
    if not images:
        raise DataError(f"The folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)}), in any subfolder: "
                        "pass a folder of images.")
    return images


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Every image path that ``inputs`` names, in order, each once.

    A folder is walked recursively for image extensions; a glob is expanded (``**`` included); ``@FILE``
    or a ``.txt`` file lists paths. A named file or folder that does not exist, a glob that matches no
    image and a folder with no image are refused: nothing would be predicted for them.
    """
    found: list[Path] = []
    for item in inputs:
        if item.startswith("@"):
            found += _list_file(Path(item[1:]).expanduser())
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found += _folder_images(path)
        elif path.is_file():
            found += _list_file(path) if path.suffix.lower() == ".txt" else [path]
        elif _GLOB_CHARS & set(item):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True))
            images = [m for m in matches if m.is_file() and _is_image(m)]
            if not images:
                raise DataError(f"The pattern {item!r} matches no image file: check it (quote it so the shell "
                                "does not expand it).")
            found += images
        else:
            raise DataError(f"Input not found: {item}. Pass image files, folders, globs or @list.txt.")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise DataError("No input images: pass image files, folders, globs or @list.txt.")
    return unique


# --------------------------------------------------------------------------- rows and output files


@dataclass(frozen=True)
class Row:
    """One image's result: top-k labels and probabilities, or the error that kept it from having one."""

    path: str
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    backend: str = ""
    precision: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "labels": list(self.labels), "probabilities": list(self.probabilities),
                "backend": self.backend, "precision": self.precision, "error": self.error or None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Row:
        """Inverse of ``to_json`` (a JSONL line, a row of a ``row_columns`` table); a key missing raises KeyError."""
        return cls(str(doc["path"]), tuple(doc["labels"]), tuple(float(p) for p in doc["probabilities"]),
                   str(doc["backend"]), str(doc["precision"]), doc["error"] or "")

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None


def row_columns(rows: Sequence[Row]) -> dict[str, list[Any]]:
    """Rows as columns, named and valued as ``Row.to_json`` (a Parquet file, a Ray table)."""
    return {"path": [r.path for r in rows], "labels": [list(r.labels) for r in rows],
            "probabilities": [list(r.probabilities) for r in rows], "backend": [r.backend for r in rows],
            "precision": [r.precision for r in rows], "error": [r.error or None for r in rows]}


def csv_header(top_k: int) -> list[str]:
    ranks = [name for i in range(1, top_k + 1) for name in (f"label_{i}", f"prob_{i}")]
    return ["path", *ranks, "backend", "precision", "error"]


def _csv_cells(row: Row, top_k: int) -> list[str]:
    ranks: list[str] = []
    for i in range(top_k):
        if i < len(row.labels):
            ranks += [row.labels[i], f"{row.probabilities[i]:.6g}"]
        else:
            ranks += ["", ""]
    return [row.path, *ranks, row.backend, row.precision, row.error]


def _csv_line(cells: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


class RowWriter(Protocol):
    def write(self, rows: Sequence[Row]) -> None: ...

    def close(self) -> None: ...


class LineWriter:
    """CSV or JSONL rows appended as whole lines; each batch is flushed and fsynced before the next."""

    def __init__(self, path: Path, top_k: int) -> None:
        self.path = path
        self.top_k = top_k
        self.csv = path.suffix.lower() == ".csv"
        new = not path.exists() or path.stat().st_size == 0
        self._fh = open(path, "a", encoding="utf-8", newline="")
        if new and self.csv:
            self._commit(_csv_line(csv_header(top_k)))

    def _commit(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, rows: Sequence[Row]) -> None:
        if self.csv:
            text = "".join(_csv_line(_csv_cells(r, self.top_k)) for r in rows)
        else:
            text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)
        self._commit(text)

    def close(self) -> None:
        self._fh.close()


class ParquetWriter:
    """Rows kept in memory and written once, atomically, by ``close`` (Parquet has no append)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.pq = import_pyarrow()

    def write(self, rows: Sequence[Row]) -> None:
        self.rows.extend(rows)

    def close(self) -> None:
        pa, pq = self.pq
        columns = row_columns(self.rows)
        schema = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                            ("probabilities", pa.list_(pa.float32())), ("backend", pa.string()),
                            ("precision", pa.string()), ("error", pa.string())])
        with atomic_path(self.path) as tmp:
            pq.write_table(pa.table(columns, schema=schema), tmp)


def import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError("A .parquet output needs pyarrow: pip install 'tl_deploy[parquet]', or write .csv or "
                         ".jsonl.") from exc
    return pa, pq


def _drop_torn_line(path: Path) -> bytes:
    """The file's whole lines; a last line without its newline (a write cut short) is cut off the file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        _logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as fh:
            fh.truncate(end)
            os.fsync(fh.fileno())
    return data[:end]


def read_rows(path: Path, top_k: int) -> list[Row]:
    """The rows already in a CSV or JSONL output (for ``--resume``), after dropping a torn last line."""
    data = _drop_torn_line(path)
    if not data:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a UTF-8 {path.suffix} file of predictions: choose another --out.") from exc
    rows: list[Row] = []
    if path.suffix.lower() == ".csv":
        records = list(csv.reader(io.StringIO(text)))
        if records[0] != csv_header(top_k):
            raise UsageError(f"{path} has the columns {records[0][:3]}... not those of --top-k {top_k} "
                             f"({', '.join(csv_header(top_k)[:3])}...): resume with its own --top-k, or choose "
                             "another --out.")
        for rec in records[1:]:
            if len(rec) != len(records[0]):
                raise DataError(f"{path} has a row of {len(rec)} cells, not {len(records[0])}: it is not a "
                                "predict output; choose another --out.")
            labels = tuple(v for v in rec[1:1 + 2 * top_k:2] if v)
            probs = tuple(float(v) for v in rec[2:2 + 2 * top_k:2] if v)
            rows.append(Row(rec[0], labels, probs, rec[-3], rec[-2], rec[-1]))
        return rows
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(Row.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} line {number} is not a predict row ({exc}): choose another --out.") from exc
    return rows


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Summary:
    """What one run did: rows written, images that could not be read, time spent."""

    written: int = 0
    errors: int = 0
    skipped: int = 0  # inputs already in the output (--resume)
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)  # every row of the output, earlier ones included

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def add(self, rows: Sequence[Row]) -> None:
        """Count one batch's rows, once they are in the output."""
        self.rows.extend(rows)
        self.written += len(rows)
        self.errors += sum(1 for r in rows if r.error)


@dataclass(frozen=True)
class DecodedBatch:
    """One batch of inputs, decoded and preprocessed: the readable images stacked, the others' errors."""

    paths: list[Path]
    images: np.ndarray | None  # (N, 3, H, W) float32 of the readable paths, in order; None if none is
    errors: dict[int, DataError]  # index in ``paths`` -> why that image could not be read


def decode_batch(paths: list[Path], spec: PreprocessSpec, out: np.ndarray | None = None) -> DecodedBatch:
    """``preprocess.prepare`` on every path (the float input ``Classifier.infer`` takes), stacked: computed by
    ``preprocess.prepare_batch``, the same array bit for bit at less than half the cost (``out``: the
    array to write the images into, see ``preprocess.normalize_batch``)."""
    images, errors = prepare_batch(paths, spec, out)
    return DecodedBatch(paths, images, errors)


def predict_batch(classifier: Classifier, batch: DecodedBatch, top_k: int) -> list[Row]:
    """One row per path: top-k of the decoded images, the error line of those that could not be read."""
    from tl_deploy.runtime import softmax

    backend, precision = classifier.backend_name, classifier.precision
    rows = [Row(str(p), backend=backend, precision=precision, error=str(batch.errors[i]))
            if i in batch.errors else None for i, p in enumerate(batch.paths)]
    if batch.images is not None:
        ranked = classifier.rank(softmax(classifier.infer(batch.images)), top_k)  # (N, k) labels and probabilities
        good = [i for i in range(len(batch.paths)) if i not in batch.errors]
        for row, i in enumerate(good):
            rows[i] = Row(str(batch.paths[i]), tuple(ranked.labels[row]),
                          tuple(float(p) for p in ranked.probabilities[row]), backend, precision)
    return [r for r in rows if r is not None]


def decoded_batches(paths: Sequence[Path], spec: PreprocessSpec, batch_size: int, workers: int, *,
                    reuse: bool = False, held: int = 1) -> Generator[DecodedBatch, None, None]:
    """The inputs decoded in batches of ``batch_size``, in order.

    ``workers`` > 0: a thread pool decodes whole batches ahead of the one handed out (at least
    ``PREFETCH_BATCHES``, and one per worker), so decoding overlaps inference (onnxruntime, OpenVINO and
    TensorRT release the GIL while they compute). 0: each batch is decoded when it is asked for, on the
    calling thread (no overlap; docs/predict.md compares the two).

    ``reuse``: a batch's ``images`` array is written over by a later batch once ``held`` newer batches
    have been asked for (for a consumer that keeps rows, not arrays, and has at most ``held`` batches
    in use at a time: ``run_predictions``); the few arrays in flight are allocated once instead of a
    fresh 4.8 MB per batch of 32, whose page faults cost as much as the normalisation
    (``preprocess.normalize_batch``).
    """
    chunks = (list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size))
    spare: list[np.ndarray] = []  # arrays of batches handed out and done with (reuse only)
    handed: deque[np.ndarray | None] = deque()  # the arrays of the batches the consumer may still use

    def array() -> np.ndarray | None:
        if not reuse:
            return None
        size = spec.input_size
        return spare.pop() if spare else np.empty((batch_size, 3, size, size), dtype=np.float32)

    def release() -> None:
        """The consumer asks for another batch: the oldest of the ``held`` it may use is done with."""
        if len(handed) >= held:
            free = handed.popleft()
            if free is not None:
                spare.append(free)

    if workers == 0:
        for chunk in chunks:
            release()  # first: this batch is decoded into the array it frees
            out = array()
            handed.append(out)
            yield decode_batch(chunk, spec, out)
        return
    pending: deque[tuple[Future[DecodedBatch], np.ndarray | None]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                out = array()
                pending.append((pool.submit(decode_batch, chunk, spec, out), out))

        try:
            for _ in range(max(PREFETCH_BATCHES, workers) + 1):
                submit_next()
            while pending:
                future, out = pending.popleft()
                release()
                handed.append(out)
                submit_next()
                yield future.result()
        finally:  # stopped early (an error, --on-bad-image fail, Ctrl-C): drop the decoding ahead
            for future, _ in pending:
                future.cancel()


def predicted_rows(classifier: Classifier, batches: Iterable[DecodedBatch], top_k: int, *,
                   fail_on_bad: bool = False) -> Generator[list[Row], None, None]:
    """``predict_batch`` of every batch, its rows handed out in the batches' order.

    With ``classifier.streams`` > 1 (``load(streams=)``) that many batches infer at once, each from a
    thread of its own; the oldest one's rows are handed out before the next batch is taken from
    ``batches``, so at most ``streams`` batches are in use (``decoded_batches(held=streams)``).
    ``fail_on_bad``: raise the first unreadable image's ``DataError`` instead of inferring its batch,
    after handing out the rows of every batch before it.
    """
    streams = classifier.streams
    handed = 0  # rows handed out
    inflight: deque[Future[list[Row]]] = deque()

    def oldest() -> list[Row]:
        nonlocal handed
        rows = inflight.popleft().result()
        handed += len(rows)
        return rows

    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="infer") as pool:
        try:
            for batch in batches:
                bad = next(iter(batch.errors.values()), None)
                if fail_on_bad and bad is not None:
                    while inflight:
                        yield oldest()
                    raise DataError(f"{bad} (--on-bad-image fail; the {handed} rows before it are in the output: "
                                    "fix or remove the file, then run again with --resume)")
                inflight.append(pool.submit(predict_batch, classifier, batch, top_k))
                if len(inflight) == streams:
                    yield oldest()
            while inflight:
                yield oldest()
        finally:  # stopped early: the batches not yet started are dropped, the running ones finish
            for future in inflight:
                future.cancel()


def run_predictions(classifier: Classifier, paths: Sequence[Path], writer: RowWriter, *, top_k: int, batch_size: int,
                    workers: int, fail_on_bad: bool = False, progress: bool = True) -> Summary:
    """Decode ``paths`` (``decoded_batches``), infer batch by batch (``predicted_rows``), hand each
    batch's rows to ``writer``.

    ``fail_on_bad``: raise the first unreadable image's ``DataError`` before writing its batch (the
    batches before it are kept).
    """
    from tqdm import tqdm

    summary = Summary()
    start = time.perf_counter()
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        batches = decoded_batches(paths, classifier.spec, batch_size, workers, reuse=True, held=classifier.streams)
        results = predicted_rows(classifier, batches, top_k, fail_on_bad=fail_on_bad)
        try:
            for rows in results:
                writer.write(rows)
                summary.add(rows)
                bar.update(len(rows))
        finally:
            results.close()
            batches.close()
    summary.seconds = time.perf_counter() - start
    return summary


def class_folder_labels(rows: Iterable[Row], class_names: Sequence[str]) -> list[tuple[int, int]] | None:
    """(true, predicted) class indices when every image sits in a folder named after one of the model's
    classes; None otherwise (no accuracy can be told). Unreadable images are left out."""
    index = {name: i for i, name in enumerate(class_names)}
    pairs = []
    for row in rows:
        truth = index.get(Path(row.path).parent.name)
        if truth is None:
            return None
        if row.label is not None and row.label in index:
            pairs.append((truth, index[row.label]))
    return pairs or None


# --------------------------------------------------------------------------- the verb


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.runtime import BACKENDS, LOAD_PRECISIONS

    p = new_parser("predict", __doc__.split("\n")[0])
    p.add_argument("model", type=Path, metavar="MODEL", help="export folder, .onnx/.engine file or model artifact")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive), globs, or @list.txt / a .txt file of paths")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the predictions file: .csv, .jsonl or .parquet")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="the runtime (auto: the fastest here)")
    p.add_argument("--precision", default="auto", choices=LOAD_PRECISIONS,
                   help="the export file's precision (auto: the fastest here)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=5, metavar="K",
                   help="labels per image, most likely first (default: 5, or every class if fewer)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, metavar="N",
                   help=f"images per inference call (default: the backend's largest batch, else {DEFAULT_BATCH})")
    add_threads(p, help="CPU intra-op threads of the backend (default: its own choice; with --ray: 1 per actor)")
    p.add_argument("--streams", type=POSITIVE_INT, default=None, metavar="N",
                   help="CPU: batches inferred at once, sharing --threads (default: 2 where the threads split "
                        "in two, else 1); a GPU runs 1")
    p.add_argument("--workers", type=COUNT, default=None, metavar="N",
                   help="threads decoding whole batches ahead of inference; 0 decodes on the inference thread "
                        "(default: the CPUs --threads leaves free, 1 to 8; up to 8 on a GPU)")
    p.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                   help="skip: an unreadable image gets a row with its error and the run goes on; fail: stop "
                        "at the first (exit 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing .csv/.jsonl output: inputs already in it are skipped")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: alone (or 'local'), a Ray on this machine; 'auto' or an address "
                        "(ray://host:10001), that cluster; needs the ray extra (put it after the inputs, or "
                        "--ray=ADDRESS)")
    p.add_argument("--actors", type=POSITIVE_INT, default=None, metavar="N",
                   help="with --ray: actors, one classifier each (default: as many as the cluster's CPUs hold "
                        "at --threads each)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="skip the export files' checksum check")
    add_verbose(p)
    return p


def check_output(out: Path, resume: bool) -> None:
    """Refuse, before any work, an output this run cannot write or would overwrite."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out {out}: unknown output format {out.suffix or '(no extension)'!r}: end the file "
                         f"name with {', '.join(FORMATS)}.")
    if suffix == ".parquet":
        if resume:
            raise UsageError("--resume does nothing with a .parquet output (Parquet cannot be appended to; it is "
                             "written once at the end): drop --resume, or write .csv or .jsonl.")
        import_pyarrow()
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: give a file path, e.g. {out / ('predictions' + FORMATS[0])}.")
    if out.exists() and not resume:
        raise UsageError(f"--out {out} exists: add --resume to continue it, or choose another --out (it is never "
                         "overwritten).")
    check_output_writable(out, need_bytes=OUTPUT_FREE_BYTES)


def default_streams(threads: int | None) -> int:
    """Inference calls at once on the CPU: 2 where the threads (default: every CPU) can be split in two.
    On the 2-core AMD EPYC at 2 threads (``bench/bench_predict.py``, docs/predict.md), predict end to
    end reached 80-91% of the one-stream batch-32 throughput on 2 streams against 78-79% on 1 (OpenVINO
    INT8), 96-108% against 80-82% (onnxruntime INT8): a decoding thread taking a core stops one
    stream's batch, not both threads of one call. A GPU runner keeps 1 whatever is asked (``load``)."""
    return 2 if (threads or usable_cpus()) >= 2 else 1


def default_workers(device: str, threads: int | None) -> int:
    """Decoding threads: on a GPU, up to 8 (every CPU is free for them); on the CPU, the cores that
    inference leaves free (a backend left to choose its threads takes them all), and at least one,
    which still overlapped inference profitably on a 2-core CPU running 2 inference threads."""
    cpus = usable_cpus()
    if device != "cpu":
        return min(8, cpus)
    return max(1, min(8, cpus - (threads or cpus)))


def predict(args: argparse.Namespace) -> int:
    """The predict verb: check everything, load the model, predict, print the summary."""
    from tl_deploy.reports import classification_result, format_result
    from tl_deploy.runtime import load

    if args.ray is None:
        refuse_unused(args, ["actors"], "without --ray (they size its actor pool): add --ray or drop it")
    else:
        refuse_unused(args, ["workers", "streams"],
                      "with --ray (each actor decodes and infers its own batches): drop it, or use --actors")
        from tl_deploy.predict_ray import import_ray

        import_ray()  # a missing extra is refused before any work
    if args.out.suffix.lower() == ".parquet":
        refuse_unused(args, ["resume"], "with a .parquet output (Parquet cannot be appended to; it is written once "
                                        "at the end): drop it, or write .csv or .jsonl")
    if not args.model.exists():
        raise ArtifactError(f"Model not found: {args.model}. Pass an export folder, an .onnx/.engine file or a "
                            "model artifact.")
    check_output(args.out, args.resume)
    paths = collect_inputs(args.inputs)
    streams = 1 if args.ray is not None else args.streams or default_streams(args.threads)
    classifier = load(args.model, backend=args.backend, precision=args.precision, threads=args.threads,
                      verify=not args.no_verify, streams=streams)
    with classifier:
        num_classes = len(classifier.class_names)
        top_k = min(args.top_k, num_classes)
        if "top_k" in getattr(args, "_given", ()) and args.top_k > num_classes:
            raise UsageError(f"--top-k {args.top_k} is more than the model's {num_classes} classes: choose 1.."
                             f"{num_classes}.")
        earlier = read_rows(args.out, top_k) if args.resume and args.out.exists() else []
        done = {r.path for r in earlier}
        todo = [p for p in paths if str(p) not in done]
        if earlier:
            _logger.info("%s: %d rows already there, %d of %d inputs left", args.out, len(earlier), len(todo),
                         len(paths))
        batch_size = args.batch_size or classifier.runner.max_batch or DEFAULT_BATCH
        workers = args.workers if args.workers is not None else default_workers(classifier.device, args.threads)
        pipeline = f"{workers} decode workers, {classifier.streams} inference stream" + \
            ("s" if classifier.streams > 1 else "")
        if args.ray is not None and todo:
            from tl_deploy.predict_ray import RaySettings, run_ray_predictions, start_ray

            settings = RaySettings(args.ray, args.actors, args.threads or 1)
            started = start_ray(settings, args.verbose)  # an unreachable cluster is refused before FILE is opened
        writer: RowWriter = LineWriter(args.out, top_k) if args.out.suffix.lower() in APPENDABLE \
            else ParquetWriter(args.out)
        try:
            if args.ray is None:
                summary = run_predictions(classifier, todo, writer, top_k=top_k, batch_size=batch_size,
                                          workers=workers, fail_on_bad=args.on_bad_image == "fail",
                                          progress=not args.no_progress)
            elif todo:
                summary, pipeline = run_ray_predictions(
                    args.model, todo, writer, settings=settings, backend=args.backend, precision=args.precision,
                    verify=not args.no_verify, top_k=top_k, batch_size=batch_size,
                    fail_on_bad=args.on_bad_image == "fail", progress=not args.no_progress, verbose=args.verbose,
                    shutdown=started)
            else:
                summary = Summary()  # nothing left: no cluster is asked for
        except BaseException:
            if isinstance(writer, LineWriter):
                writer.close()  # whole batches only are in the file; a Parquet file is not written at all
            raise
        writer.close()
        summary.skipped = len(paths) - len(todo)
        rows = earlier + summary.rows
        print(f"predicted {summary.written} images in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s, "
              f"{classifier.backend_name} {classifier.precision}, batch {batch_size}, {pipeline}); "
              f"{summary.errors} unreadable; {summary.skipped} already in {args.out}")
        pairs = class_folder_labels(rows, classifier.class_names)
        if pairs is not None:
            truth, pred = (np.asarray(v, dtype=np.int64) for v in zip(*pairs))
            result = classification_result(truth, pred, num_classes)
            lines = format_result(result, classifier.class_names, "class folders").split("\n")
            lines[0] = f"class folders: accuracy {result.accuracy * 100:.2f}% ({result.count} images)"
            print("\n".join(lines))
        print(f"wrote {args.out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(predict, get_args_parser().parse_args(argv), interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
