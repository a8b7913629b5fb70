"""Judge backends against a reference: tolerances per precision, logit metrics, one verdict each.

The second step of parity (the first, ``parity.run``, only produces logits): ``compare(results,
tolerances, reference=...)`` turns each ``RunResult`` into a ``BackendResult`` whose ``bool`` is
False when it FAILED and whose ``line()`` is one ``PASSED | ...`` / ``FAILED | ...`` / ``SKIPPED | ...``
line, as Polygraphy's ``compare_accuracy`` does. ``ParityReport`` gathers them, with the table,
JSON and Markdown views.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tl_deploy.errors import TlDeployError
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.formats.names import COMPUTE_PRECISIONS
from tl_deploy.reports import format_table
from tl_deploy.runtime.classifier import softmax

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
    # bf16 keeps FP32's range but 8 mantissa bits (FP16 has 11): logits move by ~1e-2, held like FP16
    "bf16": Tolerance(atol=None, max_acc_drop=0.3, min_agreement=99.5),
    "int8": Tolerance(atol=None, max_acc_drop=1.0, min_agreement=98.0),
}
_EPS = 1e-9  # float slack when comparing measured shares with tolerances


def parse_overrides(values: Sequence[str] | None, option: str, *, low: float,
                    high: float | None = None) -> dict[str, float]:
    """``["1e-3"]`` (every precision) or ``["int8=0.5", "fp16=0.2"]`` -> {precision: value}."""
    out: dict[str, float] = {}
    for value in values or ():
        precision, _, number = value.rpartition("=")
        targets = [precision] if precision else list(COMPUTE_PRECISIONS)
        if precision and precision not in COMPUTE_PRECISIONS:
            raise TlDeployError(f"Invalid {option} {value!r}: precision must be one of "
                                f"{', '.join(COMPUTE_PRECISIONS)}.")
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


@dataclass
class RunResult:
    """One backend's logits on the shared batch, or why it has none (``run``'s output, not judged yet)."""

    name: str
    precision: str
    file: str | None
    status: str  # "ran", "skipped" (cannot run here) or "failed" (broken file, failed inference)
    reason: str = ""
    logits: np.ndarray | None = None  # (N, C)
    metadata: OnnxMetadata | None = None  # the backend's own metadata
    device: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Reference:
    """What every backend is compared with: PyTorch's logits on the same images, and their labels."""

    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) the model's class index of each image
    names: list[str]  # image paths, for the disagreements
    metadata: OnnxMetadata  # the artifact's
    info: dict[str, Any]  # backend, device, accuracy, seconds: the report's "reference"


def compare_one(result: RunResult, reference: Reference, tolerance: Tolerance) -> BackendResult:
    """Judge one backend's run against the reference with its precision's tolerance."""
    head = (result.name, result.precision, result.file)
    if result.status == "skipped":
        return BackendResult(*head, "skipped", reason=result.reason)
    if result.status == "failed" or result.logits is None or result.metadata is None:
        return BackendResult(*head, "failed", tolerance, reason=result.reason, device=result.device)
    problems = metadata_problems(result.metadata, reference.metadata)
    metrics, failures, disagreements = compare_logits(reference.logits, result.logits, reference.labels,
                                                      reference.names, list(reference.metadata.class_names),
                                                      tolerance)
    failures = problems + failures  # the line shows the thresholds itself, then the other problems
    return BackendResult(*head, "failed" if failures else "passed", tolerance, reason="; ".join(failures),
                         problems=problems, metrics=metrics, disagreements=disagreements, device=result.device,
                         seconds=result.seconds)


def compare(results: Sequence[RunResult], tolerances: Mapping[str, Tolerance], *,
            reference: Reference) -> list[BackendResult]:
    """Judge every run against the reference (step 2 of 2): one PASSED/FAILED/SKIPPED result each."""
    return [compare_one(result, reference, tolerances[result.precision]) for result in results]
