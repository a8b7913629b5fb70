"""Evaluate a model artifact on a split of an ImageFolder dataset.

    tl-deploy evaluate models/animal-shape-efficientnet_lite0-lp-ft --data data/animal-shape --split test

Prints accuracy, per-class accuracy and the confusion matrix, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_deploy.artifact import Artifact, load_artifact
from tl_deploy.cli import (
    EXIT_OK,
    INTERRUPTED_NOTHING_KEPT,
    POSITIVE_INT,
    add_limit,
    add_threads,
    add_val_fraction,
    add_verbose,
    new_parser,
    old_names,
    refuse_unused,
    run_cli,
)
from tl_deploy.data import ImageDataset, eval_transform, load_model_splits
from tl_deploy.errors import DataError
from tl_deploy.fileio import atomic_write_json, check_report_path
from tl_deploy.reports import ClassificationResult, format_result
from tl_deploy.train.loop import predict_logits, summarize


def evaluate_artifact(artifact: Artifact, data: Path, split: str = "test", batch_size: int = 64,
                      workers: int = 0, val_split: float | None = None,
                      limit: int | None = None) -> ClassificationResult:
    """Accuracy of an artifact on one split; the split's classes must be the artifact's.

    Without a ``val/`` folder the run's recorded ``--val-fraction`` applies (``val_split`` overrides it).
    ``limit``: at most this many images of the split, evenly spaced.
    """
    splits = load_model_splits(data, artifact.config.get("training"), val_split)
    samples = splits.get(split)
    if not samples:
        raise DataError(f"{data} has no {split}/ images. Choose --split train, val or test.")
    if limit is not None:
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    if splits.class_names != artifact.class_names:
        raise DataError(
            f"Classes of {data} ({splits.class_names}) differ from the model's ({artifact.class_names}). "
            "Evaluate on data with the same class folders."
        )
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(artifact.spec)),
                                         batch_size=batch_size, num_workers=workers)
    logits, labels = predict_logits(artifact.model, loader, torch.device("cpu"), amp=None, desc=f"{split} eval")
    return summarize(logits, labels, len(artifact.class_names))


def default_report_path(model_dir: Path, split: str) -> Path:
    """``models/<run>.eval-<split>.json``: next to the artifact folder, not inside it."""
    folder = model_dir if model_dir.name not in ("", ".", "..") else model_dir.resolve()
    return folder.parent / f"{folder.name}.eval-{split}.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = new_parser("evaluate", __doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="model artifact folder")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="ImageFolder root (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="the split evaluated")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, metavar="N", help="images per forward pass")
    add_val_fraction(p)
    add_limit(p)
    add_threads(p, help="torch CPU intra-op threads (default: torch's choice)")
    old_names(p.add_argument("--report", "--json", dest="report", type=Path, metavar="PATH",
                             help="where to write the JSON report (default: <model_dir>.eval-<split>.json, next "
                                  "to the artifact folder)"),
              "--json")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's checksum check")
    add_verbose(p)
    return p


def evaluate(args: argparse.Namespace) -> int:
    """The evaluate verb: score one split, print the result, write the JSON report."""
    if args.split == "test":
        refuse_unused(args, ["val_fraction"], "with --split test (it only carves val/ out of train/): drop it or "
                                              "choose --split val or train")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    artifact = load_artifact(args.model_dir, verify=not args.no_verify)
    training = artifact.config.get("training")
    recorded = training.get("data") if isinstance(training, dict) else None
    data = args.data or (Path(recorded) if isinstance(recorded, str) and recorded else None)
    if data is None:
        raise DataError("The artifact does not record its data folder: pass --data DIR.")
    out = args.report or default_report_path(args.model_dir, args.split)
    check_report_path(out, getattr(args, "_given_flags", {}).get("report", "--report"), "json",
                      inputs={"data": data})
    result = evaluate_artifact(artifact, Path(data), args.split, args.batch_size, val_split=args.val_fraction,
                               limit=args.limit)
    print(format_result(result, artifact.class_names, args.split))
    report: dict[str, Any] = {"model": str(args.model_dir), "data": str(data), "split": args.split,
                              **result.to_dict(artifact.class_names)}
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, get_args_parser().parse_args(argv), interrupted=INTERRUPTED_NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())
