"""``tl-deploy experiments`` / ``python -m tl_deploy.experiments``: transfer-quality experiments.

    python -m tl_deploy.experiments transfer-curve [--data DIR] [--shots 1,5,10,50,all] [--seeds 3]

The experiment itself is ``tl_deploy.train.transfer_curve``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tl_deploy import cli
from tl_deploy.cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Range
from tl_deploy.train.transfer_curve import METHODS, CurveConfig, transfer_curve

RANGES: dict[str, Range] = {  # allowed values of the numeric options
    "seeds": POSITIVE_INT,
    "img_size": Range(int, 8, 4096),
    "steps": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "lr": POSITIVE,
    "backbone_lr_mult": NON_NEGATIVE,
    "scratch_lr": POSITIVE,
    "probe_steps": POSITIVE_INT,
    "probe_lr": POSITIVE,
    "eval_per_class": COUNT,
}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def get_args_parser() -> argparse.ArgumentParser:
    d = CurveConfig()
    p = cli.new_parser("experiments", "Transfer-quality experiments.")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    c = sub.add_parser("transfer-curve", help="test accuracy vs labelled images per class, per transfer method",
                       description="Test accuracy against labelled images per class, for each transfer method.",
                       formatter_class=cli.HelpFormatter)
    c.add_argument("--data", help="ImageFolder root with train/, val/ and test/ (default: embedded Animal-Shape)")
    c.add_argument("--model", default=d.model, help="timm architecture name")
    c.add_argument("--weights", default=d.weights, help="pretrained weights: embedded, hub or a file path")
    c.add_argument("--shots", default=",".join(d.shots), help="labelled images per class, comma-separated; 'all'")
    c.add_argument("--seeds", default=d.seeds, help="seeds per budget (different images and init)")
    c.add_argument("--methods", default=",".join(d.methods), help=f"subset of {','.join(METHODS)}")
    c.add_argument("--img-size", default=d.img_size, help="network input side in pixels")
    c.add_argument("--steps", default=d.steps, help="optimisation steps of every backbone-training run")
    c.add_argument("--batch-size", default=d.batch_size, help="images per optimisation step")
    c.add_argument("--opt", dest="optimizer", choices=("sgd", "adamw"), default=d.optimizer,
                   help="optimizer of the pretrained fine-tuning runs (scratch: AdamW)")
    c.add_argument("--lr", default=d.lr, help="head LR when fine-tuning")
    c.add_argument("--backbone-lr-mult", default=d.backbone_lr_mult, help="backbone LR = lr * this")
    c.add_argument("--scratch-lr", default=d.scratch_lr, help="AdamW LR of the scratch baseline (all layers)")
    c.add_argument("--probe-steps", default=d.probe_steps, help="steps of the probes on cached features")
    c.add_argument("--probe-lr", default=d.probe_lr, help="learning rate of the probes")
    c.add_argument("--eval-per-class", default=d.eval_per_class,
                   help="score on this many test images per class (fixed, seed 0); 0 or unset: the whole test split")
    cli.add_device(c)
    cli.add_threads(c, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    c.add_argument("--cache-dir", help="feature cache folder (default: $TL_DEPLOY_CACHE or ~/.cache/tl_deploy)")
    c.add_argument("--out", default=d.out, help="folder for results.json, table.md and curve.png")
    cli.add_verbose(c)
    cli.apply_ranges(c, RANGES)
    return p


def config_from_args(a: argparse.Namespace) -> CurveConfig:
    return CurveConfig(data=a.data, model=a.model, weights=a.weights, shots=_csv(a.shots), seeds=a.seeds,
                       methods=_csv(a.methods), img_size=a.img_size, steps=a.steps, batch_size=a.batch_size,
                       optimizer=a.optimizer, lr=a.lr, backbone_lr_mult=a.backbone_lr_mult, scratch_lr=a.scratch_lr,
                       probe_steps=a.probe_steps, probe_lr=a.probe_lr, eval_per_class=a.eval_per_class or None,
                       device=a.device, threads=a.threads, cache_dir=a.cache_dir, out=a.out)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        transfer_curve(config_from_args(a))
        return 0

    return cli.run_cli(body, args)


if __name__ == "__main__":
    sys.exit(main())
