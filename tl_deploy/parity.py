"""Prove that every exported backend classifies like the PyTorch model it came from.

    tl-deploy parity models/<run> [--export export/<run>] [--data DIR --split test]
                        [--backends onnx-fp32,onnx-int8] [--atol fp32=1e-3] [--max-acc-drop int8=1.0]

Two steps, as Polygraphy's comparator: ``run(candidates, batches)`` runs every backend on the same
images (preprocessed once per distinct ``PreprocessSpec``, normally one) and returns their logits;
``comparison.compare(results, tolerances)`` judges them against PyTorch's. For each backend: max and
mean |logit difference|, max |probability difference|, top-1 agreement with PyTorch, accuracy and
its delta, the images that disagree, and one ``PASSED | ...`` / ``FAILED | ...`` / ``SKIPPED | ...``
line. A JSON and a Markdown report are written next to the export folder; the exit code is 1 when
any backend fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.cli import (
    EXIT_FAILED,
    EXIT_OK,
    INTERRUPTED_NOTHING_KEPT,
    add_device,
    add_limit,
    add_report,
    add_threads,
    add_val_fraction,
    add_verbose,
    new_parser,
    refuse_unused,
    resolve_device,
    run_cli,
    usage_errors,
)
from tl_deploy.comparison import (
    DEFAULT_TOLERANCES,
    ParityReport,
    Reference,
    RunResult,
    Tolerance,
    compare,
    parse_overrides,
    tolerances,
)
from tl_deploy.errors import BackendUnavailableError, DataError, TlDeployError
from tl_deploy.fileio import atomic_write_json, atomic_write_text, check_report_path
from tl_deploy.formats.export_manifest import read_export_manifest
from tl_deploy.formats.names import parity_report_paths
from tl_deploy.preprocess import PreprocessSpec, prepare
from tl_deploy.runtime.catalog import (
    EXPORT_BACKENDS,
    BackendChoice,
    open_backend,
    parse_backends,
    resolve_backends,
)
from tl_deploy.runtime.classifier import Classifier
from tl_deploy.runtime.gpu import cuda_problem, tensorrt_problem

_logger = logging.getLogger(__name__)


def load_samples(data: Path, split: str, class_names: Sequence[str], limit: int | None,
                 training: Any = None, val_split: float | None = None) -> list[tuple[Path, int]]:
    """(path, model's class index) of one split; ``limit``: an evenly spaced subset. ``training`` (the
    artifact's recorded config) and ``val_split`` rebuild a ``--val-split`` run's held-out images."""
    from tl_deploy.data import load_model_splits

    # A bad image fails when it is read, by name.
    splits = load_model_splits(data, training, val_split, verify_images=False)
    samples = splits.get(split)
    if not samples:
        raise DataError(f"{data} has no {split}/ images. Choose --split train, val or test, or another --data.")
    if sorted(splits.class_names) != sorted(class_names):
        raise DataError(f"Classes of {data} ({splits.class_names}) differ from the model's ({list(class_names)}). "
                        "Use data with the same class folders.")
    index = {name: i for i, name in enumerate(class_names)}  # folder order -> the model's logit order
    samples = [(path, index[splits.class_names[label]]) for path, label in samples]
    if limit is not None:
        if limit <= 0:
            raise DataError(f"Invalid --limit {limit}: choose a positive number of images.")
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    return samples


def preprocess_all(paths: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    """(N, 3, H, W) float32: every image prepared once, exactly as the runtime prepares it."""
    from tqdm import tqdm

    batch = np.empty((len(paths), 3, spec.input_size, spec.input_size), dtype=np.float32)  # (N, 3, H, W)
    for i, path in enumerate(tqdm(paths, desc="preprocess", unit="img", leave=False, mininterval=1.0)):
        batch[i] = prepare(path, spec)
    return batch


class Batches:
    """The split's images, preprocessed once per distinct ``PreprocessSpec`` (normally one), the same
    arrays for PyTorch and every backend: each backend gets the input its own metadata asks for, so
    a wrong spec there shows in the numbers too."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._arrays: dict[PreprocessSpec, np.ndarray] = {}

    def for_spec(self, spec: PreprocessSpec) -> np.ndarray:
        """(N, 3, H, W) float32 of every image, prepared as ``spec`` says (computed on first use)."""
        if spec not in self._arrays:
            self._arrays[spec] = preprocess_all(self.paths, spec)
        return self._arrays[spec]


@dataclass(frozen=True)
class Candidate:
    """A backend to run: what it is, and how to open it (a loader, called by ``run``)."""

    choice: BackendChoice
    open: Callable[[], Classifier]


def run_one(candidate: Candidate, batches: Batches) -> RunResult:
    """Open one backend, run the batch its metadata asks for, close it."""
    choice = candidate.choice
    result = RunResult(choice.name, choice.precision, choice.file, "skipped", reason=choice.skip_reason)
    if not choice.runnable:
        return result
    start = time.perf_counter()
    try:
        clf = candidate.open()
    except BackendUnavailableError as exc:
        result.reason = str(exc)
        return result
    except TlDeployError as exc:  # a file that does not load is a broken export
        result.status, result.reason = "failed", str(exc)
        return result
    with clf:
        result.metadata, result.device = clf.metadata, clf.device
        try:
            result.logits = clf.infer(batches.for_spec(clf.spec))  # (N, C)
        except TlDeployError as exc:
            result.status, result.reason = "failed", f"inference failed: {exc}"
            return result
    result.status, result.reason, result.seconds = "ran", "", time.perf_counter() - start
    return result


def run(candidates: Sequence[Candidate], batches: Batches) -> list[RunResult]:
    """Run every backend on the same images, one after the other (step 1 of 2: nothing is judged here)."""
    results = []
    for candidate in candidates:
        results.append(run_one(candidate, batches))
        _logger.debug("%s: %s %s", results[-1].name, results[-1].status, results[-1].reason)
    return results


def run_reference(clf: Classifier, batches: Batches, labels: np.ndarray) -> Reference:
    """PyTorch's logits on the split: what every backend is compared with."""
    start = time.perf_counter()
    logits = clf.infer(batches.for_spec(clf.spec))  # (N, C)
    info: dict[str, Any] = {"backend": "torch", "device": clf.device,
                            "accuracy": float((logits.argmax(1) == labels).mean()),
                            "seconds": round(time.perf_counter() - start, 2)}
    _logger.info("torch reference: %d images, accuracy %.2f%% (%.1f s)", len(labels), 100 * info["accuracy"],
                 info["seconds"])
    return Reference(logits, labels, [str(p) for p in batches.paths], clf.metadata, info)


def _data_dir(data: str | Path | None, config: Mapping[str, Any], model_dir: Path) -> Path:
    """``--data``, else the data the model was trained on."""
    if data is None:
        data = (config.get("training") or {}).get("data")
        if not data:
            raise DataError(f"{model_dir}/config.json records no training data: pass --data DIR.")
    return Path(str(data))


def run_parity(model_dir: str | Path, export_dir: str | Path, *, data: str | Path | None = None,
               split: str = "test", backends: Sequence[str] = tuple(EXPORT_BACKENDS),
               tolerance: Mapping[str, Tolerance] = DEFAULT_TOLERANCES, limit: int | None = None,
               device: str = "cpu", threads: int | None = None, val_split: float | None = None,
               verify: bool = True) -> ParityReport:
    """Compare each of ``backends`` with the artifact's PyTorch model on ``split`` of ``data``.

    ``verify``: check the artifact's manifest and each export file's sha256 (``False``: compare
    modified files deliberately)."""
    from tl_deploy.artifact import read_config

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    bad = [name for name in backends if name not in EXPORT_BACKENDS]
    if bad:
        raise TlDeployError(f"Invalid parity backend(s) {bad}: PyTorch is the reference; compare "
                            f"{', '.join(EXPORT_BACKENDS)}.")
    manifest = read_export_manifest(export_dir, model_dir=model_dir)
    config = read_config(model_dir)
    data = _data_dir(data, config, model_dir)
    wants_trt = any(name.startswith("trt-") for name in backends)
    choices = resolve_backends(backends, manifest["files"], model_dir=str(model_dir),
                               tensorrt_problem=tensorrt_problem() if wants_trt else None,
                               cuda_problem=cuda_problem() if device.startswith("cuda") else None)

    start = time.perf_counter()
    with open_backend(BackendChoice("torch", "fp32"), model_dir, export_dir, device=device,
                      verify=verify) as reference_clf:
        samples = load_samples(data, split, reference_clf.class_names, limit, config.get("training"), val_split)
        batches = Batches([path for path, _ in samples])
        batches.for_spec(reference_clf.spec)
        preprocess_seconds = time.perf_counter() - start
        reference = run_reference(reference_clf, batches, np.array([label for _, label in samples]))

    def opener(choice: BackendChoice) -> Callable[[], Classifier]:
        return lambda: open_backend(choice, model_dir, export_dir, threads=threads, verify=verify)

    runs = run([Candidate(choice, opener(choice)) for choice in choices], batches)
    results = compare(runs, tolerance, reference=reference)
    return ParityReport(model_dir=str(model_dir), export_dir=str(export_dir), data=str(data), split=split,
                        images=len(reference.labels), reference=reference.info, results=results,
                        preprocess_seconds=preprocess_seconds)


def write_report(report: ParityReport, json_path: Path, md_path: Path) -> None:
    atomic_write_json(json_path, report.to_dict())
    atomic_write_text(md_path, report.to_markdown())


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.runtime.catalog import BACKEND_NAMES

    p = new_parser("parity", __doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="model artifact folder (the PyTorch reference)")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="export folder (default: export/<run-name>, as tl-deploy export writes it)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="ImageFolder root (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="the split compared on")
    add_val_fraction(p)
    p.add_argument("--backends", nargs="+", default=[",".join(EXPORT_BACKENDS)], metavar="NAME",
                   help=f"backends to compare with torch, space or comma separated (default: all of "
                        f"{', '.join(n for n in BACKEND_NAMES if n in EXPORT_BACKENDS)}; absent ones are skipped)")
    p.add_argument("--atol", action="append", metavar="[PRECISION=]X",
                   help="max |logit difference|; a bare X sets every precision (default fp32=1e-3; fp16/bf16/int8 "
                        "unchecked: their logits move by 1e-2..1, so write fp32=X)")
    p.add_argument("--max-acc-drop", action="append", metavar="[PRECISION=]PT",
                   help="accuracy points a backend may lose (default fp32=0, fp16=0.3, bf16=0.3, int8=1.0)")
    p.add_argument("--min-agreement", action="append", metavar="[PRECISION=]PCT",
                   help="top-1 agreement with torch in percent (default fp32=100, fp16=99.5, bf16=99.5, int8=98)")
    add_limit(p, help="compare on at most N images of the split, evenly spaced (default: all)")
    add_device(p, help="device of the PyTorch reference: auto (CUDA when present), cpu, cuda or cuda:N; "
                       "it computes in FP32 either way")
    add_threads(p, help="onnxruntime intra-op and OpenVINO inference threads (default: their own choice)")
    add_report(p, help="report path stem: writes STEM.json and STEM.md (default: <export>.parity-<split>)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="compare files that no longer match their sha256 (artifact manifest, export.json)")
    add_verbose(p)
    return p


def refuse_no_ops(args: argparse.Namespace, backends: Sequence[str]) -> None:
    """Options that would do nothing in this combination are refused; a bare --atol with reduced
    precisions (which cannot meet an FP32 tolerance) is warned about."""
    if args.split == "test":
        refuse_unused(args, ["val_fraction"], "with --split test (it only carves val/ out of train/): drop it or "
                                              "choose --split val or train")
    if not any(name.startswith(("onnx-", "openvino-")) for name in backends):
        refuse_unused(args, ["threads"], "without an onnx-* backend or an openvino-* one (it sets their "
                                         "threads): drop it or add one")
    bare = [value for value in args.atol or () if "=" not in value]
    reduced = sorted({EXPORT_BACKENDS[name][0] for name in backends if name in EXPORT_BACKENDS} - {"fp32"})
    if bare and reduced:
        _logger.warning("--atol %s applies to every precision, %s included, whose logits differ by far more "
                        "than FP32's: write --atol fp32=%s to tighten FP32 only", bare[-1], "/".join(reduced),
                        bare[-1])


def check_parity(args: argparse.Namespace) -> int:
    """The parity verb: compare, print the table and the verdict lines, write the reports."""
    with usage_errors():
        tol = tolerances(atol=parse_overrides(args.atol, "--atol", low=0.0),
                         max_acc_drop=parse_overrides(args.max_acc_drop, "--max-acc-drop", low=0.0, high=100.0),
                         min_agreement=parse_overrides(args.min_agreement, "--min-agreement", low=0.0, high=100.0))
        backends = parse_backends(args.backends)
    refuse_no_ops(args, backends)
    export_dir = args.export or Path("export") / args.model_dir.resolve().name
    json_path, md_path = parity_report_paths(export_dir, args.split)
    if args.report is not None:
        json_path, md_path = (args.report.parent / f"{args.report.name}.{ext}" for ext in ("json", "md"))
    for path, content in ((json_path, "json"), (md_path, "md")):
        check_report_path(path, "--report", content, inputs={"data": args.data})
    report = run_parity(args.model_dir, export_dir, data=args.data, split=args.split, backends=backends,
                        tolerance=tol, limit=args.limit, device=resolve_device(args.device), threads=args.threads,
                        val_split=args.val_fraction, verify=args.verify)
    print(report.table())
    print()
    for result in report.results:
        print(result.line())
    write_report(report, json_path, md_path)
    print(f"wrote {json_path} and {md_path}")
    if not report.compared:
        raise BackendUnavailableError("No backend could be compared here (all skipped, reasons above).")
    print(f"{'PASSED' if report else 'FAILED'} | parity of {len(report.compared)} backend(s) with PyTorch on "
          f"{report.images} {args.split} images")
    return EXIT_OK if report else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(check_parity, get_args_parser().parse_args(argv), interrupted=INTERRUPTED_NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())
