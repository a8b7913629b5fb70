"""Evaluate a model artifact on a split of an ImageFolder dataset.

    python -m tl_deploy.evaluate models/animal-shape-efficientnet_lite0-lp-ft --data data/animal-shape --split test

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
from tl_deploy.cli import FRACTION, POSITIVE_INT, OneLineParser, add_verbose, run_cli
from tl_deploy.data import ImageDataset, eval_transform, load_model_splits
from tl_deploy.errors import DataError
from tl_deploy.fileio import atomic_write_json, check_report_path
from tl_deploy.reports import ClassificationResult, format_result
from tl_deploy.train.loop import predict_logits, summarize


def evaluate_artifact(artifact: Artifact, data: Path, split: str = "test", batch_size: int = 64,
                      workers: int = 0, val_split: float | None = None) -> ClassificationResult:
    """Accuracy of an artifact on one split; the split's classes must be the artifact's.

    Without a ``val/`` folder the run's recorded ``--val-split`` applies (``val_split`` overrides it).
    """
    splits = load_model_splits(data, artifact.config.get("training"), val_split)
    samples = splits.get(split)
    if not samples:
        raise DataError(f"{data} has no {split}/ images. Choose --split train, val or test.")
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
    p = OneLineParser(prog="python -m tl_deploy.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="model artifact folder")
    p.add_argument("--data", type=Path, help="ImageFolder root (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    p.add_argument("--val-split", type=FRACTION,
                   help="with no val/: fraction of train/ held out (default: the model's own, from its config)")
    p.add_argument("--json", type=Path, help="where to write the JSON (default: MODEL_DIR/../<name>.eval-<split>.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's checksum check")
    add_verbose(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        artifact = load_artifact(args.model_dir, verify=not args.no_verify)
        training = artifact.config.get("training")
        recorded = training.get("data") if isinstance(training, dict) else None
        data = args.data or (Path(recorded) if isinstance(recorded, str) and recorded else None)
        if data is None:
            raise DataError("The artifact does not record its data folder: pass --data DIR.")
        out = args.json or default_report_path(args.model_dir, args.split)
        check_report_path(out, "--json", "json", inputs={"data": data})
        result = evaluate_artifact(artifact, Path(data), args.split, args.batch_size, val_split=args.val_split)
        print(format_result(result, artifact.class_names, args.split))
        report: dict[str, Any] = {"model": str(args.model_dir), "data": str(data), "split": args.split,
                                  **result.to_dict(artifact.class_names)}
        atomic_write_json(out, report)
        print(f"wrote {out}")
        return 0

    return run_cli(body, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
