"""Adapt a deployed model artifact to a new site's unlabelled images, without the source data.

    tl-deploy adapt models/animal-shape-efficientnet_lite0-lp-ft --target-unlabeled data/animal-shape-m

Source-free: only the artifact and the target images are read. Methods:

- ``adabn`` (Li et al., 2016): every BatchNorm's running statistics re-estimated on the target images
  (a cumulative average over one pass); no gradient step.
- ``tent`` (Wang et al., ICLR 2021): AdaBN, then the mean prediction entropy minimised by updating the
  BatchNorm affine parameters only.
- ``shot`` (Liang et al., ICML 2020, SHOT-IM): the classifier frozen, the feature extractor trained
  with information maximisation (mean prediction entropy minus the entropy of the mean prediction),
  optionally plus SHOT's cross-entropy on pseudo-labels from target class centroids
  (``--pseudo-label-weight``). BatchNorm statistics stay the source model's.

The result is a new artifact, ``<source-run>-adapted-<method>-<target-folder>`` next to the source by
default, whose ``config.json`` records the adaptation (``adaptation``: the source artifact and the sha256
of its weights, the method and its settings, the target folder and image count, the time taken, and
label-free statistics before and after). A model whose target predictions collapse is refused unless
``--force``. When the target folder has a labelled ``test/`` with the source's classes, the labels are
read to report target test accuracy before and after, and for nothing else.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tl_deploy.adapt.methods import (
    DEFAULT_LR,
    DEFAULT_METHOD,
    METHODS,
    AdaptConfig,
    adaptation_collapse,
    label_free_doubt,
    run_method,
)
from tl_deploy.artifact import Artifact, load_artifact, save_artifact
from tl_deploy.cli import (
    EXIT_OK,
    INTERRUPTED_NOTHING_KEPT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    add_device,
    add_threads,
    add_verbose,
    new_parser,
    refuse_unused,
    resolve_device,
    run_cli,
)
from tl_deploy.data import ImageDataset, Sample, eval_transform
from tl_deploy.errors import DataError, TlDeployError, UsageError
from tl_deploy.fileio import check_output_folder, check_output_writable, sha256_file
from tl_deploy.formats.names import ARTIFACT_WEIGHTS
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.adaptation import target_test_samples, unlabeled_samples
from tl_deploy.train.loop import predict_logits
from tl_deploy.train.target_stats import TargetStats, collapse_reason, target_stats

__all__ = ["METHODS", "AdaptConfig", "AdaptResult", "CollapseError", "adapt_artifact", "default_out",
           "get_args_parser", "label_free_doubt", "main"]

_logger = logging.getLogger(__name__)


class CollapseError(TlDeployError):
    """The adapted model's target predictions collapsed: it is not written (``--force`` writes it)."""



# ----------------------------------------------------------------------------- target images


def target_images(folder: Path, limit: int | None) -> tuple[list[Sample], int]:
    """The unlabelled target images used (``folder/train/**`` or every image under ``folder``, at most
    ``limit`` evenly spaced) and how many the folder holds."""
    samples = unlabeled_samples(folder)
    found = len(samples)
    if limit is not None and found > limit:
        samples = samples[:: found // limit][:limit]
    return samples, found


def decode(samples: Sequence[Sample], spec: PreprocessSpec, desc: str) -> torch.Tensor:
    """(N, 3, H, W) float32: the images through the model's own preprocessing, decoded once."""
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(spec)), batch_size=256)
    return torch.cat([x for x, _ in tqdm(loader, desc=desc, leave=False, disable=None)])


def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """(N, C) logits of ``model`` (eval mode) on preprocessed (N, 3, H, W) ``images``."""
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.int64))
    logits, _ = predict_logits(model, torch.utils.data.DataLoader(dataset, batch_size=batch_size), device,
                               amp=None, desc="predict")
    return logits


# ----------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class AdaptResult:
    """What one adaptation did: the new artifact (None when not written) and its lineage record."""

    out: Path | None
    lineage: dict[str, Any]
    before: TargetStats
    after: TargetStats
    test_acc_before: float | None
    test_acc_after: float | None
    collapse: str | None


def default_out(model_dir: Path, method: str, target: Path) -> Path:
    """``<models>/<source-run>-adapted-<method>-<target-folder>``, next to the source artifact."""
    source = model_dir.resolve() if model_dir.name in ("", ".", "..") else model_dir
    target_name = (target.resolve() if target.name in ("", ".", "..") else target).name
    return source.parent / f"{source.name}-adapted-{method}-{target_name}"


