"""The fine-tuning recipe, top to bottom: setup -> linear probe -> fine-tuning -> final evaluation -> artifact.

Strategies (the transfer-learning literature's names):

- ``linear``: frozen backbone, new head, trained on cached features (the backbone runs once).
- ``finetune``: all layers; the backbone learns at a lower rate than the head.
- ``lp-ft``: linear probe first, then fine-tune from that head (the default). By default the stem and
  first blocks keep their ImageNet weights (``--unfreeze 4``); ``--unfreeze all`` trains every layer.
- ``partial --unfreeze N``: only the head and the last N backbone stages train.

When the first stages are frozen and augmentation is off, their output for each image is the same
every epoch: it is computed once, kept in memory, and the epochs run only the layers that train
(``tl_deploy.train.stage_cache``). Under ``torchrun --nproc_per_node N -m tl_deploy.finetune ...`` it
trains with DistributedDataParallel (``tl_deploy.train.distributed``); ``--batch-size`` stays the
global batch. ``--head attention-fusion`` fuses several backbone depths (``tl_deploy.heads``);
``--target-unlabeled DIR --da {dann,mmd,coral,mcc,self-train}`` adds unsupervised domain adaptation to the
fine-tuning phase (``tl_deploy.train.adaptation``); the target images' frozen-stage outputs are cached too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.artifact import save_artifact
from tl_deploy.backbones import backbone_stages, check_model_name, check_train_stages, check_weights, set_trainable
from tl_deploy.data import Sample, limit_per_class, load_splits
from tl_deploy.errors import ModelError, TlDeployError
from tl_deploy.fileio import default_cache_dir
from tl_deploy.reports import ClassificationResult, confusion_png, curves_png, format_result
from tl_deploy.train import distributed, stage_cache
from tl_deploy.train.adaptation import target_test_samples, unlabeled_samples
from tl_deploy.train.amp import AmpChoice, measure_amp, resolve_amp, time_train_step
from tl_deploy.train.checkpoint import Checkpointer, fingerprint, restore_checkpoint
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.distributed import DistContext
from tl_deploy.train.feature_cache import cached_features
from tl_deploy.train.few_shot import few_shot_probe
from tl_deploy.train.finetuning import finetune, score_cached
from tl_deploy.train.loaders import default_workers, inverse_frequency
from tl_deploy.train.loop import evaluate
from tl_deploy.train.probe import train_probe
from tl_deploy.train.run import Run
from tl_deploy.train.setup import (
    architecture,
    build_network,
    check_output,
    features_identity,
    native_size,
    resolve_data,
    resolve_device,
    run_name,
    seed_everything,
)
from tl_deploy.train.stage_cache import StageCache, cut_for_cache

_logger = logging.getLogger(__name__)


def fit(cfg: TrainConfig) -> Path:
    """Run fine-tuning end to end; returns the artifact folder. Under torchrun every process calls it
    and rank 0 alone writes the artifact."""
    cfg.validate()
    with distributed.process_group(resolve_device(cfg.device)) as dist:
        run = setup(cfg, dist)
        cfg = run.cfg  # with the schedule resolved for the data
        network = build(run)
        with prepare_stage_cache(run, network) as cache:
            if cfg.probes and not run.resumes_finetuning():
                linear_probe(run, network, cache)
            run.amp = settle_amp(run, network, cache)
            run.timings["setup_and_probe"] = time.perf_counter()
            target_unlabeled = finetune(run, network, cache) if cfg.finetunes else None
            run.timings["finetune"] = time.perf_counter()
            results = final_evaluation(run, network, cache, target_unlabeled)
            return write_artifact(run, network, cache, results)


# ----------------------------------------------------------------------------- setup

def setup(cfg: TrainConfig, dist: DistContext) -> Run:
    """Everything that can be refused is refused here, before any work; then the data is read."""
    started = time.perf_counter()
    if cfg.da is not None and dist.world_size > 1:
        raise TlDeployError("--da runs in one process only: start it without torchrun.")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    amp = resolve_amp(cfg.amp, dist.device)  # refuses --amp fp16 on a CPU before any work
    seed_everything(cfg.seed, cfg.deterministic)
    check_model_name(cfg.model)
    with distributed.local_main_first(dist):  # one process per node prepares the embedded data
        data_dir = resolve_data(cfg.data)
    out = Path(cfg.out) if cfg.out else Path("models") / run_name(cfg, data_dir)
    distributed.run_on_main(lambda: check_output(cfg, out, data_dir), dist)
    check_weights(cfg.model, cfg.weights)  # before the data is read

    splits = load_splits(data_dir, cfg.val_fraction, cfg.seed, on_bad_image=cfg.on_bad_image)
    train_samples = splits.train
    if cfg.limit_per_class is not None:
        train_samples = limit_per_class(train_samples, cfg.limit_per_class, cfg.seed)
    cfg, schedule = cfg.resolve_schedule(len(train_samples))  # auto epochs: a budget of steps for this data
    for name in ("probe_epochs", "epochs"):
        if f"{name}_reason" in schedule:
            _logger.info("%s %d: %s", name.replace("_", " "), schedule[name], schedule[f"{name}_reason"])
    workers = cfg.workers if cfg.workers is not None else default_workers(dist.device)
    ckpt = Checkpointer(out, fingerprint=fingerprint(cfg, splits), writer=dist.is_main)
    class_weights = inverse_frequency(train_samples, len(splits.class_names))
    target = unlabeled_samples(cfg.target_unlabeled) if cfg.da is not None and cfg.target_unlabeled else []
    run = Run(cfg, dist, data_dir, out, splits, train_samples, class_weights, workers, amp, ckpt,
              target_samples=target, started=started, schedule=schedule,
              native_size=native_size(train_samples, cfg.seed))
    _logger.info("preprocessing: %s", run.spec.describe())
    _logger.info("device %s, amp %s, %d workers; %d classes, %d train / %d val / %d test images", dist.device,
                 "auto (measured before fine-tuning)" if amp.to_measure else amp.name, workers, run.num_classes,
                 len(train_samples), len(splits.val), len(splits.test))
    return run


def build(run: Run) -> nn.Module:
    """The network with its starting weights, or the checkpoint's with ``--resume``."""
    cfg = run.cfg
    network = build_network(cfg, run.num_classes, run.spec.input_size)
    if cfg.strategy != "linear":
        check_train_stages(network, cfg.stages_to_train())  # before any work, not after the linear probe
    network = network.to(run.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.resume:
        run.resumed = distributed.run_on_main(run.ckpt.load, run.dist)
        if run.resumed is None:
            _logger.info("no checkpoint for %s yet: starting from the beginning", run.out)
        else:
            run.state = restore_checkpoint(network, run.resumed, run.ckpt.dir)
            _logger.info("resumed %s: phase %s, %d epochs done", run.out, run.state.phase, run.state.epoch)
    return network


def prepare_stage_cache(run: Run, network: nn.Module) -> StageCache:
    """The run's frozen-stage cache, filled with the frozen stages' outputs when fine-tuning can use them:
    the source train and val images and, with ``--da``, the unlabelled target images."""
    cfg, num_images = run.cfg, len(run.train_samples) + len(run.splits.val)
    train_stages = cfg.stages_to_train()
    target = run.target_samples
    # Augmentation changes each epoch's input; fusion reads several depths: neither can run on cached
    # prefix outputs.
    cacheable = cfg.finetunes and not cfg.augment and train_stages is not None and cfg.head == "linear"
    cut = (cut_for_cache(network, train_stages, run.spec.input_size, run.device, num_images)
           if cacheable and train_stages is not None else None)
    if cut is not None and target:
        target = target_that_fits(target, cut[0], run, num_images)
        if not target:
            cut = None
    cache = StageCache(cut, cfg.cache_runtime, run.device, num_images + len(target))
    if cut is not None:
        _logger.info("the first %d backbone stages stay frozen: their outputs are computed once for every epoch "
                     "(%s)", len(backbone_stages(network)) - (train_stages or 0), cache.runtime)
        splits: dict[str, Sequence[Sample]] = {"train": run.train_samples, "val": run.splits.val}
        if target:
            splits["target"] = target
        cache.fill(splits, run.spec, batch_size=run.eval_batch, workers=run.workers)
    return cache


def target_that_fits(target: list[Sample], prefix: nn.Module, run: Run, num_source: int) -> list[Sample]:
    """The unlabelled target images whose frozen-stage outputs fit in memory beside the source's: all of
    them, a seeded random subset, or none (then every layer runs each epoch, on source and target)."""
    per_image = stage_cache.activation_bytes(prefix, run.spec.input_size, run.device)
    room = max(0, stage_cache.ACTIVATION_CACHE_MAX_BYTES // per_image - num_source)
    if room >= len(target):
        return target
    if room < 2 * run.cfg.da_batch_size:
        _logger.info("the target images' frozen-stage outputs do not fit in memory beside the source's: running "
                     "every layer each epoch")
        return []
    keep = torch.randperm(len(target), generator=torch.Generator().manual_seed(run.cfg.seed))[:room]
    _logger.info("the frozen-stage outputs of %d of the %d target images fit in memory: adapting to that random "
                 "subset", room, len(target))
    return [target[i] for i in sorted(keep.tolist())]


# ----------------------------------------------------------------------------- linear probe

def linear_probe(run: Run, network: nn.Module, cache: StageCache) -> None:
    """Train the head alone on the frozen backbone's features (cached on disk), then checkpoint."""
    cfg = run.cfg
    cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    few_shot = cfg.few_shot_choice()
    if few_shot.active or cfg.limit_per_class is not None:
        _logger.info("few-shot recipe %s: %s", "on" if few_shot.active else "off", few_shot.reason)
    if few_shot.active:  # multi-level features of augmented views (tl_deploy.train.few_shot)
        run.state.history.append(few_shot_probe(run, network, cache_dir))  # type: ignore[arg-type]
        run.state.phase, run.state.epoch = "finetune", 0
        run.ckpt.save(network, None, None, run.state)
        return
    # onnxruntime's features differ from PyTorch's in the last float bits: cached apart.
    model_id = features_identity(cfg) + ("" if cache.runtime == "torch" else f"|{cache.runtime}")
    splits = {"train": run.train_samples, "val": run.splits.val}
    feats = {}
    for name, samples in splits.items():
        def compute(name: str = name, samples: list[Sample] = samples) -> torch.Tensor:
            return cache.features(network, name, samples, run.spec, batch_size=run.eval_batch,
                                  workers=run.workers, dist=run.dist)

        feats[name] = cached_features(network, model_id, samples, run.spec, device=run.device, cache_dir=cache_dir,
                                      batch_size=run.eval_batch, workers=run.workers, desc=f"{name} features",
                                      compute=compute, dist=run.dist)
    labels = {name: torch.tensor([lbl for _, lbl in s]) for name, s in splits.items()}
    head = network.get_classifier()  # type: ignore[operator]
    if not isinstance(head, nn.Linear) and cfg.head == "linear":
        raise ModelError(f"{cfg.model}'s classifier is {type(head).__name__}, not Linear: use --strategy finetune.")
    head.float().cpu()
    run.state.history += train_probe(
        head, feats["train"], labels["train"], feats["val"], labels["val"], epochs=cfg.resolved("probe_epochs"),
        batch_size=cfg.batch_size, lr=cfg.probe_lr, weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing, optimizer=cfg.optimizer, seed=cfg.seed,
        loss_weights=run.loss_weights(), sample_weights=run.sample_weights())
    distributed.broadcast_module(head, run.dist)  # every rank trained the same head; rank 0's is kept
    head.to(run.device)
    run.state.phase, run.state.epoch = "finetune", 0
    run.ckpt.save(network, None, None, run.state)


# ----------------------------------------------------------------------------- precision

def settle_amp(run: Run, network: nn.Module, cache: StageCache) -> AmpChoice:
    """``--amp auto`` on a CPU with native bf16: time a training step of the layers that will train."""
    cfg, amp = run.cfg, run.amp
    if not amp.to_measure:
        return amp
    if not cfg.finetunes:
        return AmpChoice(None, "auto: fp32, no fine-tuning phase to measure (the probe trains in fp32)")
    set_trainable(network, cfg.stages_to_train())
    trained = cache.suffix or network  # the layers each epoch runs
    batch = distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum_steps, len(run.train_samples), run.dist)
    x = cache.activations["train"][:batch] if cache.suffix is not None else \
        torch.randn(batch, 3, run.spec.input_size, run.spec.input_size).contiguous(memory_format=torch.channels_last)
    y = torch.arange(len(x)) % run.num_classes  # (B,)

    def time_step(dtype: torch.dtype | None) -> float:
        return time_train_step(trained, x.to(run.device), y.to(run.device), run.device, dtype, cfg.bn == "eval")

    chosen = distributed.run_on_main(lambda: measure_amp(amp, time_step), run.dist)  # rank 0's choice for all
    _logger.info("amp %s: %s", chosen.name, chosen.reason)
    return chosen


# ----------------------------------------------------------------------------- final evaluation

@dataclass(frozen=True)
class Results:
    """The final evaluation: the report split (test, else val), val, the target domain's test split, and
    (with --da) the label-free statistics of the selected model's predictions on unlabelled target images."""

    split: str
    result: ClassificationResult
    val: ClassificationResult
    target: ClassificationResult | None
    target_unlabeled: dict[str, Any] | None = None


def final_evaluation(run: Run, network: nn.Module, cache: StageCache,
                     target_unlabeled: dict[str, Any] | None = None) -> Results:
    """Score the selected weights in fp32 on test (else val), on val, and on the target's test/ if any."""
    val_acts = cache.activations.pop("val", None)
    cache.activations.clear()
    network.eval()

    def score(samples: list[Sample], desc: str, dist: DistContext = run.dist) -> ClassificationResult:
        return evaluate(network, samples, run.spec, batch_size=run.cfg.batch_size, device=run.device, amp=None,
                        workers=run.workers, num_classes=run.num_classes, desc=desc, dist=dist)

    split = "test" if run.splits.test else "val"
    samples = run.splits.get(split)
    if cache.suffix is not None and val_acts is not None and run.dist.world_size == 1:
        # The frozen stages give the test images the same pass as the train and val images (onnxruntime on a
        # CPU: several times faster than eager PyTorch, to float rounding the same outputs); the trained
        # layers run in PyTorch. Test images are read only now, after training and model selection.
        val = score_cached(run, cache.suffix, run.splits.val, val_acts, None, "val eval")
        del val_acts
        result = val if split == "val" else score_cached(
            run, cache.suffix, samples, cache.outputs(samples, run.spec, batch_size=run.eval_batch,
                                                      workers=run.workers, desc=f"{split} activations"),
            None, f"{split} eval")
        run.eval_path = f"frozen stages on {cache.prefix_runtime}, trained layers in PyTorch"
    else:
        del val_acts
        result = score(samples, f"{split} eval")
        val = result if split == "val" else score(run.splits.val, "val eval")
        run.eval_path = "PyTorch"
    target = None
    target_test = (target_test_samples(run.cfg.target_unlabeled, run.splits.class_names)
                   if run.cfg.target_unlabeled else None)
    if target_test:
        # Target labels are read here only, after training and model selection, to report the result.
        target = score(target_test, "target test eval", dist=distributed.SINGLE)
    return Results(split, result, val, target, target_unlabeled)


# ----------------------------------------------------------------------------- artifact

def metrics_of(run: Run, results: Results, elapsed: float) -> dict[str, Any]:
    """metrics.json: the final scores, the last training epoch, the time of each step and the history."""
    split, result, val, target = results.split, results.result, results.val, results.target
    last_train: dict[str, Any] = run.state.history[-1] if run.state.history else {}
    probe_end, finetune_end = run.timings["setup_and_probe"], run.timings["finetune"]
    names = run.splits.class_names
    metrics: dict[str, Any] = {
        "eval_split": split, f"{split}_acc": result.accuracy, f"{split}_loss": result.loss,
        "val_acc": val.accuracy, "val_loss": val.loss,
        "train_acc": last_train.get("train_acc", float("nan")),
        "train_loss": last_train.get("train_loss", float("nan")),
        "train_seconds": round(elapsed, 1),
        # data checks, frozen-stage outputs, probe | fine-tuning epochs | final val/test evaluation
        "phase_seconds": {"setup_and_probe": round(probe_end - run.started, 1),
                          "finetune": round(finetune_end - probe_end, 1),
                          "evaluation": round(run.started + elapsed - finetune_end, 1)},
        "eval_path": run.eval_path,
        "splits": {split: result.to_dict(names), "val": val.to_dict(names)},
        "history": run.state.history,
    }
    if run.cfg.da is not None or target is not None:
        metrics["model_selection"] = "held-out source val; no target labels used in training or selection"
    if results.target_unlabeled is not None:
        metrics["target_unlabeled_stats"] = results.target_unlabeled
    if target is not None:
        metrics["target_test_acc"] = target.accuracy
        metrics["target_test_loss"] = target.loss
        metrics["splits"]["target_test"] = target.to_dict(names)
    return metrics


def training_record(run: Run, cache: StageCache) -> dict[str, Any]:
    """config.json's ``training``: every option, plus what the run really used."""
    cfg, trained = run.cfg, run.cfg.stages_to_train()
    return {**asdict(cfg), "data": str(run.data_dir),
            "device_used": str(run.device), "amp_used": run.amp.name,
            "amp_reason": run.amp.reason, "amp_step_ms": run.amp.step_ms,
            "workers_used": run.workers, "world_size": run.dist.world_size,
            "stages_trained": "all" if trained is None else trained, "schedule": run.schedule,
            "frozen_stage_cache": cache.cut is not None, "cache_runtime_used": cache.runtime_used(),
            "few_shot_used": cfg.few_shot_active, "few_shot_reason": cfg.few_shot_choice().reason,
            "native_size": run.native_size, "train_images": len(run.train_samples),
            "val_images": len(run.splits.val), "test_images": len(run.splits.test),
            "skipped_images": [str(b) for b in run.splits.skipped]}


def write_artifact(run: Run, network: nn.Module, cache: StageCache, results: Results) -> Path:
    """Rank 0 writes the artifact (weights, config, metrics, plots) and removes the checkpoint."""
    elapsed = time.perf_counter() - run.started
    metrics, training = metrics_of(run, results, elapsed), training_record(run, cache)
    if not run.dist.is_main:
        distributed.barrier(run.dist)  # returns once rank 0 has written the artifact
        return run.out
    names, split = run.splits.class_names, results.split
    extra = {"curves.png": curves_png(run.state.history),
             "confusion.png": confusion_png(results.result.confusion, names, f"{split} confusion")}
    network.cpu().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    path = save_artifact(run.out, network, architecture=architecture(run.cfg, run.num_classes, run.spec.input_size),
                         class_names=names,
                         spec=run.spec, training=training, metrics=metrics, extra_files=extra)
    run.ckpt.clear()
    distributed.barrier(run.dist)
    print(format_result(results.result, names, split))
    target = results.target
    target_text = f" | target test {target.accuracy * 100:.2f}%" if target is not None else ""
    print(f"{split} accuracy {results.result.accuracy * 100:.2f}% | val {results.val.accuracy * 100:.2f}%"
          f"{target_text} | {elapsed:.0f}s | artifact {path}")
    return path
