"""Fine-tune a pretrained backbone on a target-domain ImageFolder and write a model artifact.

    python -m tl_deploy.finetune                      # the embedded default: Animal-Shape, lp-ft
    python -m tl_deploy.finetune --data DIR --strategy finetune --epochs 5

Strategies (the transfer-learning literature's names):

- ``linear``: frozen backbone, new head, trained on cached features (the backbone runs once).
- ``finetune``: all layers; the backbone learns at a lower rate than the head.
- ``lp-ft``: linear probe first, then fine-tune from that head (the default). By default the stem and
  first blocks keep their ImageNet weights (``--unfreeze 4``); ``--unfreeze all`` trains every layer.
- ``partial --unfreeze N``: only the head and the last N backbone stages train.

When the first stages are frozen and augmentation is off, their output for each image is the same
every epoch: it is computed once, kept in memory, and the epochs run only the layers that train. Such
one-off passes over frozen layers run on onnxruntime on a CPU (tl_deploy/frozen.py).

Under ``torchrun --nproc_per_node N -m tl_deploy.finetune ...`` it trains with DistributedDataParallel
(see tl_deploy/distributed.py); ``--batch-size`` stays the global batch.

``--head attention-fusion`` fuses several backbone depths (tl_deploy.heads); ``--target-unlabeled DIR
--da {dann,mmd,coral}`` adds unsupervised domain adaptation to the fine-tuning phase (tl_deploy.da).
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tl_deploy import distributed
from tl_deploy.artifact import Architecture, save_artifact
from tl_deploy.checkpoint import Checkpointer
from tl_deploy.cli import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    OneLineParser,
    Range,
    add_verbose,
    apply_ranges,
    device_arg,
    run_cli,
)
from tl_deploy.da import DA_METHODS, DomainAdapter, cycle, target_test_samples, unlabeled_samples
from tl_deploy.data import (
    ON_BAD_IMAGE,
    ImageDataset,
    Sample,
    Splits,
    eval_transform,
    limit_per_class,
    load_splits,
    train_transform,
)
from tl_deploy.distributed import SINGLE, DistContext
from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError, ModelError, TlDeployError
from tl_deploy.features import cached_features, compute_activations, compute_features
from tl_deploy.fileio import check_output_folder, check_output_writable, default_cache_dir, sha256_file
from tl_deploy.frozen import FROZEN_RUNTIMES, Forward, frozen_forward, resolve_frozen_runtime
from tl_deploy.heads import DEFAULT_FUSION_DIM, DEFAULT_FUSION_LEVELS, HEADS, create_fusion_model
from tl_deploy.models import (
    DEFAULT_MODEL,
    EMBEDDED_WEIGHTS,
    StageSuffix,
    backbone_stages,
    check_model_name,
    check_train_stages,
    create_model,
    frozen_modules,
    pooled_features,
    set_trainable,
    split_after_stages,
)
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.reports import (
    ClassificationResult,
    classification_result,
    confusion_png,
    curves_png,
    format_result,
)

_logger = logging.getLogger(__name__)

STRATEGIES = ("linear", "finetune", "lp-ft", "partial")
OPTIMIZERS = ("adamw", "sgd")
BALANCE = ("none", "weights", "sampler")
BN_MODES = ("frozen", "train")
AMP_MODES = ("auto", "off", "bf16", "fp16")
DEFAULT_DATA = Path("data/animal-shape")
# Backbone stages trained when --unfreeze is "auto" (None: all). lp-ft keeps efficientnet_lite0's stem and
# first three blocks frozen: on Animal-Shape this beat training every layer in the same time (README).
DEFAULT_UNFREEZE: dict[str, int | None] = {"finetune": None, "lp-ft": 4, "partial": 2}
ACTIVATION_CACHE_MAX_BYTES = 4 << 30  # frozen-prefix outputs kept in memory, at most
OPTIONAL_NUMBERS = ("val_split", "limit_per_class", "workers", "layer_decay", "patience")  # None: unset
# Allowed values of every numeric option: the parser's types and TrainConfig.validate both use them.
RANGES: dict[str, Range] = {
    "val_split": FRACTION,
    "limit_per_class": POSITIVE_INT,
    "workers": COUNT,
    "img_size": Range(int, 8, 4096),
    "crop_pct": Range(float, 0.0, 1.0, low_open=True),
    "drop_rate": Range(float, 0.0, 1.0, high_open=True),
    "fusion_levels": POSITIVE_INT,
    "fusion_dim": POSITIVE_INT,
    "da_weight": NON_NEGATIVE,
    "epochs": COUNT,
    "probe_epochs": COUNT,
    "batch_size": POSITIVE_INT,
    "lr": POSITIVE,
    "probe_lr": POSITIVE,
    "backbone_lr_mult": NON_NEGATIVE,
    "layer_decay": Range(float, 0.0, 1.0, low_open=True),
    "warmup_epochs": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "label_smoothing": Range(float, 0.0, 1.0, high_open=True),
    "patience": POSITIVE_INT,
    "seed": SEED,
    "grad_accum_steps": POSITIVE_INT,
}


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a fine-tuning run; saved in the artifact's config.json."""

    data: str | None = None  # ImageFolder root; None: the embedded Animal-Shape default
    val_split: float | None = None  # split val off train/ when the data has no val/
    model: str = DEFAULT_MODEL  # timm architecture name
    weights: str = "embedded"  # embedded | hub | none | path to a state dict
    strategy: str = "lp-ft"
    unfreeze: int | str = "auto"  # backbone stages that train, counted from the output: N, "all" or "auto"
    epochs: int = 2  # fine-tuning epochs (finetune, lp-ft, partial)
    probe_epochs: int = 20  # head epochs on cached features (linear, lp-ft); nearly free
    batch_size: int = 32  # global: images per optimizer step over all processes and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each process (memory, not math)
    sync_bn: bool = False  # distributed --bn train: batch statistics over all processes (CUDA only)
    img_size: int = 112  # network input side; 28 px silhouettes gain little beyond this
    crop_pct: float = 1.0  # resize shorter side to img_size / crop_pct, then center crop
    interpolation: str = "bilinear"
    optimizer: str = "adamw"
    lr: float = 1e-3  # head learning rate; the backbone's is lr * backbone_lr_mult
    probe_lr: float = 1e-3
    backbone_lr_mult: float = 0.3  # backbone at 0.3x the head LR: best of 0.1, 0.3, 1.0 on Animal-Shape
    layer_decay: float | None = None  # layer-wise LR decay instead of backbone_lr_mult
    warmup_epochs: float = 0.1
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    balance: str = "none"  # class-imbalance handling: loss weights or a balanced sampler
    augment: bool = False  # off by default: it cost accuracy in the default 2-epoch schedule (README)
    amp: str = "auto"  # auto: bf16/fp16 on CUDA; on CPU fp32 unless bf16 measures faster there
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    patience: int | None = None  # early stopping on val accuracy (epochs without improvement)
    limit_per_class: int | None = None  # few-shot: at most K training images per class
    workers: int | None = None  # DataLoader workers; None: 0 on small CPUs, else min(8, cores)
    drop_rate: float = 0.2
    bn: str = "frozen"  # frozen: BatchNorm keeps ImageNet statistics while fine-tuning (affine still trains)
    cache_dir: str | None = None  # feature cache; None: $TL_DEPLOY_CACHE or ~/.cache/tl_deploy
    no_cache: bool = False
    frozen_runtime: str = "auto"  # inference over frozen layers: auto (onnxruntime on CPU), torch, onnxruntime
    out: str | None = None  # artifact folder; None: models/<run-name>
    name: str | None = None
    resume: bool = False
    on_bad_image: str = "fail"  # fail: refuse a dataset with bad files, naming them; skip: train without them
    head: str = "linear"  # linear | attention-fusion (tl_deploy.heads)
    fusion_levels: int = DEFAULT_FUSION_LEVELS  # attention-fusion: final features + the last N-1 stages
    fusion_dim: int = DEFAULT_FUSION_DIM
    channel_attention: bool = True  # attention-fusion: squeeze-and-excitation on the fused vector
    target_unlabeled: str | None = None  # target images for --da; a labelled test/ there is scored after training
    da: str | None = None  # dann | mmd | coral (tl_deploy.da)
    da_weight: float = 1.0  # weight of the alignment loss against the source classification loss

    def __post_init__(self) -> None:
        if isinstance(self.unfreeze, str) and self.unfreeze.isdigit():  # "4" from the CLI is the same run as 4
            object.__setattr__(self, "unfreeze", int(self.unfreeze))

    def validate(self) -> None:
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL_NUMBERS:
                allowed.check(f"--{name.replace('_', '-')}", value)
        self.validate_transfer()
        if self.strategy not in STRATEGIES:
            raise TlDeployError(f"Invalid strategy {self.strategy!r}. Only {', '.join(STRATEGIES)} are supported.")
        if self.optimizer not in OPTIMIZERS:
            raise TlDeployError(f"Invalid optimizer {self.optimizer!r}. Only SGD and AdamW are supported.")
        if self.balance not in BALANCE:
            raise TlDeployError(f"Invalid --balance {self.balance!r}. Only {', '.join(BALANCE)} are supported.")
        if self.bn not in BN_MODES:
            raise TlDeployError(f"Invalid --bn {self.bn!r}. Only {', '.join(BN_MODES)} are supported.")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise TlDeployError(f"Invalid --on-bad-image {self.on_bad_image!r}. Only fail and skip are supported.")
        if self.frozen_runtime not in FROZEN_RUNTIMES:
            raise TlDeployError(f"Invalid --frozen-runtime {self.frozen_runtime!r}. "
                                f"Only {', '.join(FROZEN_RUNTIMES)} are supported.")
        if self.amp not in AMP_MODES:
            raise TlDeployError(f"Invalid --amp {self.amp!r}. Only {', '.join(AMP_MODES)} are supported.")
        for name in ("epochs", "probe_epochs"):
            if getattr(self, name) < 0:
                raise TlDeployError(f"Invalid --{name.replace('_', '-')} {getattr(self, name)}: must be >= 0.")
        if self.strategy in ("linear", "lp-ft") and self.probe_epochs == 0:
            raise TlDeployError(f"--strategy {self.strategy} needs --probe-epochs >= 1.")
        if self.strategy in ("finetune", "lp-ft", "partial") and self.epochs == 0:
            raise TlDeployError(f"--strategy {self.strategy} needs --epochs >= 1.")
        if self.batch_size < 1 or self.img_size < 8 or not 0 < self.crop_pct <= 1:
            raise TlDeployError(
                f"Invalid --batch-size {self.batch_size} / --img-size {self.img_size} / --crop-pct "
                f"{self.crop_pct}: need batch >= 1, size >= 8, 0 < crop-pct <= 1."
            )
        if self.lr <= 0 or self.probe_lr <= 0 or self.backbone_lr_mult < 0:
            raise TlDeployError("Learning rates must be positive (and --backbone-lr-mult >= 0).")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise TlDeployError(f"Invalid --layer-decay {self.layer_decay}: choose a value in (0, 1].")
        if self.grad_accum_steps < 1:
            raise TlDeployError(f"Invalid --grad-accum-steps {self.grad_accum_steps}: must be >= 1.")
        if self.sync_bn and self.bn == "frozen":
            raise TlDeployError("--sync-bn synchronises batch statistics but --bn frozen uses none: "
                                "add --bn train or drop --sync-bn.")
        if not (self.unfreeze in ("auto", "all") or str(self.unfreeze).isdigit()):
            raise TlDeployError(f"Invalid --unfreeze {self.unfreeze!r}: give a number of stages, all, or auto.")

    def stages_to_train(self) -> int | None:
        """How many of the last backbone stages fine-tuning trains; None: all of them."""
        if self.unfreeze == "auto":
            return DEFAULT_UNFREEZE.get(self.strategy)
        return None if self.unfreeze == "all" else int(self.unfreeze)

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
        if self.da_weight < 0:
            raise TlDeployError(f"Invalid --da-weight {self.da_weight}: must be >= 0.")
        if self.fusion_dim < 1:
            raise TlDeployError(f"Invalid --fusion-dim {self.fusion_dim}: must be >= 1.")

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.for_size(self.img_size, self.crop_pct, interpolation=self.interpolation)


