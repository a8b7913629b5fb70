"""``TrainConfig``: every choice of a fine-tuning run, saved in the artifact's config.json.

Each field carries its command-line facts (help, group, flags, choices, allowed range) as metadata:
``tl_deploy.train.cli`` generates the parser from them, so no default or help text is written twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tl_deploy.backbones import DEFAULT_MODEL, model_data_config
from tl_deploy.cli import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Range
from tl_deploy.data import ON_BAD_IMAGE
from tl_deploy.errors import TlDeployError
from tl_deploy.heads import DEFAULT_FUSION_DIM, DEFAULT_FUSION_LEVELS, HEADS
from tl_deploy.preprocess import INTERPOLATIONS, PreprocessSpec
from tl_deploy.train.adaptation import DA_METHODS
from tl_deploy.train.stage_cache import CACHE_RUNTIMES

STRATEGIES = ("linear", "finetune", "lp-ft", "partial")
FINETUNING_STRATEGIES = ("finetune", "lp-ft", "partial")  # strategies with a fine-tuning phase
PROBING_STRATEGIES = ("linear", "lp-ft")  # strategies with a linear probe on cached features
OPTIMIZERS = ("adamw", "sgd")
BALANCE = ("none", "weights", "sampler")
BN_MODES = ("eval", "train")
AMP_MODES = ("auto", "off", "bf16", "fp16")
FEW_SHOT_MODES = ("auto", "on", "off")
# The few-shot rule: --strategy linear with --limit-per-class at most this many images per class uses the few-shot
# recipe (tl_deploy.train.few_shot). Its cost grows with images x views; the transfer curve measures it up to here.
FEW_SHOT_MAX_PER_CLASS = 20
# Backbone stages trained when --unfreeze is "auto" (None: all). lp-ft keeps efficientnet_lite0's stem and
# first three blocks frozen: on Animal-Shape this beat training every layer in the same time (README).
DEFAULT_UNFREEZE: dict[str, int | None] = {"finetune": None, "lp-ft": 4, "partial": 2}

# The data-scaled schedule (--epochs / --probe-epochs auto): a budget of optimizer steps, turned into whole
# epochs of the training images and clamped. The default data (7,000 images, batch 32: 218 steps an epoch)
# gets 2 fine-tuning and 20 probe epochs; 100 images (3 steps an epoch) get the fine-tuning epoch cap and
# the probe's; 100,000 images get 1 epoch of 3,125 steps (docs/training.md measures the rule).
# 440 steps: 2 epochs of Animal-Shape. 3 epochs (650 steps) scored higher on val (99.00% against 98.83%, 3 seeds)
# but took 103 s, over the default job's 90 s; 2 epochs at --lr 2e-3 was the best on val within it (docs/training.md).
FINETUNE_TARGET_STEPS = 440
FINETUNE_EPOCHS = (1, 30)  # (fewest, most) automatic fine-tuning epochs
PROBE_TARGET_STEPS = 4400
PROBE_EPOCHS = (20, 1000)  # a probe epoch on cached features is ~0.1 ms an image
IMG_SIZES = Range(int, 8, 4096)
# --img-size auto: the network sees the data at most this many times its native side. On Animal-Shape (28 px, val):
# 3x (96 px) lost a point, 5x (144 px) gained 0.1 point for 30% more time; 4x (112 px) it is (docs/training.md).
AUTO_UPSCALE = 4
AUTO_SIZE_STEP = 16  # automatic sizes are multiples of this (every stride-32-or-less CNN and patch-16 ViT fits)
AUTO_MIN_SIZE = 32  # below one 32-pixel cell a CNN's last stage sees a single pixel

# Argument groups of the generated parser, in --help order.
GROUPS = {
    "data": "data",
    "model": "model",
    "da": "unsupervised domain adaptation",
    "schedule": "strategy and schedule",
    "run": "run",
    "distributed": "distributed (torchrun --nproc_per_node N -m tl_deploy.finetune ...)",
}


def option(default: Any, help: str, group: str, *, flags: tuple[str, ...] = (), old: tuple[str, ...] = (),
           choices: tuple[str, ...] | None = None, allowed: Range | None = None, metavar: str | None = None,
           switch: str | None = None, nargs: int | None = None) -> Any:
    """A config field with its command-line facts.

    Args:
        default: the field's default (stated once, in ``--help`` too).
        help: the option's help text.
        group: a key of ``GROUPS``.
        flags: option strings; default ``--field-name``.
        old: earlier option strings, still accepted and hidden from ``--help``.
        choices: the allowed values of a text option.
        allowed: the allowed range of a numeric option (the parser's type and ``validate`` both use it).
        metavar: the value's name in ``--help``.
        switch: for a bool: ``"on"`` (``--flag`` sets True), ``"off"`` (``--flag`` sets False) or
            ``"both"`` (``--flag/--no-flag``).
        nargs: the option takes this many values (a tuple field; ``allowed`` checks each).
    """
    meta = {"help": help, "group": group, "flags": flags, "old": old, "choices": choices, "allowed": allowed,
            "metavar": metavar, "switch": switch, "nargs": nargs}
    return dataclasses.field(default=default, metadata=meta)


def img_size_arg(text: str) -> int | str:
    """``--img-size``: ``auto`` or a side in pixels."""
    return "auto" if text == "auto" else int(IMG_SIZES(text))


def auto_img_size(pretrained: int, native: int | None) -> tuple[int, str]:
    """``--img-size auto``: the model's pretrained side, lowered for data far smaller than it; and why.

    Upsampling a small image adds no detail, only compute: the side is capped at ``AUTO_UPSCALE`` times the
    data's native side (rounded up to ``AUTO_SIZE_STEP``, at least ``AUTO_MIN_SIZE``).
    """
    if native is None:
        return pretrained, f"auto:model's {pretrained} px (data resolution not measured)"
    cap = max(AUTO_MIN_SIZE, math.ceil(native * AUTO_UPSCALE / AUTO_SIZE_STEP) * AUTO_SIZE_STEP)
    if cap >= pretrained:
        return pretrained, f"auto:model's {pretrained} px (data native {native} px)"
    return cap, (f"auto:data native {native} px, {AUTO_UPSCALE}x upsampled and rounded to {AUTO_SIZE_STEP} "
                 f"(below the model's {pretrained} px)")


@dataclass(frozen=True)
class FewShotChoice:
    """The few-shot rule's verdict for one run: on or off, and the reason (logged, saved in config.json)."""

    active: bool
    reason: str


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a fine-tuning run; saved in the artifact's config.json."""

    # data
    data: str | None = option(None, "ImageFolder root with train/ and val/ (optional test/), or one class-folder "
                                    "tree with --val-fraction (default: embedded Animal-Shape)", "data")
    val_fraction: float | None = option(None, "fraction of train/ held out for validation when there is no val/ "
                                        "(default: none, the data's val/)",
                                        "data", old=("--val-split",), allowed=FRACTION)
    limit_per_class: int | None = option(None, "few-shot: at most K training images per class (default: all)",
                                         "data", metavar="K", allowed=POSITIVE_INT)
    balance: str = option("none", "class-imbalance handling: loss weights or a balanced sampler", "data",
                          choices=BALANCE)
    # Off by default: it cost accuracy in the default 2-epoch schedule (README).
    augment: bool = option(False, "training augmentation (flip + small affine); off keeps the frozen-stage "
                                  "cache usable (default: off)", "data", switch="both")
    on_bad_image: str = option("fail", "fail: stop at once listing corrupt/non-image files; skip: train without "
                                       "them and list them", "data", choices=ON_BAD_IMAGE)
    workers: int | None = option(None, "DataLoader workers (default: 0 on small CPUs, else min(8, cores))",
                                 "data", allowed=COUNT)
    # model
    model: str = option(DEFAULT_MODEL, "timm architecture name", "model")
    weights: str = option("embedded", "starting weights: embedded (shipped ImageNet weights, efficientnet_lite0 "
                                      "only), hub (download), none, or a file path", "model")
    img_size: int | str = option("auto", "network input side in pixels; auto: the model's pretrained size, "
                                         f"capped at {AUTO_UPSCALE}x the data's native size", "model",
                                 metavar="N|auto")
    crop_pct: float | None = option(None, "center-crop fraction: resize the shorter side to img-size / crop-pct, "
                                          "then crop (default: 1.0 for data upsampled to img-size, else the "
                                          "model's)", "model", allowed=Range(float, 0.0, 1.0, low_open=True))
    interpolation: str | None = option(None, "resize filter (default: bilinear for data upsampled to img-size, "
                                             "else the model's)", "model", choices=INTERPOLATIONS)
    mean: tuple[float, float, float] | None = option(None, "per-channel input mean, R G B on a 0-1 scale "
                                                           "(default: the model's)", "model", nargs=3,
                                                     metavar="V", allowed=Range(float))
    std: tuple[float, float, float] | None = option(None, "per-channel input std, R G B on a 0-1 scale "
                                                          "(default: the model's)", "model", nargs=3,
                                                    metavar="V", allowed=Range(float, 0.0, low_open=True))
    drop_rate: float = option(0.2, "dropout before the classifier", "model",
                              allowed=Range(float, 0.0, 1.0, high_open=True))
    bn: str = option("eval", "BatchNorm while fine-tuning: eval keeps the ImageNet statistics (affine still "
                             "trains), train uses batch statistics", "model", choices=BN_MODES)
    head: str = option("linear", "classifier head: linear on the final features, or attention fusion over "
                                 "several depths", "model", choices=HEADS)
    fusion_levels: int = option(DEFAULT_FUSION_LEVELS, "attention-fusion: levels fused (final features + the "
                                                       "last N-1 stages)", "model", allowed=POSITIVE_INT)
    fusion_dim: int = option(DEFAULT_FUSION_DIM, "attention-fusion: projection width", "model",
                             allowed=POSITIVE_INT)
    channel_attention: bool = option(True, "attention-fusion: no channel attention on the fused vector", "model",
                                     flags=("--no-channel-attention",), switch="off")
    # unsupervised domain adaptation
    target_unlabeled: str | None = option(
        None, "target-domain images without labels (DIR/train/** if present, else DIR/**); a labelled DIR/test/ "
              "is scored after training, also without --da (the source-only baseline)", "da", metavar="DIR")
    da: str | None = option(None, "adaptation loss on the target batch: dann, mmd, coral, mcc (minimum class "
                                  "confusion) or self-train (confident pseudo-labels) (default: none)", "da",
                            choices=DA_METHODS)
    da_weight: float = option(1.0, "weight of the adaptation loss against the source classification loss", "da",
                              allowed=NON_NEGATIVE)
    # Half the default source batch: the target half of each step costs ~0.4x a source-only step, not 1x.
    da_batch_size: int = option(16, "unlabelled target images drawn with every source batch", "da",
                                allowed=POSITIVE_INT)
    da_threshold: float = option(0.8, "self-train: the softmax probability from which a target image's top-1 "
                                      "class is its pseudo-label", "da", allowed=Range(float, 0.0, 1.0))
    # strategy and schedule
    strategy: str = option("lp-ft", "transfer strategy", "schedule", choices=STRATEGIES)
    unfreeze: int | str = option("auto", "backbone stages that train, counted from the output (auto: lp-ft 4, "
                                         "partial 2, finetune all)", "schedule", metavar="N|all|auto")
    # None: scaled with the data (``resolve_schedule``); a given number always wins.
    epochs: int | None = option(None, "fine-tuning epochs (finetune, lp-ft, partial) (default: auto, the whole "
                                      f"epochs nearest {FINETUNE_TARGET_STEPS} optimizer steps, "
                                      f"{FINETUNE_EPOCHS[0]} to {FINETUNE_EPOCHS[1]})", "schedule",
                                metavar="N", allowed=COUNT)
    probe_epochs: int | None = option(None, "linear-probe epochs on cached features (linear, lp-ft); nearly free "
                                            f"(default: auto, the whole epochs nearest {PROBE_TARGET_STEPS} steps, "
                                            f"{PROBE_EPOCHS[0]} to {PROBE_EPOCHS[1]})", "schedule",
                                      metavar="N", allowed=COUNT)
    batch_size: int = option(32, "global batch: images per optimizer step over all processes and accumulation "
                                 "steps", "schedule", flags=("--batch-size", "-b"), allowed=POSITIVE_INT)
    optimizer: str = option("adamw", "optimizer", "schedule", flags=("--opt",), choices=OPTIMIZERS)
    lr: float = option(2e-3, "head learning rate when fine-tuning; the backbone's is lr * backbone-lr-mult",
                       "schedule", allowed=POSITIVE)
    probe_lr: float = option(1e-3, "learning rate of the linear probe", "schedule", allowed=POSITIVE)
    # 0.3x the head LR: best of 0.1, 0.3, 1.0 on Animal-Shape.
    backbone_lr_mult: float = option(0.3, "backbone LR = lr * this", "schedule", allowed=NON_NEGATIVE)
    layer_decay: float | None = option(None, "layer-wise LR decay (replaces --backbone-lr-mult; default: off)",
                                       "schedule", allowed=Range(float, 0.0, 1.0, low_open=True))
    warmup_epochs: float = option(0.1, "epochs of linear LR warm-up before the cosine decay", "schedule",
                                  allowed=NON_NEGATIVE)
    weight_decay: float = option(0.01, "AdamW/SGD weight decay (none on biases and norm parameters)", "schedule",
                                 flags=("--weight-decay", "--wd"), allowed=NON_NEGATIVE)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss", "schedule",
                                    allowed=Range(float, 0.0, 1.0, high_open=True))
    few_shot: str = option("auto", "few-shot recipe for a linear probe on few labels (multi-level features of "
                                   f"augmented views, flip TTA in the network): auto is on with --strategy linear "
                                   f"and --limit-per-class <= {FEW_SHOT_MAX_PER_CLASS}", "schedule",
                           choices=FEW_SHOT_MODES)
    # 10 labels per class, flip TTA, 3 seeds, val: 16 views 87.5%, 34 87.5%, 66 87.4% (flat; test 87.9 / 88.3 / 88.5).
    few_shot_views: int = option(64, "few-shot: views of each training image in the feature cache (the image, its "
                                     "mirror image, and random flips + affine transforms)", "schedule",
                                 allowed=Range(int, 2, 1024))
    # 10 labels per class, 66 views, val: 500 steps 87.1%, 1000 87.4%, 2000 87.7% (test 87.8 / 88.5 / 88.5).
    few_shot_steps: int = option(2000, "few-shot: optimisation steps of the head (full batches up to 256 cached "
                                       "views), a count of steps, not epochs, for tiny data", "schedule",
                                 allowed=POSITIVE_INT)
    patience: int | None = option(None, "early stopping: epochs without val improvement (default: off)",
                                  "schedule", allowed=POSITIVE_INT)
    # run
    amp: str = option("auto", "mixed precision: auto is bf16/fp16 on CUDA; on a CPU fp32 unless bf16 measures "
                              "faster there", "run", choices=AMP_MODES)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N", "run")
    threads: int | None = option(None, "CPU intra-op threads of torch and of the cache runtime (default: their "
                                       "own choice)", "run", metavar="N", allowed=POSITIVE_INT)
    seed: int = option(0, "seed of the shuffling, the augmentation and the head's initialisation (default: 0)", "run",
                       allowed=SEED)
    deterministic: bool = option(False, "deterministic algorithms (slower)", "run", switch="on")
    cache_dir: str | None = option(None, "feature cache folder (default: $TL_DEPLOY_CACHE or ~/.cache/tl_deploy)",
                                   "run")
    no_cache: bool = option(False, "do not read or write the feature cache", "run", switch="on")
    cache_runtime: str = option("auto", "runs the one-off inference passes over frozen layers that fill the "
                                        "caches: auto (onnxruntime on CPU, several times faster there), torch or "
                                        "onnxruntime", "run", old=("--frozen-runtime",), choices=CACHE_RUNTIMES)
    out: str | None = option(None, "artifact folder (default: models/<run-name>)", "run")
    name: str | None = option(None, "run name (default: <data>-<model>-<strategy>)", "run")
    resume: bool = option(False, "continue from the last complete checkpoint", "run", switch="on")
    # distributed
    grad_accum_steps: int = option(1, "micro-batches per optimizer step on each process; --batch-size stays the "
                                      "global batch", "distributed", metavar="K", allowed=POSITIVE_INT)
    sync_bn: bool = option(False, "with --bn train: BatchNorm statistics over all processes (SyncBatchNorm, "
                                  "CUDA only)", "distributed", switch="on")

    def __post_init__(self) -> None:
        if isinstance(self.unfreeze, str) and self.unfreeze.isdigit():  # "4" from the CLI is the same run as 4
            object.__setattr__(self, "unfreeze", int(self.unfreeze))
        if self.bn == "frozen":  # the earlier name of --bn eval
            object.__setattr__(self, "bn", "eval")
        if isinstance(self.img_size, str) and self.img_size.isdigit():  # "224" from a saved config is 224
            object.__setattr__(self, "img_size", int(self.img_size))
        for name in ("mean", "std"):  # argparse and JSON give lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Raise a ``TlDeployError`` naming the first option that is out of range or contradicts another."""
        self._validate_ranges()
        self._validate_choices()
        self.validate_transfer()
        self.validate_few_shot()
        if self.strategy in PROBING_STRATEGIES and self.probe_epochs == 0:
            raise TlDeployError(f"--strategy {self.strategy} needs --probe-epochs >= 1.")
        if self.strategy in FINETUNING_STRATEGIES and self.epochs == 0:
            raise TlDeployError(f"--strategy {self.strategy} needs --epochs >= 1.")
        if self.sync_bn and self.bn == "eval":
            raise TlDeployError("--sync-bn synchronises batch statistics but --bn eval uses none: "
                                "add --bn train or drop --sync-bn.")
        if not (self.unfreeze in ("auto", "all") or str(self.unfreeze).isdigit()):
            raise TlDeployError(f"Invalid --unfreeze {self.unfreeze!r}: give a number of stages, all, or auto.")

    def _validate_ranges(self) -> None:
        for f in dataclasses.fields(self):
            allowed, value = f.metadata.get("allowed"), getattr(self, f.name)
            flag = f"--{f.name.replace('_', '-')}"
            if f.metadata.get("nargs") and allowed is not None and value is not None:
                if not isinstance(value, tuple) or len(value) != f.metadata["nargs"]:
                    raise TlDeployError(f"Invalid {flag} {value!r}: give {f.metadata['nargs']} numbers.")
                for item in value:
                    allowed.check(flag, item)
            elif allowed is not None and (value is not None or f.default is not None):
                allowed.check(flag, value)
        if self.img_size != "auto" and IMG_SIZES.problem(self.img_size):
            raise TlDeployError(f"Invalid --img-size {self.img_size!r}: choose auto or {IMG_SIZES.describe()}.")

    def _validate_choices(self) -> None:
        if self.strategy not in STRATEGIES:
            raise TlDeployError(f"Invalid strategy {self.strategy!r}. Only {', '.join(STRATEGIES)} are supported.")
        if self.optimizer not in OPTIMIZERS:
            raise TlDeployError(f"Invalid optimizer {self.optimizer!r}. Only SGD and AdamW are supported.")
        for name in ("balance", "bn", "on_bad_image", "cache_runtime", "amp", "few_shot", "interpolation"):
            declared = TrainConfig.__dataclass_fields__[name]
            allowed, value = declared.metadata["choices"], getattr(self, name)
            if value not in allowed and not (value is None and declared.default is None):  # None: "from the model"
                raise TlDeployError(f"Invalid --{name.replace('_', '-')} {getattr(self, name)!r}. "
                                    f"Only {', '.join(allowed)} are supported.")

    def validate_transfer(self) -> None:
        """Head and domain-adaptation options."""
        if self.head not in HEADS:
            raise TlDeployError(f"Invalid --head {self.head!r}. Only {', '.join(HEADS)} are supported.")
        if self.da is not None and self.da not in DA_METHODS:
            raise TlDeployError(f"Invalid --da {self.da!r}. Only {', '.join(DA_METHODS)} are supported.")
        if self.da is not None and self.target_unlabeled is None:
            raise TlDeployError(f"--da {self.da} needs --target-unlabeled DIR (target-domain images).")
        if self.da is not None and self.strategy == "linear":
            raise TlDeployError("--da adapts the backbone, which --strategy linear keeps frozen: use --strategy "
                                "finetune, lp-ft or partial.")
        if self.da is not None and self.resume:
            raise TlDeployError("--resume is not supported with --da yet (the discriminator is not checkpointed): "
                                "drop --resume.")

    def few_shot_choice(self) -> FewShotChoice:
        """Whether the run uses the few-shot recipe, and why (the few-shot rule; logged and recorded)."""
        if self.few_shot != "auto":
            return FewShotChoice(self.few_shot == "on", f"--few-shot {self.few_shot}")
        if self.strategy != "linear":
            return FewShotChoice(False, f"--strategy {self.strategy} trains the backbone; the recipe is a linear probe")
        if self.head != "linear":
            return FewShotChoice(False, f"--head {self.head} has its own multi-level head")
        if self.limit_per_class is None or self.limit_per_class > FEW_SHOT_MAX_PER_CLASS:
            given = "all images" if self.limit_per_class is None else f"--limit-per-class {self.limit_per_class}"
            return FewShotChoice(False, f"{given}: more than {FEW_SHOT_MAX_PER_CLASS} labelled images per class")
        return FewShotChoice(True, f"--strategy linear with --limit-per-class {self.limit_per_class} <= "
                                   f"{FEW_SHOT_MAX_PER_CLASS} labelled images per class")

    @property
    def few_shot_active(self) -> bool:
        """True when the few-shot recipe trains the head (see ``few_shot_choice``)."""
        return self.few_shot_choice().active

    def validate_few_shot(self) -> None:
        """The few-shot recipe's options: only with the recipe, and only what it can do."""
        if self.few_shot == "on" and (self.strategy != "linear" or self.head != "linear"):
            raise TlDeployError("--few-shot on is a linear probe of its own multi-level head: use it with --strategy "
                                "linear and --head linear, or drop it.")
        if not self.few_shot_active:
            changed = [f"--{name.replace('_', '-')}" for name in ("few_shot_views", "few_shot_steps")
                       if getattr(self, name) != TrainConfig.__dataclass_fields__[name].default]
            if changed:
                raise TlDeployError(f"{', '.join(changed)} does nothing without the few-shot recipe "
                                    f"({self.few_shot_choice().reason}): drop it or pass --few-shot on.")
            return
        if self.probe_epochs != TrainConfig.__dataclass_fields__["probe_epochs"].default:
            raise TlDeployError("--probe-epochs does nothing with the few-shot recipe (it trains --few-shot-steps "
                                "steps): drop it, or pass --few-shot off.")
        if self.balance == "sampler":
            raise TlDeployError("--balance sampler does nothing with the few-shot recipe (it trains on full batches): "
                                "use --balance weights, or pass --few-shot off.")

    def stages_to_train(self) -> int | None:
        """How many of the last backbone stages fine-tuning trains; None: all of them."""
        if self.unfreeze == "auto":
            return DEFAULT_UNFREEZE.get(self.strategy)
        return None if self.unfreeze == "all" else int(self.unfreeze)

    @property
    def finetunes(self) -> bool:
        """True when the strategy has a fine-tuning phase."""
        return self.strategy in FINETUNING_STRATEGIES

    @property
    def probes(self) -> bool:
        """True when the strategy starts with a linear probe."""
        return self.strategy in PROBING_STRATEGIES

    def resolve_schedule(self, train_images: int) -> tuple[TrainConfig, dict[str, Any]]:
        """This config with ``--epochs`` / ``--probe-epochs`` auto (None) turned into numbers for
        ``train_images`` training images, and the record of each value and why (logged, config.json).

        A budget of optimizer steps, not of epochs: the same epochs are 6 steps on 100 images and 6,250 on
        100,000, and neither converges like the 437 of the default data's 2 epochs.
        """
        record: dict[str, Any] = {}
        values: dict[str, int] = {}
        batch = self.batch_size
        # Fine-tuning drops an incomplete last batch (when there is more than one); the probe keeps it.
        finetune_steps = train_images // batch if train_images > batch else 1
        probe_steps = max(1, math.ceil(train_images / batch))
        phases = (("epochs", self.finetunes, finetune_steps, FINETUNE_TARGET_STEPS, FINETUNE_EPOCHS),
                  ("probe_epochs", self.probes and not self.few_shot_active, probe_steps, PROBE_TARGET_STEPS,
                   PROBE_EPOCHS))
        for name, used, per_epoch, target, (low, high) in phases:
            given = getattr(self, name)
            if given is not None:
                record[name] = given
                record[f"{name}_reason"] = f"--{name.replace('_', '-')} {given} (given)"
                continue
            if not used:
                continue
            chosen = min(high, max(low, round(target / per_epoch)))
            values[name] = record[name] = chosen
            epochs = f"{chosen} epoch{'s' * (chosen != 1)}"
            record[f"{name}_reason"] = (f"auto: {train_images} images at batch {batch} are {per_epoch} steps an epoch; "
                                        f"{epochs} = {chosen * per_epoch} steps (target {target}, {low} to {high} "
                                        "epochs)")
        return dataclasses.replace(self, **values), record  # type: ignore[arg-type]

    def resolved(self, name: str) -> int:
        """The number of epochs field ``name`` (``epochs``, ``probe_epochs``) stands for in a resolved config."""
        value = getattr(self, name)
        if value is None:
            raise TlDeployError(f"--{name.replace('_', '-')} auto has no number before resolve_schedule sees the data.")
        return int(value)

    def spec(self, native_size: int | None = None) -> PreprocessSpec:
        """The run's preprocessing: the starting weights' own data config, then the user's flags on top.

        ``native_size``: the data's typical shorter side in pixels (``setup.native_size``), which
        ``--img-size auto`` and the default crop read; None when unmeasured. Every value's origin is recorded
        in the spec's ``source`` (config.json, ONNX metadata, the model card).
        """
        model = model_data_config(self.model, self.weights)
        if self.img_size == "auto":
            size, size_from = auto_img_size(model.input_size, native_size)
        else:
            size, size_from = int(self.img_size), "user:--img-size"
        # Data upsampled to the input (small images) keep the whole image and a bilinear resize: on Animal-Shape
        # (28 -> 112 px, val) the model's crop 0.875 + bicubic and crop 1.0 + bicubic both scored below it.
        upsampled = native_size is not None and native_size < size
        why = f"auto:data native {native_size} px upsampled to {size} px"
        auto = {"crop_pct": (1.0, f"{why} keeps the whole image"), "interpolation": ("bilinear", f"{why}, bilinear")}
        chosen = {"crop_pct": (self.crop_pct, model.crop_pct),
                  "interpolation": (self.interpolation, model.interpolation),
                  "mean": (self.mean, model.mean), "std": (self.std, model.std)}
        values: dict[str, Any] = {}
        source = {"input_size": size_from}
        for key, (given, default) in chosen.items():
            where = "resize" if key == "crop_pct" else key
            if given is not None:
                values[key], source[where] = given, f"user:--{key.replace('_', '-')}"
            elif upsampled and key in auto:
                values[key], source[where] = auto[key]
            else:
                values[key], source[where] = default, model.source
        return PreprocessSpec.for_size(size, values.pop("crop_pct"), source=tuple(source.items()), **values)