def check_out(out: Path, model_dir: Path, target: Path, force: bool) -> None:
    """Before any work: never the source artifact, never an existing folder without ``--force``."""
    # first the rule every verb follows (never an input, never a folder tl_deploy did not write) ...
    check_output_folder(out, "model artifact", inputs={"source model artifact": model_dir, "target images": target})
    # ... then: an earlier artifact is replaced only when asked
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} holds an earlier model artifact: pass --force to replace it, or choose "
                         "another --out.")
    check_output_writable(out)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def lineage_record(artifact: Artifact, cfg: AdaptConfig, target: Path, used: int, found: int, seconds: float,
                   before: TargetStats, after: TargetStats, test: dict[str, Any] | None,
                   collapse: str | None, forced: bool) -> dict[str, Any]:
    """The ``adaptation`` entry of the new artifact's config."""
    names = artifact.class_names
    return {
        "source": {"path": str(artifact.path), "name": artifact.name,
                   "weights_sha256": sha256_file(artifact.path / ARTIFACT_WEIGHTS),
                   "manifest_sha256": artifact.checksum,
                   "adaptation": artifact.config.get("adaptation")},  # the source's own lineage, if adapted
        "method": cfg.method,
        "settings": cfg.to_dict(),
        "target": {"folder": str(target), "images": used, "images_in_folder": found},
        "seconds": round(seconds, 2),
        "target_stats": {"before": before.to_dict(names), "after": after.to_dict(names)},
        "target_test": test,
        "collapse": collapse,
        "doubt": label_free_doubt(after, before),
        "written_despite_collapse": bool(collapse and forced),
        "labels_used": "none for adaptation; target test/ labels only for the target_test report",
    }


def adapt_artifact(model_dir: Path, target: Path, cfg: AdaptConfig, out: Path | None = None, *,
                   device: str = "cpu", force: bool = False, verify: bool = True) -> AdaptResult:
    """Adapt the artifact at ``model_dir`` to the unlabelled images of ``target`` and write a new artifact.

    Raises ``CollapseError`` (nothing written) when the adapted model's target predictions collapse,
    unless ``force``; ``force`` also replaces an existing ``out``.
    """
    if cfg.method not in METHODS:
        raise UsageError(f"Invalid --method {cfg.method!r}. Only {', '.join(METHODS)} are supported.")
    out = out if out is not None else default_out(model_dir, cfg.method, target)
    if not target.is_dir():
        raise DataError(f"--target-unlabeled {target} is not a folder. Pass a folder of target-domain images.")
    check_out(out, model_dir, target, force)
    artifact = load_artifact(model_dir, verify=verify)
    torch_device = torch.device(resolve_device(device))
    samples, found = target_images(target, cfg.limit)
    test_samples = target_test_samples(target, artifact.class_names)
    _logger.info("adapting %s with %s on %d of the %d unlabelled images of %s", model_dir, cfg.method,
                 len(samples), found, target)

    start = time.perf_counter()
    images = decode(samples, artifact.spec, "target images")
    model = artifact.model.to(torch_device)
    source_logits = predict(model, images, torch_device)
    before = target_stats(source_logits)
    print(f"before: {before.summary()}")
    source_state = {k: v.clone() for k, v in model.state_dict().items()}
    run_method(model, images, cfg, torch_device, before)
    after = target_stats(predict(model, images, torch_device), reference=source_logits)
    seconds = time.perf_counter() - start
    print(f"after:  {after.summary()}  ({seconds:.1f} s)")
    collapse = adaptation_collapse(after, before)
    doubt = label_free_doubt(after, before)
    if doubt is not None:
        _logger.warning("the label-free statistics suggest the adaptation did not help: %s", doubt)
    source_collapse = collapse_reason(before, num_classes=len(artifact.class_names))
    if source_collapse is not None:
        _logger.warning("the source model's own target predictions are degenerate: %s", source_collapse)

    test: dict[str, Any] | None = None
    acc_before = acc_after = None
    if test_samples:
        # streamed, not held in memory: a test/ split may be far larger than the --limit images
        loader = torch.utils.data.DataLoader(ImageDataset(test_samples, eval_transform(artifact.spec)),
                                             batch_size=256)
        logits, labels = predict_logits(model, loader, torch_device, amp=None, desc="target test")
        acc_after = _accuracy(logits, labels)
        adapted_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(source_state)
        logits, labels = predict_logits(model, loader, torch_device, amp=None, desc="target test, source model")
        acc_before = _accuracy(logits, labels)
        model.load_state_dict(adapted_state)
        test = {"folder": str(target / "test"), "images": len(test_samples), "acc_before": round(acc_before, 4),
                "acc_after": round(acc_after, 4)}
        print(f"target test ({len(test_samples)} labelled images, labels used for this report only): "
              f"{100 * acc_before:.2f}% -> {100 * acc_after:.2f}% ({100 * (acc_after - acc_before):+.2f} points)")

    lineage = lineage_record(artifact, cfg, target, len(samples), found, seconds, before, after, test, collapse,
                             force)
    if collapse is not None and not force:
        raise CollapseError(f"not writing {out}: {collapse}. Try --method adabn or a lower --lr; "
                            "--force writes it anyway.")
    if collapse is not None:
        _logger.warning("writing %s despite the collapse (--force): %s", out, collapse)
    metrics: dict[str, Any] = {"adaptation_seconds": round(seconds, 2),
                               "target_mean_entropy": round(after.mean_entropy, 4),
                               "target_effective_classes": round(after.effective_classes, 3),
                               "target_agreement_with_source": round(after.agreement or 0.0, 4)}
    if acc_after is not None and acc_before is not None:
        metrics.update(target_test_acc=round(acc_after, 4), target_test_acc_source=round(acc_before, 4))
    written = save_artifact(out, model.cpu(), architecture=artifact.architecture, class_names=artifact.class_names,
                            spec=artifact.spec, training=dict(artifact.config.get("training") or {}),
                            metrics=metrics, adaptation=lineage)
    return AdaptResult(written, lineage, before, after, acc_before, acc_after, collapse)


