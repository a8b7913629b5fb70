"""Prove that every exported backend classifies like the PyTorch model it came from.

    tl-deploy parity models/<run> [--export export/<run>] [--data DIR --split test]
                        [--backends onnx-fp32,onnx-int8] [--atol fp32=1e-3] [--max-acc-drop int8=1.0]

The images of one split are preprocessed once (per distinct ``PreprocessSpec``, normally one) and
the same arrays go to PyTorch and to every backend of the export folder. For each backend: max and
mean |logit difference|, max |probability difference|, top-1 agreement with PyTorch, accuracy and
its delta, the images that disagree, and one ``PASSED | ...`` / ``FAILED | ...`` / ``SKIPPED | ...``
line. A JSON and a Markdown report are written next to the export folder; the exit code is 1 when
any backend fails.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError, TlDeployError
from tl_deploy.export.metadata import OnnxMetadata
from tl_deploy.fileio import atomic_write_json, atomic_write_text, check_report_path
from tl_deploy.preprocess import PreprocessSpec, prepare
from tl_deploy.reports import format_table
from tl_deploy.runtime.base import softmax
from tl_deploy.runtime.catalog import (
    EXPORT_BACKENDS,
    BackendChoice,
    open_backend,
    parse_backends,
    resolve_backends,
)

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DISAGREEMENTS_SHOWN = 20  # per backend in the Markdown report (the JSON has them all)


@dataclass(frozen=True)
class Tolerance:
    """What a backend of one precision must meet against PyTorch."""

    atol: float | None  # max |logit difference|; None: not checked (reduced precision)
    max_acc_drop: float  # accuracy points it may lose
    min_agreement: float  # top-1 agreement with PyTorch, percent

    def to_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "max_acc_drop_pt": self.max_acc_drop, "min_agreement_pct": self.min_agreement}


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-3, max_acc_drop=0.0, min_agreement=100.0),
    "fp16": Tolerance(atol=None, max_acc_drop=0.3, min_agreement=99.5),
    "int8": Tolerance(atol=None, max_acc_drop=1.0, min_agreement=98.0),
}
_EPS = 1e-9  # float slack when comparing measured shares with tolerances


def parse_overrides(values: Sequence[str] | None, option: str, *, low: float,
                    high: float | None = None) -> dict[str, float]:
    """``["1e-3"]`` (every precision) or ``["int8=0.5", "fp16=0.2"]`` -> {precision: value}."""
    out: dict[str, float] = {}
    for value in values or ():
        precision, _, number = value.rpartition("=")
        targets = [precision] if precision else list(PRECISIONS)
        if precision and precision not in PRECISIONS:
            raise TlDeployError(f"Invalid {option} {value!r}: precision must be one of {', '.join(PRECISIONS)}.")
        try:
            parsed = float(number)
        except ValueError:
            raise TlDeployError(f"Invalid {option} {value!r}: give a number, or PRECISION=NUMBER.") from None
        if not parsed >= low or (high is not None and parsed > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise TlDeployError(f"Invalid {option} {value!r}: the value must be {bounds}.")
        out.update(dict.fromkeys(targets, parsed))
    return out


def tolerances(atol: Mapping[str, float] | None = None, max_acc_drop: Mapping[str, float] | None = None,
               min_agreement: Mapping[str, float] | None = None) -> dict[str, Tolerance]:
    """The default tolerances with per-precision overrides applied."""
    out = {}
    for precision, default in DEFAULT_TOLERANCES.items():
        out[precision] = Tolerance(
            atol=(atol or {}).get(precision, default.atol),
            max_acc_drop=(max_acc_drop or {}).get(precision, default.max_acc_drop),
            min_agreement=(min_agreement or {}).get(precision, default.min_agreement),
        )
    return out


@dataclass
class BackendResult:
    """One backend against PyTorch. ``bool(result)`` is True unless it FAILED (a skip is not a failure)."""

    name: str
    precision: str
    file: str | None
    status: str  # "passed", "failed" or "skipped"
    tolerance: Tolerance | None = None
    reason: str = ""  # why it failed or was skipped
    problems: list[str] = field(default_factory=list)  # failures that are not a threshold (metadata, shapes)
    metrics: dict[str, Any] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)  # path, label, torch, backend
    device: str = ""
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        """``PASSED | onnx-fp32 | model.onnx | max|dlogit| 2.1e-06 <= 1e-03, ...``"""
        where = f"{self.name} | {self.file}" if self.file else self.name
        if self.status == "skipped":
            return f"SKIPPED | {where} | {self.reason}"
        head = f"{self.status.upper()} | {where}"
        if not self.metrics:
            return f"{head} | {self.reason}"
        m, tol = self.metrics, self.tolerance
        assert tol is not None
        # Each threshold is printed as met or missed, so a FAILED line never claims a check it failed.
        text = f"{head} | max|dlogit| {m['max_abs_logit_diff']:.1e}"
        if tol.atol is not None:
            text += f" {'<=' if m['max_abs_logit_diff'] <= tol.atol else '>'} {tol.atol:.0e}"
        met_agreement = 100.0 * m["agreement"] >= tol.min_agreement - _EPS
        met_drop = -m["accuracy_delta_pt"] <= tol.max_acc_drop + _EPS
        text += (f", agreement {100 * m['agreement']:.2f}% {'>=' if met_agreement else '<'} {tol.min_agreement:g}%, "
                 f"accuracy {100 * m['accuracy']:.2f}% ({m['accuracy_delta_pt']:+.2f} pt, drop "
                 f"{'<=' if met_drop else '>'} {tol.max_acc_drop:g})")
        return f"{text} | {'; '.join(self.problems)}" if self.problems else text

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "file": self.file, "status": self.status,
                "reason": self.reason, "device": self.device, "seconds": round(self.seconds, 2),
                "tolerance": self.tolerance.to_dict() if self.tolerance else None, **self.metrics,
                "disagreements": self.disagreements}


def compare_logits(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray, paths: Sequence[str],
                   class_names: Sequence[str], tolerance: Tolerance) -> tuple[dict[str, Any], list[str],
                                                                             list[dict[str, Any]]]:
    """Metrics of ``logits`` against ``reference`` (both (N, C)), the tolerance checks that fail, and
    the images whose top-1 class differs."""
    if logits.shape != reference.shape:
        return {}, [f"output shape {logits.shape} != PyTorch's {reference.shape}"], []
    if not np.isfinite(logits).all():
        return {}, [f"{int((~np.isfinite(logits)).sum())} non-finite logits"], []
    diff = np.abs(logits.astype(np.float64) - reference)  # (N, C)
    prob_diff = np.abs(softmax(logits) - softmax(reference))
    top1, ref_top1 = logits.argmax(1), reference.argmax(1)  # (N,)
    accuracy, ref_accuracy = float((top1 == labels).mean()), float((ref_top1 == labels).mean())
    metrics = {
        "images": int(len(labels)),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_prob_diff": float(prob_diff.max()),
        "agreement": float((top1 == ref_top1).mean()),
        "accuracy": accuracy,
        "accuracy_delta_pt": 100.0 * (accuracy - ref_accuracy),
    }
    failures = []
    if tolerance.atol is not None and metrics["max_abs_logit_diff"] > tolerance.atol:
        failures.append(f"max|dlogit| {metrics['max_abs_logit_diff']:.2e} > {tolerance.atol:.0e}")
    if 100.0 * metrics["agreement"] < tolerance.min_agreement - _EPS:
        failures.append(f"agreement {100 * metrics['agreement']:.2f}% < {tolerance.min_agreement:g}%")
    if -metrics["accuracy_delta_pt"] > tolerance.max_acc_drop + _EPS:
        failures.append(f"accuracy drop {-metrics['accuracy_delta_pt']:.2f} pt > {tolerance.max_acc_drop:g}")
    disagreements = [{"path": paths[i], "label": class_names[int(labels[i])], "torch": class_names[int(ref_top1[i])],
                      "backend": class_names[int(top1[i])]} for i in np.flatnonzero(top1 != ref_top1).tolist()]
    return metrics, failures, disagreements


def metadata_problems(candidate: OnnxMetadata, reference: OnnxMetadata) -> list[str]:
    """What a backend's own metadata says differently from the artifact (each is a failure)."""
    problems = []
    if tuple(candidate.class_names) != tuple(reference.class_names):
        problems.append(f"class names {list(candidate.class_names)} != the artifact's {list(reference.class_names)}")
    if candidate.spec != reference.spec:
        ours, theirs = candidate.spec.to_dict(), reference.spec.to_dict()
        fields = ", ".join(f"{k} {ours[k]} != {theirs[k]}" for k in ours if ours[k] != theirs[k])
        problems.append(f"preprocessing differs from the artifact's ({fields})")
    if candidate.source_checksum != reference.source_checksum:
        problems.append(f"exported from another artifact (checksum {candidate.source_checksum[:12]} != "
                        f"{reference.source_checksum[:12]}): re-export")
    return problems