@dataclass
class RunState:
    """What a checkpoint restores: progress, history and the best weights so far."""

    phase: str = "probe"
    epoch: int = 0  # completed epochs of the current phase
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0


# ----------------------------------------------------------------------------- environment

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"--device {name} asked for a GPU but CUDA is not available here "
            f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch on a GPU machine."
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TlDeployError(f"Invalid --device {name!r}. Use auto, cpu, cuda or cuda:N.")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# On a CPU, --amp auto trains in bf16 only when a training step measures at least this much faster than
# fp32 on that very machine. Native bf16 is no promise of speed: on an AVX-512-BF16 CPU the default job's
# fine-tuning took 105 s in bf16 against 80 s in fp32 (issue 13).
BF16_MIN_SPEEDUP = 1.2
AMP_MEASURE_STEPS = 3  # timed forward + backward passes per precision, after one warm-up each


@dataclass(frozen=True)
class AmpChoice:
    """The autocast dtype training runs under (None: fp32), and why; recorded in config.json."""

    dtype: torch.dtype | None
    reason: str
    step_ms: dict[str, float] | None = None  # measured ms per training step, when auto measured them
    to_measure: bool = False  # auto on a CPU with native bf16: fp32 unless bf16 measures faster

    @property
    def name(self) -> str:
        return "off" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def resolve_amp(mode: str, device: torch.device) -> AmpChoice:
    """What ``--amp mode`` means on ``device``. On CUDA, auto picks bf16 where the GPU has it natively
    (fp16 otherwise). On a CPU, auto is fp32 unless the CPU has native bf16, and even then only after
    ``measure_amp`` finds bf16 faster: the choice comes back with ``to_measure``."""
    if mode == "off":
        return AmpChoice(None, "--amp off")
    if device.type == "cuda":
        if mode in ("fp16", "bf16"):
            return AmpChoice(torch.float16 if mode == "fp16" else torch.bfloat16, f"--amp {mode}")
        # Emulated bf16 (T4, V100) is counted as supported unless including_emulation=False.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return AmpChoice(torch.bfloat16, "auto: the GPU has native bf16")
        return AmpChoice(torch.float16, "auto: the GPU has no native bf16, so fp16 with loss scaling")
    if mode == "fp16":
        raise TlDeployError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off.")
    if mode == "bf16":
        return AmpChoice(torch.bfloat16, "--amp bf16")
    if not cpu_has_native_bf16():
        # Emulated bf16 on CPUs without native support (AVX512-BF16/AMX) is ~10x slower than fp32.
        return AmpChoice(None, "auto: fp32, the CPU has no native bf16")
    return AmpChoice(None, "auto: fp32 (bf16 not measured yet)", to_measure=True)


