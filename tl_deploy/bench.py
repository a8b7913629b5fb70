"""Measure every backend: latency and throughput per batch size, and image file in -> label out.

    tl-deploy bench models/<run> [--export export/<run>] [--backends torch,onnx-fp32,onnx-int8]
                       [--batch 1,8,32] [--threads N] [--rounds 10] [--seconds 0.3] [--limit 32]

Warm-up calls are excluded. Backends run in interleaved rounds (the order rotates every round), so
background load and clock drift hit all of them alike, and the ratio to PyTorch eager is the median of
per-round ratios. Idle thread pools are told not to spin, so a backend waiting its turn does not
steal the cores of the one being timed. The end-to-end figure includes reading the image file,
preprocessing, inference and the label. Table on screen; JSON and a PNG plot next to the export folder.
On a CUDA machine ``auto`` runs PyTorch on the GPU, adds PyTorch with CUDA graphs, and TensorRT engines
when TensorRT is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.cli import (
    COUNT,
    EXIT_OK,
    INTERRUPTED_NOTHING_KEPT,
    POSITIVE_INT,
    Range,
    add_device,
    add_threads,
    add_val_fraction,
    add_verbose,
    apply_ranges,
    new_parser,
    old_names,
    refuse_unused,
    run_cli,
    usage_errors,
)
from tl_deploy.errors import BackendUnavailableError, DataError, TlDeployError, UsageError
from tl_deploy.fileio import atomic_write_bytes, atomic_write_json, check_report_path
from tl_deploy.formats.export_manifest import read_export_manifest
from tl_deploy.reports import format_table
from tl_deploy.runtime.base import usable_cpus
from tl_deploy.runtime.catalog import BackendChoice, open_backend, parse_backends, resolve_backends
from tl_deploy.runtime.classifier import Classifier
from tl_deploy.runtime.gpu import cuda_problem, tensorrt_problem

_logger = logging.getLogger(__name__)

DEFAULT_BACKENDS = ("torch", "torch-cudagraph", "onnx-fp32", "onnx-fp16", "onnx-int8", "trt-fp32", "trt-fp16",
                    "trt-int8")
REFERENCE = "torch"  # ratios are to PyTorch eager
E2E = "e2e"  # the key of the end-to-end rows


@dataclass(frozen=True)
class BenchConfig:
    """How long and how much to measure."""

    batches: tuple[int, ...] = (1, 8, 32)  # batch sizes timed with preprocessed input
    rounds: int = 10  # interleaved rounds; every backend runs once per round
    seconds: float = 0.3  # time per backend per round (sets the number of calls)
    warmup: int = 3  # untimed calls per backend and batch before timing
    e2e_images: int = 32  # image files cycled for the end-to-end figure (0: skip it)

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise TlDeployError(f"Invalid --batch {self.batches}: give positive batch sizes, e.g. 1,8,32.")
        if self.rounds < 1 or self.seconds <= 0 or self.warmup < 0 or self.e2e_images < 0:
            raise TlDeployError(
                f"Invalid timing settings rounds={self.rounds}, seconds={self.seconds}, warmup={self.warmup}, "
                f"e2e_images={self.e2e_images}: rounds >= 1, seconds > 0, the others >= 0."
            )


@dataclass
class Timing:
    """One backend at one batch size (or end to end)."""

    p50_ms: float  # latency of one call (one batch)
    p90_ms: float
    p99_ms: float
    images_per_s: float  # median over rounds
    calls: int  # timed calls, warm-up excluded
    vs_torch: float | None = None  # median per-round throughput ratio to PyTorch eager


@dataclass
class BenchReport:
    """Every timing of one run, with what was measured where."""

    model_dir: str
    export_dir: str
    config: BenchConfig
    threads: int
    device: str
    backends: list[dict[str, Any]]  # name, precision, file, device, status, reason
    timings: dict[str, dict[str, Timing]]  # batch ("1", "8", ..., "e2e") -> backend -> timing
    e2e_note: str = ""  # where the end-to-end images came from, or why it was skipped
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "tl_deploy.bench", "created": self.created, "model": self.model_dir,
                "export": self.export_dir, "config": asdict(self.config), "threads": self.threads,
                "device": self.device, "machine": self.machine, "backends": self.backends,
                "end_to_end_images": self.e2e_note,
                "timings": {batch: {name: asdict(t) for name, t in rows.items()}
                            for batch, rows in self.timings.items()}}

    def table(self) -> str:
        rows = []
        for batch, timings in self.timings.items():
            for name, t in timings.items():
                rows.append([name, "file->label" if batch == E2E else batch, f"{t.p50_ms:.2f}", f"{t.p90_ms:.2f}",
                             f"{t.p99_ms:.2f}", f"{t.images_per_s:.1f}",
                             f"{t.vs_torch:.2f}x" if t.vs_torch is not None else ""])
        return format_table(["backend", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "vs torch"], rows)


def time_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls of ``fn``."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleaved(fns: dict[str, Callable[[], object]], images_per_call: int, config: BenchConfig) -> dict[str, Timing]:
    """Time every function in rotating interleaved rounds; warm-up excluded."""
    calls_per_round = {}
    for name, fn in fns.items():
        time_calls(fn, config.warmup)
        probe = statistics.median(time_calls(fn, 3))
        calls_per_round[name] = max(1, int(config.seconds / max(probe, 1e-6)))
    names = list(fns)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(config.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # no backend always runs first
            seconds = time_calls(fns[name], calls_per_round[name])
            latencies[name].extend(seconds)
            rates[name].append(images_per_call * len(seconds) / sum(seconds))
    out = {}
    for name in names:
        ms = 1000.0 * np.asarray(latencies[name])
        ratio = None
        if REFERENCE in rates and name != REFERENCE:
            ratio = statistics.median(a / b for a, b in zip(rates[name], rates[REFERENCE]))
        elif name == REFERENCE:
            ratio = 1.0
        out[name] = Timing(p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                           p99_ms=float(np.percentile(ms, 99)), images_per_s=statistics.median(rates[name]),
                           calls=len(ms), vs_torch=ratio)
    return out


def _infer_call(clf: Classifier, batch: np.ndarray) -> Callable[[], object]:
    return lambda: clf.infer(batch)


def _batch_input(images: np.ndarray, batch: int) -> np.ndarray:
    """(batch, 3, H, W): the given images repeated to fill the batch."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def _e2e_files(model_dir: Path, data: Path | None, split: str, count: int,
               val_split: float | None = None) -> tuple[list[Path], str]:
    """Image files for the end-to-end figure, and a note on where they came from (or why there are none)."""
    from tl_deploy.artifact import read_config
    from tl_deploy.data import load_model_splits

    if count == 0:
        return [], "skipped (--e2e-images 0)"
    training = read_config(model_dir).get("training") or {}
    if data is None:
        recorded = training.get("data") if isinstance(training, dict) else None
        if not recorded:
            return [], "skipped: the artifact records no data folder (pass --data DIR)"
        data = Path(str(recorded))
    if not data.is_dir():
        return [], f"skipped: data folder {data} not found (pass --data DIR)"
    samples = load_model_splits(data, training, val_split, verify_images=False).get(split)
    if not samples:
        return [], f"skipped: {data} has no {split}/ images"
    files = [path for path, _ in samples[:: max(1, len(samples) // count)][:count]]
    return files, f"{len(files)} files of {data}/{split}, one per call"


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus_usable": usable_cpus()}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))  # the GPU timed, not GPU 0
    return info


def open_backends(choices: Sequence[BackendChoice], model_dir: Path, export_dir: Path, *, device: str,
                  threads: int, verify: bool) -> tuple[dict[str, Classifier], list[dict[str, Any]]]:
    """The classifiers of the runnable backends, and one row per backend saying what runs or why not.

    Idle onnxruntime threads do not spin, so a backend waiting its turn leaves the cores to the one timed."""
    classifiers: dict[str, Classifier] = {}
    listed = []
    for choice in choices:
        row = {"backend": choice.name, "precision": choice.precision, "file": choice.file, "status": "skipped",
               "reason": choice.skip_reason, "device": ""}
        if choice.runnable:
            try:
                classifiers[choice.name] = open_backend(choice, model_dir, export_dir, device=device,
                                                        threads=threads, spin=False, verify=verify)
                row.update(status="ok", device=classifiers[choice.name].device)
            except BackendUnavailableError as exc:
                row["reason"] = str(exc)
        listed.append(row)
    return classifiers, listed


def run_bench(model_dir: str | Path, export_dir: str | Path, *, backends: Sequence[str] = DEFAULT_BACKENDS,
              config: BenchConfig = BenchConfig(), threads: int | None = None, device: str = "auto",
              data: str | Path | None = None, split: str = "test", val_split: float | None = None,
              verify: bool = True) -> BenchReport:
    """Time ``backends`` of ``model_dir`` / ``export_dir`` in one interleaved run.

    ``verify``: check the artifact's manifest and each export file's sha256 before timing it."""
    from tl_deploy.preprocess import prepare

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    manifest = read_export_manifest(export_dir, model_dir=model_dir)
    threads = threads or usable_cpus()
    if threads < 1:
        raise TlDeployError(f"Invalid --threads {threads}: choose 1 or more.")
    cuda = cuda_problem()
    if device == "auto":
        device = "cpu" if cuda else "cuda"
    elif device.startswith("cuda") and cuda:
        raise BackendUnavailableError(f"--device {device} asked for but {cuda}: use --device cpu.")
    import torch

    torch.set_num_threads(threads)
    wants_trt = any(name.startswith("trt-") for name in backends)
    choices = resolve_backends(backends, manifest["files"], model_dir=str(model_dir),
                               tensorrt_problem=tensorrt_problem() if wants_trt else None,
                               cuda_problem=None if device.startswith("cuda") else
                               cuda or "the benchmark runs on the CPU (--device cpu)")
    classifiers, listed = open_backends(choices, model_dir, export_dir, device=device, threads=threads,
                                        verify=verify)
    if not classifiers:
        raise BackendUnavailableError("No backend can run here: " +
                                      "; ".join(f"{r['backend']}: {r['reason']}" for r in listed))
    spec = next(iter(classifiers.values())).spec
    files, e2e_note = _e2e_files(model_dir, Path(data) if data is not None else None, split, config.e2e_images,
                                 val_split)
    if files:
        images = np.stack([prepare(path, spec) for path in files[:max(config.batches)]])  # (K, 3, H, W)
    else:
        images = np.random.default_rng(0).standard_normal((1, 3, spec.input_size, spec.input_size)).astype(np.float32)

    timings: dict[str, dict[str, Timing]] = {}
    try:
        for batch in config.batches:
            x = _batch_input(images, batch)
            fns = {name: _infer_call(clf, x) for name, clf in classifiers.items()}
            _logger.info("batch %d: timing %s", batch, ", ".join(fns))
            timings[str(batch)] = interleaved(fns, batch, config)
        if files:
            def predict_next(clf: Classifier) -> Callable[[], object]:
                cycle = itertools.cycle(files)
                return lambda: clf.predict(next(cycle))

            _logger.info("end to end: timing %s", ", ".join(classifiers))
            timings[E2E] = interleaved({name: predict_next(clf) for name, clf in classifiers.items()}, 1, config)
    finally:
        for clf in classifiers.values():
            clf.close()
    return BenchReport(model_dir=str(model_dir), export_dir=str(export_dir), config=config, threads=threads,
                       device=device, backends=listed, timings=timings, e2e_note=e2e_note,
                       machine=machine_info(device))


def throughput_png(report: BenchReport) -> bytes:
    """Grouped bars: images/s per backend, one group per batch size (and end to end), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl_deploy.reports import png_bytes

    groups = list(report.timings)
    names = sorted({name for rows in report.timings.values() for name in rows},
                   key=lambda n: [r["backend"] for r in report.backends].index(n))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.8))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ys = [report.timings[g][name].images_per_s if name in report.timings[g] else 0.0 for g in groups]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), [f"batch {g}" if g != E2E else "file->label" for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(f"{Path(report.model_dir).name}: {report.device}, {report.threads} thread(s)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def report_paths(stem: Path) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.png``; the default stem is ``export/<run>.bench``, next to the export folder."""
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.png"


def parse_batches(text: str) -> tuple[int, ...]:
    """``--batch 1,8,32`` -> (1, 8, 32); anything else is a usage error (exit code 2)."""
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        batches = ()
    if not batches or any(b < 1 for b in batches):
        raise UsageError(f"Invalid --batch {text!r}: give comma-separated positive integers, e.g. 1,8,32.")
    return batches


RANGES: dict[str, Range] = {  # allowed values of the numeric options
    "threads": POSITIVE_INT,
    "rounds": POSITIVE_INT,
    "seconds": Range(float, 0.0, 3600.0, low_open=True),
    "warmup": COUNT,
    "e2e_images": Range(int, 0, 100_000),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = new_parser("bench", __doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="model artifact folder (PyTorch eager is the baseline)")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="export folder (default: export/<run-name>, as tl-deploy export writes it)")
    p.add_argument("--backends", nargs="+", default=[",".join(DEFAULT_BACKENDS)], metavar="NAME",
                   help=f"space or comma separated (default: {','.join(DEFAULT_BACKENDS)}; those that cannot run "
                        "here are listed as skipped)")
    p.add_argument("--batch", default="1,8,32", metavar="B[,B...]",
                   help="batch sizes timed with preprocessed input, comma separated")
    add_threads(p, help="intra-op threads of every CPU backend (default: the usable cores)")
    add_device(p, help="torch device: auto (CUDA when present: adds torch-cudagraph and TensorRT), cpu, cuda "
                       "or cuda:N")
    p.add_argument("--rounds", default=BenchConfig.rounds, metavar="N",
                   help="interleaved rounds; every backend runs once per round")
    p.add_argument("--seconds", default=BenchConfig.seconds, metavar="S",
                   help="time per backend per round, which sets the number of calls")
    p.add_argument("--warmup", default=BenchConfig.warmup, metavar="N",
                   help="untimed calls per backend and batch size before timing")
    old_names(p.add_argument("--limit", "--e2e-images", dest="e2e_images", default=BenchConfig.e2e_images,
                             metavar="N", help="image files of the split timed end to end, file in -> label out "
                                               f"(default {BenchConfig.e2e_images}; 0 skips the end-to-end figure)"),
              "--e2e-images")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="ImageFolder of the end-to-end images (default: the training data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split of the end-to-end images")
    add_val_fraction(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="time files that no longer match their sha256 (artifact manifest, export.json)")
    old_names(p.add_argument("--report", "--out", dest="report", type=Path, metavar="STEM",
                             help="report path stem: writes STEM.json and STEM.png (default: <export>.bench)"),
              "--out")
    add_verbose(p)
    apply_ranges(p, RANGES)
    return p


def refuse_no_ops(args: argparse.Namespace) -> None:
    """The end-to-end options do nothing when the end-to-end figure is skipped, and so does a validation
    fraction on the test split."""
    if args.e2e_images == 0:
        refuse_unused(args, ["data", "split", "val_fraction"],
                      "with --limit 0 (no end-to-end figure): drop it or give --limit N")
    elif args.split == "test":
        refuse_unused(args, ["val_fraction"], "with --split test (it only carves val/ out of train/): drop it or "
                                              "choose --split val or train")


def bench(args: argparse.Namespace) -> int:
    """The bench verb: time, print the table, write the JSON and the plot."""
    with usage_errors():
        config = BenchConfig(batches=parse_batches(args.batch), rounds=args.rounds, seconds=args.seconds,
                             warmup=args.warmup, e2e_images=args.e2e_images)
        backends = parse_backends(args.backends)
    refuse_no_ops(args)
    export_dir = args.export or Path("export") / args.model_dir.resolve().name
    if args.data is not None and not args.data.is_dir():
        raise DataError(f"Data folder not found: {args.data}. Pass --data pointing at an ImageFolder tree.")
    report_flag = getattr(args, "_given_flags", {}).get("report", "--report")
    json_path, png_path = report_paths(args.report or export_dir.parent / f"{export_dir.name}.bench")
    for path, content in ((json_path, "json"), (png_path, "png")):
        check_report_path(path, report_flag, content, inputs={"data": args.data})
    report = run_bench(args.model_dir, export_dir, backends=backends, config=config, threads=args.threads,
                       device=args.device, data=args.data, split=args.split, val_split=args.val_fraction,
                       verify=args.verify)
    print(f"{Path(report.model_dir).name} on {report.device}, {report.threads} thread(s); "
          f"end to end: {report.e2e_note}")
    print(report.table())
    for row in report.backends:
        if row["status"] != "ok":
            print(f"SKIPPED | {row['backend']} | {row['reason']}")
    atomic_write_json(json_path, report.to_dict())
    atomic_write_bytes(png_path, throughput_png(report))
    print(f"wrote {json_path} and {png_path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch is imported: its idle OpenMP workers wait passively instead of spinning on the
    # cores of the backend being timed (onnxruntime's pools get the same rule per session).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return run_cli(bench, get_args_parser().parse_args(argv), interrupted=INTERRUPTED_NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())