@dataclass
class ParityReport:
    """All backends against PyTorch on one split. ``bool(report)`` is False when any backend failed."""

    model_dir: str
    export_dir: str
    data: str
    split: str
    images: int
    reference: dict[str, Any]  # torch: accuracy, device, seconds
    results: list[BackendResult]
    preprocess_seconds: float = 0.0
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __bool__(self) -> bool:
        return all(self.results)

    @property
    def compared(self) -> list[BackendResult]:
        return [r for r in self.results if r.status != "skipped"]

    def table(self) -> str:
        rows: list[list[Any]] = [["torch (reference)", "", "fp32", "", "", "", "",
                                  f"{100 * self.reference['accuracy']:.2f}%", "", "reference"]]
        for r in self.results:
            m = r.metrics
            if m:
                rows.append([r.name, r.file or "", r.precision, f"{m['max_abs_logit_diff']:.1e}",
                             f"{m['mean_abs_logit_diff']:.1e}", f"{m['max_abs_prob_diff']:.1e}",
                             f"{100 * m['agreement']:.2f}%", f"{100 * m['accuracy']:.2f}%",
                             f"{m['accuracy_delta_pt']:+.2f}", r.status.upper()])
            else:
                rows.append([r.name, r.file or "", r.precision, "", "", "", "", "", "", r.status.upper()])
        return format_table(["backend", "file", "precision", "max|dlogit|", "mean|dlogit|", "max|dprob|",
                             "agreement", "accuracy", "delta pt", "result"], rows)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "tl_deploy.parity", "created": self.created, "model": self.model_dir,
                "export": self.export_dir, "data": self.data, "split": self.split, "images": self.images,
                "passed": bool(self), "preprocess_seconds": round(self.preprocess_seconds, 2),
                "reference": self.reference, "backends": [r.to_dict() for r in self.results]}

    def to_markdown(self) -> str:
        verdict = "PASSED" if self else "FAILED"
        lines = [f"# Parity: {verdict}", "",
                 f"- model: `{self.model_dir}`", f"- export: `{self.export_dir}`",
                 f"- data: `{self.data}`, split `{self.split}`, {self.images} images",
                 f"- reference: PyTorch on {self.reference['device']}, accuracy "
                 f"{100 * self.reference['accuracy']:.2f}%", f"- created: {self.created}", "",
                 "| backend | file | precision | max abs logit diff | mean abs logit diff | max abs prob diff | "
                 "agreement | accuracy | delta pt | result |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.results:
            m = r.metrics
            cells = [f"{m['max_abs_logit_diff']:.1e}", f"{m['mean_abs_logit_diff']:.1e}",
                     f"{m['max_abs_prob_diff']:.1e}", f"{100 * m['agreement']:.2f}%", f"{100 * m['accuracy']:.2f}%",
                     f"{m['accuracy_delta_pt']:+.2f}"] if m else [""] * 6
            lines.append(f"| {r.name} | {r.file or ''} | {r.precision} | {' | '.join(cells)} | "
                         f"{r.status.upper()} |")
        lines += ["", "## Checks", ""] + [f"- `{r.line()}`" for r in self.results]
        used = {r.precision: r.tolerance for r in self.results if r.tolerance is not None}
        if used:
            lines += ["", "Tolerances (`--atol`, `--max-acc-drop`, `--min-agreement` override them):", "",
                      "| precision | max abs logit diff | max accuracy drop | min agreement |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {p} | {t.atol if t.atol is not None else 'not checked'} | {t.max_acc_drop:g} pt | "
                      f"{t.min_agreement:g}% |" for p, t in sorted(used.items())]
        for r in self.results:
            if r.disagreements:
                lines += ["", f"## {r.name}: {len(r.disagreements)} image(s) classified differently from PyTorch",
                          "", "| image | label | torch | backend |", "| --- | --- | --- | --- |"]
                lines += [f"| `{d['path']}` | {d['label']} | {d['torch']} | {d['backend']} |"
                          for d in r.disagreements[:DISAGREEMENTS_SHOWN]]
                if len(r.disagreements) > DISAGREEMENTS_SHOWN:
                    lines.append(f"\n{len(r.disagreements) - DISAGREEMENTS_SHOWN} more in the JSON report.")
        return "\n".join(lines) + "\n"


def read_export_manifest(export_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The export folder's ``export.json``, or a clear error saying how to make one."""
    from tl_deploy.runtime import EXPORT_MANIFEST
    from tl_deploy.runtime import read_export_manifest as read_checked

    if not (export_dir / EXPORT_MANIFEST).is_file():
        raise ArtifactError(
            f"Export folder not found: {export_dir} (no {EXPORT_MANIFEST}). Run python -m tl_deploy.export "
            f"{model_dir} --int8, or pass --export DIR."
        )
    return read_checked(export_dir)


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


def run_parity(model_dir: str | Path, export_dir: str | Path, *, data: str | Path | None = None,
               split: str = "test", backends: Sequence[str] = tuple(EXPORT_BACKENDS),
               tolerance: Mapping[str, Tolerance] = DEFAULT_TOLERANCES, limit: int | None = None,
               device: str = "cpu", threads: int | None = None, val_split: float | None = None,
               verify: bool = True) -> ParityReport:
    """Compare each of ``backends`` with the artifact's PyTorch model on ``split`` of ``data``.

    ``verify``: check the artifact's manifest and each export file's sha256 (``False``: compare
    modified files deliberately)."""
    from tl_deploy.artifact import read_config
    from tl_deploy.runtime.catalog import cuda_problem, tensorrt_problem

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    bad = [name for name in backends if name not in EXPORT_BACKENDS]
    if bad:
        raise TlDeployError(f"Invalid parity backend(s) {bad}: PyTorch is the reference; compare "
                            f"{', '.join(EXPORT_BACKENDS)}.")
    manifest = read_export_manifest(export_dir, model_dir)
    config = read_config(model_dir)
    if data is None:
        data = (config.get("training") or {}).get("data")
        if not data:
            raise DataError(f"{model_dir}/config.json records no training data: pass --data DIR.")
    data = Path(str(data))
    wants_trt = any(name.startswith("trt-") for name in backends)
    choices = resolve_backends(backends, manifest["files"], model_dir=str(model_dir),
                               tensorrt_problem=tensorrt_problem() if wants_trt else None,
                               cuda_problem=cuda_problem() if device.startswith("cuda") else None)

    start = time.perf_counter()
    reference_clf = open_backend(BackendChoice("torch", "fp32"), model_dir, export_dir, device=device,
                                 verify=verify)
    samples = load_samples(data, split, reference_clf.class_names, limit, config.get("training"), val_split)
    paths = [path for path, _ in samples]
    labels = np.array([label for _, label in samples])  # (N,)
    names = [str(p) for p in paths]
    inputs = {reference_clf.spec: preprocess_all(paths, reference_clf.spec)}  # one entry unless metadata differs
    preprocess_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_clf.infer(inputs[reference_clf.spec])  # (N, C)
    reference_info: dict[str, Any] = {"backend": "torch", "device": reference_clf.device,
                                      "accuracy": float((reference.argmax(1) == labels).mean()),
                                      "seconds": round(time.perf_counter() - start, 2)}
    _logger.info("torch reference: %d images, accuracy %.2f%% (%.1f s)", len(labels),
                 100 * reference_info["accuracy"], reference_info["seconds"])

    results = []
    for choice in choices:
        if not choice.runnable:
            results.append(BackendResult(choice.name, choice.precision, choice.file, "skipped",
                                         reason=choice.skip_reason))
            continue
        results.append(_check_backend(choice, model_dir, export_dir, reference_clf.metadata, reference, labels,
                                      names, inputs, paths, tolerance[choice.precision], threads, verify))
        _logger.debug("%s", results[-1].line())
    return ParityReport(model_dir=str(model_dir), export_dir=str(export_dir), data=str(data), split=split,
                        images=len(labels), reference=reference_info, results=results,
                        preprocess_seconds=preprocess_seconds)


def _check_backend(choice: BackendChoice, model_dir: Path, export_dir: Path, reference_meta: OnnxMetadata,
                   reference: np.ndarray, labels: np.ndarray, names: list[str],
                   inputs: dict[PreprocessSpec, np.ndarray], paths: list[Path], tolerance: Tolerance,
                   threads: int | None, verify: bool) -> BackendResult:
    start = time.perf_counter()
    try:
        clf = open_backend(choice, model_dir, export_dir, threads=threads, verify=verify)
    except BackendUnavailableError as exc:
        return BackendResult(choice.name, choice.precision, choice.file, "skipped", reason=str(exc))
    except TlDeployError as exc:  # a file that does not load is a broken export
        return BackendResult(choice.name, choice.precision, choice.file, "failed", tolerance, reason=str(exc))
    with clf:
        problems = metadata_problems(clf.metadata, reference_meta)
        # Each backend gets the input its own metadata asks for: a wrong spec there shows in the numbers too.
        if clf.spec not in inputs:
            inputs[clf.spec] = preprocess_all(paths, clf.spec)
        try:
            logits = clf.infer(inputs[clf.spec])  # (N, C)
        except TlDeployError as exc:
            return BackendResult(choice.name, choice.precision, choice.file, "failed", tolerance,
                                 reason=f"inference failed: {exc}", device=clf.device)
        metrics, failures, disagreements = compare_logits(reference, logits, labels, names,
                                                          list(reference_meta.class_names), tolerance)
        failures = problems + failures  # the line shows the thresholds itself, then the other problems
        return BackendResult(choice.name, choice.precision, choice.file, "failed" if failures else "passed",
                             tolerance, reason="; ".join(failures), problems=problems, metrics=metrics,
                             disagreements=disagreements,
                             device=clf.device, seconds=time.perf_counter() - start)


def report_paths(export_dir: Path, split: str) -> tuple[Path, Path]:
    """``export/<run>.parity-<split>.json`` and ``.md``: next to the export folder, not inside it."""
    folder = export_dir if export_dir.name not in ("", ".", "..") else export_dir.resolve()
    stem = folder.parent / f"{folder.name}.parity-{split}"
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"


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
                   help="max |logit difference|; a bare X sets every precision (default fp32=1e-3; fp16/int8 "
                        "unchecked: their logits move by 1e-2..1, so write fp32=X)")
    p.add_argument("--max-acc-drop", action="append", metavar="[PRECISION=]PT",
                   help="accuracy points a backend may lose (default fp32=0, fp16=0.3, int8=1.0)")
    p.add_argument("--min-agreement", action="append", metavar="[PRECISION=]PCT",
                   help="top-1 agreement with torch in percent (default fp32=100, fp16=99.5, int8=98)")
    add_limit(p, help="compare on at most N images of the split, evenly spaced (default: all)")
    add_device(p, help="device of the PyTorch reference: auto (CUDA when present), cpu, cuda or cuda:N; "
                       "it computes in FP32 either way")
    add_threads(p, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
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
    if not any(name.startswith("onnx-") for name in backends):
        refuse_unused(args, ["threads"], "without an onnx-* backend (it sets onnxruntime's threads): drop it or "
                                         "add an onnx-* backend")
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
    json_path, md_path = report_paths(export_dir, args.split)
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