def measure_amp(choice: AmpChoice, time_step: Callable[[torch.dtype | None], float]) -> AmpChoice:
    """Settle an auto choice that needs a measurement: bf16 only when ``time_step(torch.bfloat16)``
    (ms per training step) beats ``time_step(None)`` (fp32) by ``BF16_MIN_SPEEDUP``."""
    if not choice.to_measure:
        return choice
    fp32_ms, bf16_ms = time_step(None), time_step(torch.bfloat16)
    step_ms = {"fp32": round(fp32_ms, 3), "bf16": round(bf16_ms, 3)}
    speedup = fp32_ms / bf16_ms if bf16_ms > 0 else 0.0
    if speedup >= BF16_MIN_SPEEDUP:
        return AmpChoice(torch.bfloat16, f"auto: bf16 measured {speedup:.2f}x faster than fp32 per training "
                                         f"step on this CPU ({bf16_ms:.1f} vs {fp32_ms:.1f} ms)", step_ms)
    return AmpChoice(None, f"auto: fp32, bf16 measured {speedup:.2f}x its speed per training step on this CPU "
                           f"({bf16_ms:.1f} vs {fp32_ms:.1f} ms; bf16 needs {BF16_MIN_SPEEDUP}x)", step_ms)


def time_train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    amp: torch.dtype | None, freeze_bn: bool, steps: int = AMP_MEASURE_STEPS) -> float:
    """Median ms of one forward + backward of a copy of ``net`` (its weights and BatchNorm statistics
    stay untouched) on the batch ``(x, y)`` under ``amp``. The optimizer step is left out: it runs in
    fp32 under either precision."""
    probe = copy.deepcopy(net)
    set_train_mode(probe, freeze_bn)
    times = []
    for i in range(steps + 1):  # the first pass lets oneDNN pick its kernels
        t0 = time.perf_counter()
        with _autocast(device, amp):
            loss = nn.functional.cross_entropy(probe(x).float(), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
        probe.zero_grad(set_to_none=True)
    return 1000 * float(np.median(times))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # On a small CPU the decode of small images is cheaper than a worker's share of the cores.
    if device.type == "cpu" and cores <= 4:
        return 0
    return min(8, cores)


def weights_identity(cfg: TrainConfig) -> str:
    """A string that changes whenever the starting weights change (feature-cache key part)."""
    if cfg.weights == "embedded" and cfg.model in EMBEDDED_WEIGHTS:
        return f"{cfg.model}:embedded:{sha256_file(EMBEDDED_WEIGHTS[cfg.model]())}"
    if cfg.weights == "none":
        return f"{cfg.model}:random:{cfg.seed}"
    if cfg.weights == "hub":
        import timm

        return f"{cfg.model}:hub:timm-{timm.__version__}"
    return f"{cfg.model}:file:{sha256_file(cfg.weights)}"


def features_identity(cfg: TrainConfig) -> str:
    """Feature-cache key part: the starting weights plus which features the head reads."""
    if cfg.head == "linear":
        return weights_identity(cfg)
    return f"{weights_identity(cfg)}|{cfg.head}:{cfg.fusion_levels}"


def build_network(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The backbone with the chosen head, starting weights loaded."""
    if cfg.head == "attention-fusion":
        return create_fusion_model(cfg.model, num_classes, weights=cfg.weights, drop_rate=cfg.drop_rate,
                                   levels=cfg.fusion_levels, dim=cfg.fusion_dim,
                                   channel_attention=cfg.channel_attention)
    return create_model(cfg.model, num_classes=num_classes, weights=cfg.weights, drop_rate=cfg.drop_rate)


def architecture(cfg: TrainConfig, num_classes: int) -> Architecture:
    if cfg.head == "attention-fusion":
        return Architecture(name=cfg.model, num_classes=num_classes, head=cfg.head, drop_rate=cfg.drop_rate,
                            fusion_levels=cfg.fusion_levels, fusion_dim=cfg.fusion_dim,
                            channel_attention=cfg.channel_attention)
    return Architecture(name=cfg.model, num_classes=num_classes, drop_rate=cfg.drop_rate)


# ----------------------------------------------------------------------------- data

def resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data is not None:
        return Path(cfg.data)
    from tl_deploy.datasets import prepare_animal_shape, split_differences

    # The default run trains on the default split; a tree the user made with other options is theirs.
    differences = split_differences(DEFAULT_DATA, "animal-shape", seed=0, val_fraction=0.1, test_fraction=0.2)
    if differences:
        raise DataError(
            f"{DEFAULT_DATA} was built with other options ({'; '.join(differences)}), so it is not the "
            f"default data and rebuilding it would replace it: pass --data {DEFAULT_DATA} to train on it, "
            "or move it away to let the default run rebuild the default split."
        )
    return prepare_animal_shape(DEFAULT_DATA, seed=0, val_fraction=0.1, test_fraction=0.2)


class ActivationDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Cached frozen-prefix outputs and their labels, in the order of the samples they came from."""

    def __init__(self, activations: torch.Tensor, samples: Sequence[Sample]) -> None:
        self.activations = activations
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.activations[index].float(), self.targets[index]


def make_loader(samples: Sequence[Sample], transform: Any, cfg: TrainConfig, *, train: bool, epoch: int,
                workers: int, class_weights: torch.Tensor | None = None,
                activations: torch.Tensor | None = None,
                dist: DistContext = SINGLE) -> torch.utils.data.DataLoader:
    """Loader whose shuffling depends only on (seed, epoch): resuming replays the same order. A training
    loader yields this process's micro-batches of a global order that is the same for any process count.

    With ``activations`` it serves those cached prefix outputs instead of decoding the images.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    dataset: ImageDataset | ActivationDataset
    if activations is not None:
        dataset, workers = ActivationDataset(activations, samples), 0
    else:
        dataset = ImageDataset(samples, transform)
    sampler: torch.utils.data.Sampler[int] | None = None
    drop_last = train and len(samples) > cfg.batch_size
    if train and cfg.balance == "sampler" and class_weights is not None:
        per_sample = class_weights[torch.tensor(dataset.targets)]
        sampler = torch.utils.data.WeightedRandomSampler(per_sample.tolist(), len(samples), generator=generator)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if sampler is not None:
        sampler = distributed.ShardSampler(sampler, dist, drop_last)  # this rank's share of the shuffled order
    batch_size = (distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum_steps, len(samples), dist)
                  if train else cfg.batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
        generator=generator, num_workers=workers, drop_last=drop_last,
        persistent_workers=False,
    )


def inverse_frequency(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor([label for _, label in samples]), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))  # (C,)


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(params: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernels (CPU and CUDA) make the same update in one pass over the parameters: a step of
    # the default run's 3.3M trained parameters takes ~6 ms instead of ~18 ms on 2 cores.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in params for p in g["params"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.AdamW(params, fused=fused)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's LR, then cosine decay to zero, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finetune_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at ``lr``; backbone at ``lr * backbone_lr_mult`` or with layer-wise decay. No weight
    decay on biases and norm parameters."""
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
        for g in groups:
            g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
            g["params"] = [p for p in g["params"] if p.requires_grad]
        return [g for g in groups if g["params"]]
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in head_ids, p.ndim <= 1), []).append(p)
    groups = []
    for (is_head, no_decay), params in buckets.items():
        lr = cfg.lr if is_head else cfg.lr * cfg.backbone_lr_mult
        groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return groups