# ----------------------------------------------------------------------------- the CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = new_parser("adapt", __doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="the deployed model artifact (models/<run>); never modified")
    p.add_argument("--target-unlabeled", type=Path, required=True, metavar="DIR",
                   help="the new site's images: DIR/train/** if it exists, else every image under DIR "
                        "(labels, if any, are ignored; a labelled DIR/test/ is scored before and after)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="adabn: target BatchNorm statistics; tent: + entropy minimisation of BN affine "
                        "params; shot: SHOT-IM on the feature extractor, classifier frozen")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the new artifact (default: <source-run>-adapted-<method>-<target-folder>, next to "
                        "the source)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, and write the model even if its predictions collapsed")
    p.add_argument("--limit", type=POSITIVE_INT, default=AdaptConfig.limit, metavar="N",
                   help="adapt on at most N target images, evenly spaced")
    p.add_argument("--epochs", type=POSITIVE_INT, default=AdaptConfig.epochs, metavar="N",
                   help="passes over the target images (tent, shot)")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help=f"learning rate (default: tent {DEFAULT_LR['tent']:g}, shot {DEFAULT_LR['shot']:g})")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=AdaptConfig.batch_size, metavar="N",
                   help="target images per step (tent, shot)")
    p.add_argument("--pseudo-label-weight", type=NON_NEGATIVE, default=AdaptConfig.pseudo_label_weight,
                   metavar="W", help="shot: weight of the centroid pseudo-label loss (SHOT's beta; 0: SHOT-IM)")
    p.add_argument("--seed", type=SEED, default=AdaptConfig.seed, help="batch order and dropout (tent, shot)")
    add_device(p)
    add_threads(p, help="torch CPU intra-op threads (default: torch's choice)")
    p.add_argument("--no-verify", action="store_true", help="skip the source artifact's checksum check")
    add_verbose(p)
    return p


def config_from_args(args: argparse.Namespace) -> AdaptConfig:
    """The run's settings; options that the chosen method ignores are refused."""
    if args.method == "adabn":
        refuse_unused(args, ["epochs", "lr", "batch_size", "pseudo_label_weight", "seed"],
                      "with --method adabn (no gradient step): drop it or choose --method tent or shot")
    elif args.method == "tent":
        refuse_unused(args, ["pseudo_label_weight"], "with --method tent: drop it or choose --method shot")
    return replace(AdaptConfig(), method=args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   limit=args.limit, pseudo_label_weight=args.pseudo_label_weight, seed=args.seed)


def adapt(args: argparse.Namespace) -> int:
    """The adapt verb: adapt, print the before/after statistics, write the new artifact."""
    cfg = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = adapt_artifact(args.model_dir, args.target_unlabeled, cfg, args.out, device=args.device,
                            force=args.force, verify=not args.no_verify)
    print(f"wrote {result.out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(adapt, get_args_parser().parse_args(argv), interrupted=INTERRUPTED_NOTHING_KEPT)