def _autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode, except frozen layers and (``freeze_bn``) every BatchNorm, which keep their statistics."""
    model.train()
    for module in frozen_modules(model):
        module.eval()  # frozen layers' BatchNorm keeps its running statistics
    if freeze_bn:
        # Batch statistics of a new domain differ from the source's; normalising with them shifts every
        # feature the (probed) head relies on. Frozen statistics keep the features, affine params adapt.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module, device: torch.device,
                    amp: torch.dtype | None, scaler: torch.amp.GradScaler | None, desc: str,
                    freeze_bn: bool = False, accum_steps: int = 1, dist: DistContext = SINGLE,
                    adapter: DomainAdapter | None = None) -> tuple[float, float]:
    """One pass over the loader; returns (mean loss, accuracy) on the augmented training images of all
    processes. An optimizer step follows every ``accum_steps`` micro-batches (an incomplete last group is
    skipped, as a single process drops an incomplete last batch). With ``adapter`` (domain adaptation)
    each step also draws a target batch and adds its alignment loss."""
    set_train_mode(model, freeze_bn)
    total_loss, correct, seen = 0.0, 0, 0
    micro_batches = len(loader) // accum_steps * accum_steps
    bar = tqdm(itertools.islice(loader, micro_batches), total=micro_batches, desc=desc, leave=False,
               disable=distributed.tqdm_disable())
    for i, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        step = (i + 1) % accum_steps == 0  # last micro-batch of an optimizer step: DDP all-reduces now
        with distributed.no_sync(model, step):
            with _autocast(device, amp):
                if adapter is None:
                    logits = model(x)  # (B, C)
                    loss = criterion(logits.float(), y)
                else:
                    logits, align_loss = adapter(model, x)  # (B, C), scalar
                    loss = criterion(logits.float(), y) + align_loss.float()
            if not torch.isfinite(loss):
                raise TlDeployError(f"Training diverged (loss {loss.item()}): lower --lr or disable --amp.")
            if i % accum_steps == 0:
                optimizer.zero_grad(set_to_none=True)
            # Mean over the micro-batch / accum_steps, then DDP's mean over processes: the global batch mean.
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if step:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if adapter is not None:
                adapter.step_done()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    loss_sum, correct_sum, count = distributed.all_reduce_sum([total_loss, correct, seen], dist)
    return loss_sum / max(1, count), correct_sum / max(1, count)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                   amp: torch.dtype | None, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float32 logits and (N,) labels, eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=distributed.tqdm_disable()):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            all_logits.append(model(x).float().cpu())
        all_labels.append(y)
    return torch.cat(all_logits), torch.cat(all_labels)


def summarize(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassificationResult:
    loss = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")
    return classification_result(labels.numpy(), logits.argmax(1).numpy(), num_classes, loss)


def evaluate(model: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, cfg: TrainConfig,
             device: torch.device, amp: torch.dtype | None, workers: int, num_classes: int,
             desc: str = "eval", dist: DistContext = SINGLE) -> ClassificationResult:
    """Metrics of the whole split: each rank predicts its block, the logits are gathered on every rank.
    ``model`` is the plain module, not the DDP wrapper (ranks run different numbers of batches)."""
    part = distributed.shard(samples, dist)
    loader = make_loader(part, eval_transform(spec), cfg, train=False, epoch=0, workers=workers)
    logits, labels = (predict_logits(model, loader, device, amp, desc) if part
                      else (torch.empty(0, num_classes), torch.empty(0, dtype=torch.int64)))
    return summarize(distributed.all_gather_cat(logits, dist), distributed.all_gather_cat(labels, dist), num_classes)


# ----------------------------------------------------------------------------- frozen-stage cache

def activation_split(model: nn.Module, cfg: TrainConfig, spec: PreprocessSpec, device: torch.device,
                     num_images: int) -> tuple[nn.Module, StageSuffix] | None:
    """(frozen prefix, trainable rest) when fine-tuning can run on cached prefix outputs: the first
    stages are frozen, augmentation is off (so each image's prefix output never changes), the
    architecture can be cut there, and the outputs of all images fit in memory. Else None."""
    train_stages = cfg.stages_to_train()
    # Domain adaptation runs the whole network on raw target images each step; fusion reads several depths.
    if cfg.strategy == "linear" or cfg.augment or train_stages is None or cfg.da is not None or cfg.head != "linear":
        return None
    split = split_after_stages(model, len(backbone_stages(model)) - train_stages)
    if split is None:
        return None
    with torch.no_grad():
        probe = split[0].eval()(torch.zeros(1, 3, spec.input_size, spec.input_size, device=device))
    need = probe.numel() * probe.element_size() * num_images
    if need > ACTIVATION_CACHE_MAX_BYTES:
        _logger.info("frozen-stage outputs would need %.1f GiB: running every layer each epoch", need / 2**30)
        return None
    return split


def suffix_features(forward: Forward, activations: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, D) pooled features from cached prefix outputs: the same as ``pooled_features`` on the images.
    ``forward`` is the suffix's ``pre_logits`` pass (``frozen_forward``)."""
    chunks = [forward(activations[i:i + batch_size]).cpu() for i in range(0, len(activations), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0)


# ----------------------------------------------------------------------------- phases

def train_probe(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                val_y: torch.Tensor, cfg: TrainConfig, class_weights: torch.Tensor | None,
                state: RunState) -> None:
    """Train the head alone on cached features; keeps the head of the best val epoch."""
    params = [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    for g in params:
        g["lr"] = cfg.probe_lr
    optimizer = build_optimizer(params, cfg)
    steps_per_epoch = max(1, math.ceil(len(train_x) / cfg.batch_size))
    scheduler = warmup_cosine(optimizer, cfg.probe_epochs * steps_per_epoch, 0)
    weight = class_weights if cfg.balance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    best = {k: v.clone() for k, v in head.state_dict().items()}
    best_acc = -1.0
    for epoch in range(cfg.probe_epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if cfg.balance == "sampler" and class_weights is not None:
            order = torch.multinomial(class_weights[train_y], len(train_y), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(train_x), generator=generator)
        head.train()
        total, correct = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logits = head(train_x[idx])  # (B, C)
            loss = criterion(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == train_y[idx]).sum())
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x)
        val = summarize(val_logits, val_y, int(val_logits.shape[1]))
        row = {"phase": "probe", "epoch": epoch + 1, "train_loss": total / len(order),
               "train_acc": correct / len(order), "val_loss": val.loss, "val_acc": val.accuracy}
        state.history.append(row)
        _log_epoch(row)
        if val.accuracy > best_acc:
            best_acc = val.accuracy
            best = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best)


def _log_epoch(row: dict[str, Any]) -> None:
    extra = f"  {row['seconds']:6.1f}s" if "seconds" in row else ""
    _logger.info("%-6s %3d  train loss %.4f acc %6.2f%%  val loss %.4f acc %6.2f%%%s", row["phase"], row["epoch"],
                 row["train_loss"], 100 * row["train_acc"], row["val_loss"], 100 * row["val_acc"], extra)


# ----------------------------------------------------------------------------- orchestration

def check_output(cfg: TrainConfig, out: Path, data_dir: Path) -> None:
    """Before any work: ``out`` follows the output rule (new, empty or an earlier artifact, never an
    input of this run) and has room for the artifact."""
    weights = None if cfg.weights in ("embedded", "hub", "none") else cfg.weights
    check_output_folder(out, "model artifact", inputs={
        "training data": data_dir, "target-domain images": cfg.target_unlabeled, "starting weights": weights})
    check_output_writable(out)


def checkpoint_mismatch(exc: BaseException, what: str, where: Path | None = None) -> ArtifactError:
    """One line for a checkpoint whose contents do not fit the model being resumed."""
    first = " ".join(str(exc).split())[:300] or type(exc).__name__
    todo = f"Delete {where} and drop" if where is not None else "Drop"
    return ArtifactError(f"The checkpoint's {what} does not fit this run ({first}). {todo} --resume to start over.")


def restore_checkpoint(model: nn.Module, loaded: dict[str, Any], where: Path) -> RunState:
    """Weights and progress from a checkpoint; one clear error when they do not fit ``model``."""
    try:
        model.load_state_dict(loaded["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # unexpected/missing keys, shapes
        raise checkpoint_mismatch(exc, "model state", where) from exc
    try:
        return RunState(**loaded["run_state"])
    except (KeyError, TypeError) as exc:
        raise checkpoint_mismatch(exc, "run state", where) from exc


def run_name(cfg: TrainConfig, data_dir: Path) -> str:
    if cfg.name:
        return cfg.name
    return f"{data_dir.resolve().name}-{cfg.model}-{cfg.strategy}"


def fit(cfg: TrainConfig) -> Path:
    """Run fine-tuning end to end; returns the artifact folder. Under torchrun every process calls it
    and rank 0 alone writes the artifact."""
    cfg.validate()
    with distributed.process_group(resolve_device(cfg.device)) as dist:
        return _fit(cfg, dist)


def _fit(cfg: TrainConfig, dist: DistContext) -> Path:
    start = time.perf_counter()
    if cfg.da is not None and dist.world_size > 1:
        raise TlDeployError("--da runs in one process only: start it without torchrun.")
    device = dist.device
    amp = resolve_amp(cfg.amp, device)  # refuses --amp fp16 on a CPU before any work
    seed_everything(cfg.seed, cfg.deterministic)
    check_model_name(cfg.model)
    with distributed.local_main_first(dist):  # one process per node prepares the embedded data
        data_dir = resolve_data(cfg)
    out = Path(cfg.out) if cfg.out else Path("models") / run_name(cfg, data_dir)
    distributed.run_on_main(lambda: check_output(cfg, out, data_dir), dist)

    splits: Splits = load_splits(data_dir, cfg.val_split, cfg.seed, on_bad_image=cfg.on_bad_image)
    train_samples = splits.train
    if cfg.limit_per_class is not None:
        train_samples = limit_per_class(train_samples, cfg.limit_per_class, cfg.seed)
    num_classes = len(splits.class_names)
    spec = cfg.spec()
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    class_weights = inverse_frequency(train_samples, num_classes)
    _logger.info("device %s, amp %s, %d workers; %d classes, %d train / %d val / %d test images", device,
                 "auto (measured before fine-tuning)" if amp.to_measure else amp.name, workers, num_classes,
                 len(train_samples), len(splits.val), len(splits.test))

    model = build_network(cfg, num_classes)
    if cfg.strategy != "linear":
        check_train_stages(model, cfg.stages_to_train())  # before any work, not after the linear probe
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ckpt = Checkpointer(out, fingerprint=_fingerprint(cfg, splits), writer=dist.is_main)
    state = RunState()
    loaded: dict[str, Any] | None = distributed.run_on_main(ckpt.load, dist) if cfg.resume else None
    if cfg.resume:
        if loaded is None:
            _logger.info("no checkpoint for %s yet: starting from the beginning", out)
        else:
            state = restore_checkpoint(model, loaded, ckpt.dir)
            _logger.info("resumed %s: phase %s, %d epochs done", out, state.phase, state.epoch)

    split = activation_split(model, cfg, spec, device, len(train_samples) + len(splits.val))
    runtime = resolve_frozen_runtime(cfg.frozen_runtime, device, len(train_samples) + len(splits.val))
    frozen_choice = "torch" if runtime == "torch" else cfg.frozen_runtime  # auto falls back if an export fails
    frozen_used: set[str] = set()

    def frozen(module: nn.Module, example: torch.Tensor,
               call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Forward:
        forward = frozen_forward(module, example, runtime=frozen_choice, device=device, call=call)
        frozen_used.add(forward.runtime)
        return forward

    image = torch.zeros(1, 3, spec.input_size, spec.input_size)  # (1, 3, H, W): an export example
    eval_batch = max(cfg.batch_size, 128)
    acts: dict[str, torch.Tensor] = {}
    if split is not None:
        _logger.info("the first %d backbone stages stay frozen: their outputs are computed once for every epoch "
                     "(%s)", len(backbone_stages(model)) - (cfg.stages_to_train() or 0), runtime)
        prefix = frozen(split[0], image)
        acts = {name: compute_activations(split[0], samples, spec, device=device, batch_size=eval_batch,
                                          workers=workers, desc=f"{name} activations", forward=prefix)
                for name, samples in (("train", train_samples), ("val", splits.val))}

    if cfg.strategy in ("linear", "lp-ft") and not (loaded is not None and state.phase == "finetune"):
        cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        # onnxruntime's features differ from PyTorch's in the last float bits: cached apart.
        model_id = features_identity(cfg) + ("" if runtime == "torch" else f"|{runtime}")
        features_forward: list[Forward] = []  # built on the first cache miss only (an export takes ~1 s)

        def features_of(name: str, samples: Sequence[Sample]) -> torch.Tensor:
            if split is not None:
                if not features_forward:
                    features_forward.append(frozen(split[1], acts[name][:1], call=lambda m, h: m(h, pre_logits=True)))
                return suffix_features(features_forward[0], acts[name], eval_batch)
            if not features_forward:
                features_forward.append(frozen(model, image, call=pooled_features))
            return compute_features(model, samples, spec, device=device, batch_size=eval_batch, workers=workers,
                                    desc=f"{name} features", dist=dist, forward=features_forward[0])

        feats = {}
        for name, samples in (("train", train_samples), ("val", splits.val)):
            feats[name] = cached_features(model, model_id, samples, spec, device=device, cache_dir=cache_dir,
                                          batch_size=eval_batch, workers=workers, desc=f"{name} features",
                                          compute=functools.partial(features_of, name, samples),
                                          dist=dist)
        labels = {name: torch.tensor([lbl for _, lbl in s])
                  for name, s in (("train", train_samples), ("val", splits.val))}
        head = model.get_classifier()  # type: ignore[operator]
        if not isinstance(head, nn.Linear) and cfg.head == "linear":
            raise ModelError(f"{cfg.model}'s classifier is {type(head).__name__}, not Linear: use --strategy finetune.")
        head.float().cpu()
        train_probe(head, feats["train"], labels["train"], feats["val"], labels["val"], cfg, class_weights, state)
        distributed.broadcast_module(head, dist)  # every rank trained the same head; rank 0's is kept
        head.to(device)
        state.phase, state.epoch = "finetune", 0
        ckpt.save(model, None, None, state)

    finetunes = cfg.strategy in ("finetune", "lp-ft", "partial")
    if amp.to_measure and finetunes:
        set_trainable(model, cfg.stages_to_train())
        net = model if split is None else split[1]
        batch = distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum_steps, len(train_samples), dist)
        x = acts["train"][:batch] if split is not None else \
            torch.randn(batch, 3, spec.input_size, spec.input_size).contiguous(memory_format=torch.channels_last)
        y = torch.arange(len(x)) % num_classes  # (B,)

        def time_step(dtype: torch.dtype | None) -> float:
            return time_train_step(net, x.to(device), y.to(device), device, dtype, freeze_bn=cfg.bn == "frozen")

        pending = amp
        amp = distributed.run_on_main(lambda: measure_amp(pending, time_step), dist)  # rank 0's choice for all
        _logger.info("amp %s: %s", amp.name, amp.reason)
    elif amp.to_measure:
        amp = AmpChoice(None, "auto: fp32, no fine-tuning phase to measure (the probe trains in fp32)")
    prepared = time.perf_counter()
    if finetunes:
        run_finetune(model, cfg, splits, train_samples, spec, device, amp.dtype, workers, class_weights, state, ckpt,
                     loaded, split=split, acts=acts, dist=dist)
    finetuned = time.perf_counter()
    val_acts = acts.pop("val", None)
    acts.clear()

    model.eval()
    eval_split = "test" if splits.test else "val"
    result = evaluate(model, splits.get(eval_split), spec, cfg, device, amp=None, workers=workers,
                      num_classes=num_classes, desc=f"{eval_split} eval", dist=dist)
    if eval_split == "val":
        val_result = result
    elif split is not None and val_acts is not None:  # the frozen stages' val outputs are still in memory
        loader = make_loader(splits.val, None, cfg, train=False, epoch=0, workers=0, activations=val_acts)
        val_result = summarize(*predict_logits(split[1], loader, device, None, desc="val eval"), num_classes)
    else:
        val_result = evaluate(model, splits.val, spec, cfg, device, amp=None, workers=workers,
                              num_classes=num_classes, desc="val eval", dist=dist)
    del val_acts
    target_result = None
    target_test = target_test_samples(cfg.target_unlabeled, splits.class_names) if cfg.target_unlabeled else None
    if target_test:
        # Target labels are read here only, after training and model selection, to report the result.
        target_result = evaluate(model, target_test, spec, cfg, device, amp=None, workers=workers,
                                 num_classes=num_classes, desc="target test eval")
    elapsed = time.perf_counter() - start
    last_train: dict[str, Any] = state.history[-1] if state.history else {}
    metrics: dict[str, Any] = {
        "eval_split": eval_split,
        f"{eval_split}_acc": result.accuracy,
        f"{eval_split}_loss": result.loss,
        "val_acc": val_result.accuracy,
        "val_loss": val_result.loss,
        "train_acc": last_train.get("train_acc", float("nan")),
        "train_loss": last_train.get("train_loss", float("nan")),
        "train_seconds": round(elapsed, 1),
        # data checks, frozen-stage outputs, probe | fine-tuning epochs | final val/test evaluation
        "phase_seconds": {"setup_and_probe": round(prepared - start, 1), "finetune": round(finetuned - prepared, 1),
                          "evaluation": round(start + elapsed - finetuned, 1)},
        "splits": {eval_split: result.to_dict(splits.class_names), "val": val_result.to_dict(splits.class_names)},
        "history": state.history,
    }
    if cfg.da is not None or target_result is not None:
        metrics["model_selection"] = "held-out source val; no target labels used in training or selection"
    if target_result is not None:
        metrics["target_test_acc"] = target_result.accuracy
        metrics["target_test_loss"] = target_result.loss
        metrics["splits"]["target_test"] = target_result.to_dict(splits.class_names)
    trained = cfg.stages_to_train()
    training = {**asdict(cfg), "data": str(data_dir), "device_used": str(device), "amp_used": amp.name,
                "amp_reason": amp.reason, "amp_step_ms": amp.step_ms,
                "workers_used": workers, "world_size": dist.world_size,
                "stages_trained": "all" if trained is None else trained,
                "frozen_stage_cache": split is not None, "frozen_runtime_used": ",".join(sorted(frozen_used)) or None,
                "train_images": len(train_samples),
                "val_images": len(splits.val), "test_images": len(splits.test),
                "skipped_images": [str(b) for b in splits.skipped]}
    if not dist.is_main:
        distributed.barrier(dist)  # returns once rank 0 has written the artifact
        return out
    extra = {"curves.png": curves_png(state.history),
             "confusion.png": confusion_png(result.confusion, splits.class_names, f"{eval_split} confusion")}
    model.cpu().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    arch = architecture(cfg, num_classes)
    path = save_artifact(out, model, architecture=arch, class_names=splits.class_names, spec=spec,
                         training=training, metrics=metrics, extra_files=extra)
    ckpt.clear()
    distributed.barrier(dist)
    print(format_result(result, splits.class_names, eval_split))
    target_text = f" | target test {target_result.accuracy * 100:.2f}%" if target_result is not None else ""
    print(f"{eval_split} accuracy {result.accuracy * 100:.2f}% | val {val_result.accuracy * 100:.2f}%{target_text} | "
          f"{elapsed:.0f}s | artifact {path}")
    return path


def run_finetune(model: nn.Module, cfg: TrainConfig, splits: Splits, train_samples: list[Sample],
                 spec: PreprocessSpec, device: torch.device, amp: torch.dtype | None, workers: int,
                 class_weights: torch.Tensor, state: RunState, ckpt: Checkpointer,
                 resumed_from: dict[str, Any] | None, split: tuple[nn.Module, StageSuffix] | None = None,
                 acts: dict[str, torch.Tensor] | None = None, dist: DistContext = SINGLE) -> None:
    """Train the unfrozen layers for ``cfg.epochs`` with warm-up + cosine; keep the best val epoch.

    With ``split`` and ``acts`` (cached outputs of the frozen first stages for train and val), the
    epochs run only the layers after the cut.
    """
    set_trainable(model, cfg.stages_to_train())
    net: nn.Module = model if split is None or acts is None else split[1]
    cached = acts if split is not None and acts is not None else {}
    train_model = distributed.data_parallel(net, dist, sync_bn=cfg.sync_bn)  # after freezing
    steps_per_epoch = len(make_loader(train_samples, None, cfg, train=True, epoch=0, workers=0,
                                      dist=dist)) // cfg.grad_accum_steps
    total = cfg.epochs * steps_per_epoch
    adapter = make_adapter(model, cfg, spec, device, workers, total)
    param_groups = finetune_param_groups(model, cfg)
    if adapter is not None and adapter.discriminator is not None:
        param_groups.append({"params": list(adapter.discriminator.parameters()), "lr": cfg.lr,
                             "weight_decay": cfg.weight_decay})
    optimizer = build_optimizer(param_groups, cfg)
    scheduler = warmup_cosine(optimizer, total, int(cfg.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    weight = class_weights.to(device) if cfg.balance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    best_state: dict[str, torch.Tensor] | None = None
    if resumed_from is not None and state.phase == "finetune" and state.epoch > 0:
        try:
            optimizer.load_state_dict(resumed_from["optimizer"])
            scheduler.load_state_dict(resumed_from["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise checkpoint_mismatch(exc, "optimizer state") from exc
        best_state = resumed_from.get("best")
    transform = train_transform(spec, cfg.augment)
    start_epoch = state.epoch if state.phase == "finetune" else 0
    state.phase = "finetune"
    for epoch in range(start_epoch, cfg.epochs):
        # Augmentation + dropout per epoch; each rank draws its own.
        torch.manual_seed(cfg.seed * 100_003 + 7919 * (epoch + 1) + dist.rank)
        t0 = time.perf_counter()
        loader = make_loader(train_samples, transform, cfg, train=True, epoch=epoch, workers=workers,
                             class_weights=class_weights, activations=cached.get("train"), dist=dist)
        train_loss, train_acc = train_one_epoch(train_model, loader, optimizer, scheduler, criterion, device, amp,
                                                scaler, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                                freeze_bn=cfg.bn == "frozen", accum_steps=cfg.grad_accum_steps,
                                                dist=dist, adapter=adapter)
        if cached:
            val_loader = make_loader(splits.val, None, cfg, train=False, epoch=0, workers=0, activations=cached["val"])
            val = summarize(*predict_logits(net, val_loader, device, amp, desc="val"), len(splits.class_names))
        else:
            val = evaluate(model, splits.val, spec, cfg, device, amp, workers, len(splits.class_names), desc="val",
                           dist=dist)
        row = {"phase": "finetune", "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val.loss, "val_acc": val.accuracy, "seconds": round(time.perf_counter() - t0, 1),
               "lr": max(g["lr"] for g in optimizer.param_groups)}
        if adapter is not None:
            row["align_loss"] = adapter.pop_mean_align_loss()
        state.history.append(row)
        _log_epoch(row)
        state.epoch = epoch + 1
        if val.accuracy > state.best_acc:
            state.best_acc, state.best_epoch, state.stale_epochs = val.accuracy, epoch + 1, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state.stale_epochs += 1
        ckpt.save(model, optimizer, scheduler, state, best=best_state)
        if cfg.patience is not None and state.stale_epochs >= cfg.patience:
            _logger.info("early stop: val accuracy has not improved for %d epochs", cfg.patience)
            break
    if best_state is not None and state.best_epoch != state.epoch:
        _logger.info("restoring the best val epoch (%d, val acc %.2f%%)", state.best_epoch, 100 * state.best_acc)
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)


def make_adapter(model: nn.Module, cfg: TrainConfig, spec: PreprocessSpec, device: torch.device, workers: int,
                 total_steps: int) -> DomainAdapter | None:
    """The domain-adaptation hook for the training step, or None without --da."""
    if cfg.da is None or cfg.target_unlabeled is None:
        return None
    target = unlabeled_samples(cfg.target_unlabeled)
    _logger.info("domain adaptation %s (weight %g): %d unlabelled target images from %s", cfg.da, cfg.da_weight,
                 len(target), cfg.target_unlabeled)
    loader = make_loader(target, train_transform(spec, cfg.augment), cfg, train=True, epoch=10_007,
                         workers=workers)
    adapter = DomainAdapter(cfg.da, int(model.num_features), cfg.da_weight, cycle(loader),  # type: ignore[arg-type]
                            total_steps)
    return adapter.to(device)


def _fingerprint(cfg: TrainConfig, splits: Splits) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    # The process count and --grad-accum-steps do not change the math: a run may resume on other hardware.
    skip = ("resume", "workers", "device", "cache_dir", "no_cache", "grad_accum_steps")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return {"config": keep, "classes": splits.class_names, "train": len(splits.train), "val": len(splits.val)}


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(
        prog="python -m tl_deploy.finetune",
        description="Fine-tune a pretrained classifier on an ImageFolder dataset and write a model artifact. "
                    "With no --data, runs the embedded default (Animal-Shape).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder root with train/ and val/ (optional test/), or one class-folder "
                                  "tree with --val-split (default: embedded Animal-Shape)")
    g.add_argument("--val-split", type=float, help="fraction of train/ held out for validation when there is no val/")
    g.add_argument("--limit-per-class", type=int, metavar="K", help="few-shot: at most K training images per class")
    g.add_argument("--balance", choices=BALANCE, default=d.balance, help="class-imbalance handling")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="training augmentation (flip + small affine); off keeps the frozen-stage cache usable")
    g.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default=d.on_bad_image,
                   help="fail: stop at once listing corrupt/non-image files; skip: train without them and list them")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: 0 on small CPUs, else min(8, cores))")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="timm architecture name")
    g.add_argument("--weights", default=d.weights,
                   help="starting weights: embedded (shipped ImageNet weights), hub (download), none, or a file path")
    g.add_argument("--pretrained", action="store_true", help="same as --weights hub")
    g.add_argument("--img-size", type=int, default=d.img_size, help="network input side in pixels")
    g.add_argument("--crop-pct", type=float, default=d.crop_pct, help="center-crop fraction at eval")
    g.add_argument("--interpolation", default=d.interpolation, help="resize filter")
    g.add_argument("--drop-rate", type=float, default=d.drop_rate, help="dropout before the classifier")
    g.add_argument("--bn", choices=BN_MODES, default=d.bn, help="BatchNorm statistics while fine-tuning")
    g.add_argument("--head", choices=HEADS, default=d.head,
                   help="classifier head: linear on the final features, or attention fusion over several depths")
    g.add_argument("--fusion-levels", type=int, default=d.fusion_levels,
                   help="attention-fusion: levels fused (final features + the last N-1 stages)")
    g.add_argument("--fusion-dim", type=int, default=d.fusion_dim, help="attention-fusion: projection width")
    g.add_argument("--no-channel-attention", dest="channel_attention", action="store_false",
                   help="attention-fusion: no channel attention on the fused vector")
    g = p.add_argument_group("unsupervised domain adaptation")
    g.add_argument("--target-unlabeled", metavar="DIR",
                   help="target-domain images without labels (DIR/train/** if present, else DIR/**); a labelled "
                        "DIR/test/ is scored after training, also without --da (the source-only baseline)")
    g.add_argument("--da", choices=DA_METHODS, help="alignment loss: dann, mmd or coral")
    g.add_argument("--da-weight", type=float, default=d.da_weight, help="weight of the alignment loss")
    g = p.add_argument_group("strategy and schedule")
    g.add_argument("--strategy", choices=STRATEGIES, default=d.strategy, help="transfer strategy")
    g.add_argument("--unfreeze", default=d.unfreeze, metavar="N|all|auto",
                   help="backbone stages that train, counted from the output (auto: lp-ft 4, partial 2, finetune all)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    g.add_argument("--probe-epochs", type=int, default=d.probe_epochs, help="linear-probe epochs (cached features)")
    g.add_argument("--batch-size", "-b", type=int, default=d.batch_size)
    g.add_argument("--opt", dest="optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="head learning rate when fine-tuning")
    g.add_argument("--probe-lr", type=float, default=d.probe_lr, help="learning rate of the linear probe")
    g.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult, help="backbone LR = lr * this")
    g.add_argument("--layer-decay", type=float, help="layer-wise LR decay (replaces --backbone-lr-mult)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--weight-decay", "--wd", type=float, default=d.weight_decay)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--patience", type=int, help="early stopping: epochs without val improvement")
    g = p.add_argument_group("run")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="mixed precision")
    g.add_argument("--device", type=device_arg, default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--cache-dir", help="feature cache folder (default: $TL_DEPLOY_CACHE or ~/.cache/tl_deploy)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    g.add_argument("--frozen-runtime", choices=FROZEN_RUNTIMES, default=d.frozen_runtime,
                   help="runs the frozen layers' one-off inference passes: auto (onnxruntime on CPU, several "
                        "times faster there), torch or onnxruntime")
    g.add_argument("--out", help="artifact folder (default: models/<run-name>)")
    g.add_argument("--name", help="run name (default: <data>-<model>-<strategy>)")
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    g = p.add_argument_group("distributed (torchrun --nproc_per_node N -m tl_deploy.finetune ...)")
    g.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps, metavar="K",
                   help="micro-batches per optimizer step on each process; --batch-size stays the global batch")
    g.add_argument("--sync-bn", action="store_true", help="with --bn train: BatchNorm statistics over all "
                                                          "processes (SyncBatchNorm, CUDA only)")
    add_verbose(p)
    apply_ranges(p, RANGES)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.pretrained:
        if args.weights not in ("embedded", "hub"):
            raise TlDeployError("--pretrained and --weights PATH/none contradict each other: pass only one.")
        values["weights"] = "hub"
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        fit(config_from_args(a))
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    sys.exit(main())
