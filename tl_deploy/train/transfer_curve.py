"""The transfer curve: test accuracy against labelled images per class, per transfer method.

    python -m tl_deploy.experiments transfer-curve [--data DIR] [--shots 1,5,10,50,all] [--seeds 3]

For each labelled-images-per-class budget ("shots") and seed, trains and tests:

- ``scratch``: the same architecture from random weights (BatchNorm in train mode: a random network
  has no statistics worth freezing);
- ``linear``: a linear head on the frozen pretrained backbone, trained on cached features;
- ``finetune``: all layers from the pretrained weights, new head;
- ``lp-ft``: the linear probe above, then all layers;
- ``fusion-linear`` / ``fusion-lp-ft``: the same two with the attention-fusion head (tl_deploy.heads);
- ``few-shot``: the few-shot recipe of ``tl-deploy finetune --strategy linear --limit-per-class K``
  (tl_deploy.train.few_shot) with its own defaults, at the budgets its rule covers (K <= 20): a linear
  head on multi-level features of augmented views, flip TTA; views drawn once for every seed.

The budget is the same for every method so the comparison is fair and cheap: probes take
``--probe-steps`` steps on cached features (the backbone runs once per image for all seeds and
budgets), every run that trains the backbone takes exactly ``--steps`` optimisation steps of
``--batch-size`` images whatever the budget (no validation, no early stopping: a few-shot user has
no labelled validation set). All runs are scored on the same test images: the whole test split, or
a fixed, class-balanced subset of it (``--eval-per-class``). Writes ``results.json`` (every run),
``table.md`` (mean and std of test accuracy) and ``curve.png`` to ``--out``.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.backbones import DEFAULT_MODEL, set_trainable
from tl_deploy.data import Sample, eval_transform, limit_per_class, load_splits, train_transform
from tl_deploy.errors import TlDeployError
from tl_deploy.fileio import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    default_cache_dir,
)
from tl_deploy.heads import MultiLevelClassifier, create_multi_level_model
from tl_deploy.reports import format_table
from tl_deploy.train.config import FEW_SHOT_MAX_PER_CLASS, TrainConfig
from tl_deploy.train.feature_cache import cached_features, compute_view_features
from tl_deploy.train.loaders import make_loader
from tl_deploy.train.loop import predict_logits, train_one_epoch
from tl_deploy.train.optim import build_optimizer, finetune_param_groups, optimizer_kwargs, warmup_cosine
from tl_deploy.train.probe import train_probe_steps
from tl_deploy.train.setup import (
    build_network,
    features_identity,
    resolve_data,
    resolve_device,
    seed_everything,
    weights_identity,
)

_logger = logging.getLogger(__name__)

METHODS = ("scratch", "linear", "finetune", "lp-ft", "fusion-linear", "fusion-lp-ft", "few-shot")
RESULTS_FORMAT = "tl_deploy.transfer-curve"  # marks results.json: a rerun may replace this folder
PROBE_METHODS = {"linear": "linear", "fusion-linear": "attention-fusion"}
TRAINED_METHODS = {"scratch": "linear", "finetune": "linear", "lp-ft": "linear", "fusion-lp-ft": "attention-fusion"}


@dataclass(frozen=True)
class CurveConfig:
    """Every choice of a transfer-curve run; saved in results.json."""

    data: str | None = None  # ImageFolder root; None: the embedded Animal-Shape default
    model: str = DEFAULT_MODEL
    weights: str = "embedded"  # the pretrained starting point (as finetune --weights); scratch uses none
    shots: tuple[str, ...] = ("1", "5", "10", "50")  # labelled images per class; "all" = whole train split
    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    img_size: int = 112  # finetune's default input size: the curve describes the models users train
    steps: int = 20  # optimisation steps of every run that trains the backbone, whatever the budget
    batch_size: int = 16
    optimizer: str = "sgd"  # pretrained runs. 10 shots, val: SGD 1e-3 lp-ft 68.0%, AdamW 1e-3 27.7%, AdamW 1e-4 67.7%
    lr: float = 1e-3  # head LR; the pretrained backbone trains at lr * backbone_lr_mult
    backbone_lr_mult: float = 0.3
    scratch_lr: float = 3e-3  # AdamW, all layers of the scratch baseline (no pretrained features to protect)
    probe_steps: int = 300  # steps of the probes on cached features (full batches up to 256)
    probe_lr: float = 3e-3
    eval_per_class: int | None = None  # a fixed test subset (seed 0) of this many per class; None: the whole split
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    threads: int | None = None  # torch intra-op threads; 1 is fastest when other processes share the cores
    cache_dir: str | None = None
    out: str = "reports/transfer-curve"

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise TlDeployError(f"Invalid --methods {','.join(self.methods)}. Only {', '.join(METHODS)} are supported.")
        for shot in self.shots:
            if shot != "all" and (not shot.isdigit() or int(shot) < 1):
                raise TlDeployError(f"Invalid shot {shot!r} in --shots: use positive integers or 'all', "
                                    "e.g. --shots 1,5,10,50,all.")
        if self.threads is not None and self.threads < 1:
            raise TlDeployError(f"Invalid --threads {self.threads}: use >= 1.")
        if self.seeds < 1 or self.steps < 1 or self.probe_steps < 1 or self.batch_size < 1:
            raise TlDeployError("--seeds, --steps, --probe-steps and --batch-size must be >= 1.")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise TlDeployError(f"Invalid --eval-per-class {self.eval_per_class}: use >= 1, or 0 for the whole "
                                "test split.")

    def train_config(self, seed: int, head: str, scratch: bool = False) -> TrainConfig:
        weights = "none" if scratch else self.weights
        # crop 1.0 and bilinear: the preprocessing the curve's published figures were measured with.
        return TrainConfig(data=self.data, model=self.model, weights=weights, img_size=self.img_size, crop_pct=1.0,
                           interpolation="bilinear",
                           batch_size=self.batch_size, lr=self.scratch_lr if scratch else self.lr,
                           optimizer="adamw" if scratch else self.optimizer, augment=True,
                           backbone_lr_mult=1.0 if scratch else self.backbone_lr_mult, bn="train" if scratch else
                           "eval", seed=seed, head=head, workers=0, device=self.device, cache_dir=self.cache_dir)


# ----------------------------------------------------------------------------- the pieces

def probe(head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, weight_decay: float,
          label_smoothing: float, seed: int) -> None:
    """Train a head on cached (N, D) features for a fixed number of steps (no validation)."""
    generator = torch.Generator().manual_seed(seed)
    params = [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = warmup_cosine(optimizer, steps, 0)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    batch = min(256, len(x))
    head.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=generator)[:batch]
        loss = criterion(head(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    head.eval()


def repeat_to(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` samples drawn as whole shuffled passes over ``samples`` (a fixed number of steps)."""
    generator = torch.Generator().manual_seed(seed)
    out: list[Sample] = []
    while len(out) < count:
        out.extend(samples[i] for i in torch.randperm(len(samples), generator=generator).tolist())
    return out[:count]


def train_steps(model: nn.Module, samples: Sequence[Sample], cfg: TrainConfig, steps: int) -> None:
    """Fine-tune every layer for exactly ``steps`` steps: warm-up + cosine, frozen or train BN per ``cfg``."""
    device = torch.device(cfg.device)
    set_trainable(model, None)
    optimizer = build_optimizer(finetune_param_groups(model, **optimizer_kwargs(cfg)), cfg.optimizer)
    scheduler = warmup_cosine(optimizer, steps, max(1, int(cfg.warmup_epochs * steps)))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    stream = repeat_to(samples, steps * cfg.batch_size, cfg.seed)
    loader = make_loader(stream, train_transform(cfg.spec(), cfg.augment), batch_size=cfg.batch_size, seed=cfg.seed,
                         train=True)  # plain shuffling: the stream already repeats whole passes
    torch.manual_seed(cfg.seed)
    train_one_epoch(model, loader, optimizer, scheduler, criterion, device, None, None, desc="steps",
                    bn_eval=cfg.bn == "eval")


def score(model: nn.Module, samples: Sequence[Sample], cfg: TrainConfig) -> float:
    loader = make_loader(samples, eval_transform(cfg.spec()), batch_size=cfg.batch_size, seed=cfg.seed, train=False)
    logits, labels = predict_logits(model, loader, torch.device(cfg.device), None, desc="test")
    return float((logits.argmax(1) == labels).float().mean())


# ----------------------------------------------------------------------------- the experiment

def transfer_curve(cc: CurveConfig) -> dict[str, Any]:
    """Run every (method, budget, seed); returns and writes the results."""
    cc.validate()
    if cc.threads is not None:
        torch.set_num_threads(cc.threads)
    start = time.perf_counter()
    cc = replace(cc, device=str(resolve_device(cc.device)))  # every run trains on the same device
    base = cc.train_config(0, "linear")
    data_dir = resolve_data(base.data)
    base = replace(base, data=str(data_dir))
    check_output_folder(cc.out, "transfer curve", inputs={"data": data_dir})
    splits = load_splits(data_dir)
    if not splits.test:
        raise TlDeployError(f"{data_dir} has no test/ split: the transfer curve scores on held-out test images.")
    test = limit_per_class(splits.test, cc.eval_per_class, 0) if cc.eval_per_class else splits.test
    test_y = torch.tensor([label for _, label in test])
    num_classes = len(splits.class_names)
    budgets = {shot: {seed: (splits.train if shot == "all" else limit_per_class(splits.train, int(shot), seed))
                      for seed in range(cc.seeds)} for shot in cc.shots}
    device = torch.device(cc.device)
    cache_dir = Path(cc.cache_dir) if cc.cache_dir else default_cache_dir()
    _logger.info("transfer curve on %s: %d classes, shots %s, %d seeds, %d test images, methods %s", data_dir,
                 num_classes, ",".join(cc.shots), cc.seeds, len(test), ",".join(cc.methods))

    few_shot = few_shot_features(cc, base, budgets, test, num_classes, device, cache_dir) \
        if "few-shot" in cc.methods else None

    # Pretrained networks built once; each run starts from a copy (and a freshly seeded head).
    heads_needed = {PROBE_METHODS.get(m) or TRAINED_METHODS[m] for m in cc.methods
                    if m not in ("scratch", "few-shot")}
    templates = {head: build_network(replace(base, head=head), num_classes).eval() for head in sorted(heads_needed)}

    # Frozen-backbone features of every image any budget uses, computed once per head kind.
    union = sorted({s for per_seed in budgets.values() for subset in per_seed.values() for s in subset},
                   key=lambda s: (s[1], str(s[0])))
    row_of = {s: i for i, s in enumerate(union)}
    feats: dict[str, dict[str, torch.Tensor]] = {}
    for head, net in templates.items():
        model_id = features_identity(replace(base, head=head))
        feats[head] = {name: cached_features(net, model_id, samples, base.spec(), device=device, cache_dir=cache_dir,
                                             batch_size=128, desc=f"{head} {name} features")
                       for name, samples in (("train", union), ("test", test))}

    runs: list[dict[str, Any]] = []
    for shot in cc.shots:
        for seed in range(cc.seeds):
            subset = budgets[shot][seed]
            rows = torch.tensor([row_of[s] for s in subset])
            y = torch.tensor([label for _, label in subset])
            for method in cc.methods:
                t0 = time.perf_counter()
                if method == "few-shot":
                    if few_shot is None or shot not in few_shot.shots:
                        continue  # beyond the rule's budgets: finetune uses the plain probe there
                    acc = few_shot.run(subset, y, seed, test_y)
                else:
                    acc = _run_one(method, cc, base, seed, num_classes, templates, feats, rows, y, subset, test,
                                   test_y)
                run = {"method": method, "shots": shot, "seed": seed, "train_images": len(subset),
                       "test_acc": acc, "seconds": round(time.perf_counter() - t0, 2)}
                runs.append(run)
                _logger.info("%-13s shots %-4s seed %d: test acc %6.2f%%  (%.1fs)", method, shot, seed, 100 * acc,
                             run["seconds"])
    elapsed = time.perf_counter() - start
    result = {"format": RESULTS_FORMAT, "config": asdict(cc), "data": str(data_dir), "test_images": len(test),
              "runs": runs, "summary": summarize_runs(runs, cc.methods, cc.shots), "wall_seconds": round(elapsed, 1)}
    write_outputs(Path(cc.out), result, cc)
    return result


def _run_one(method: str, cc: CurveConfig, base: TrainConfig, seed: int, num_classes: int,
             templates: dict[str, nn.Module], feats: dict[str, dict[str, torch.Tensor]], rows: torch.Tensor,
             y: torch.Tensor, subset: list[Sample], test: list[Sample], test_y: torch.Tensor) -> float:
    seed_everything(seed, deterministic=False)
    if method == "scratch":
        cfg = replace(cc.train_config(seed, "linear", scratch=True), data=base.data)
        model = build_network(cfg, num_classes)
        train_steps(model, subset, cfg, cc.steps)
        return score(model, test, cfg)
    head_kind = PROBE_METHODS.get(method) or TRAINED_METHODS[method]
    cfg = replace(cc.train_config(seed, head_kind), data=base.data)
    model = copy.deepcopy(templates[head_kind])
    _reset_head(model, seed)
    head = model.get_classifier()  # type: ignore[operator]
    if method in ("linear", "fusion-linear", "lp-ft", "fusion-lp-ft"):
        probe(head, feats[head_kind]["train"][rows], y, cc.probe_steps, cc.probe_lr, cfg.weight_decay,
              cfg.label_smoothing, seed)
    if method in PROBE_METHODS:
        with torch.no_grad():
            logits = head(feats[head_kind]["test"])  # (N_test, C)
        return float((logits.argmax(1) == test_y).float().mean())
    train_steps(model, subset, cfg, cc.steps)
    return score(model, test, cfg)


@dataclass
class FewShotFeatures:
    """The few-shot recipe's cached features: views of every training image of its budgets, and the test
    images' features averaged with their mirror images' (the network's flip TTA)."""

    shots: tuple[str, ...]  # the budgets the few-shot rule covers
    template: MultiLevelClassifier
    train: torch.Tensor  # (N, V, D)
    row_of: dict[Sample, int]
    test: torch.Tensor  # (N_test, D)
    recipe: TrainConfig  # the finetune defaults the recipe trains with

    def run(self, subset: Sequence[Sample], y: torch.Tensor, seed: int, test_y: torch.Tensor) -> float:
        rows = torch.tensor([self.row_of[s] for s in subset])
        views = self.train.shape[1]
        torch.manual_seed(seed)
        head = copy.deepcopy(self.template.head)
        assert isinstance(head, nn.Linear)  # the multi-level model's head is linear
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        r = self.recipe
        train_probe_steps(head, self.train[rows].flatten(0, 1), y.repeat_interleave(views), steps=r.few_shot_steps,
                          lr=r.probe_lr, weight_decay=r.weight_decay, label_smoothing=r.label_smoothing, seed=seed)
        with torch.no_grad():
            logits = head(self.test)  # (N_test, C)
        return float((logits.argmax(1) == test_y).float().mean())


def few_shot_features(cc: CurveConfig, base: TrainConfig, budgets: dict[str, dict[int, list[Sample]]],
                      test: list[Sample], num_classes: int, device: torch.device,
                      cache_dir: Path) -> FewShotFeatures:
    """The views and test features of the few-shot recipe, computed once (and cached on disk)."""
    recipe = TrainConfig()
    shots = tuple(s for s in cc.shots if s != "all" and int(s) <= FEW_SHOT_MAX_PER_CLASS)
    union = sorted({s for shot in shots for subset in budgets[shot].values() for s in subset},
                   key=lambda s: (s[1], str(s[0])))
    template = create_multi_level_model(cc.model, num_classes, weights=cc.weights).eval()
    identity = f"{weights_identity(cc.model, cc.weights, 0)}|multi-level:{template.levels}"
    spec = base.spec()

    def views_of(samples: list[Sample], views: int, desc: str) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return compute_view_features(template.pooled_levels, template, samples, spec, views=views, seed=0,
                                         device=device, desc=desc)

        return cached_features(template, f"{identity}|views:{views}:0", samples, spec, device=device,
                               cache_dir=cache_dir, desc=desc, compute=compute)

    train = views_of(union, recipe.few_shot_views, "few-shot train views") if union else torch.empty(0)
    test_feats = views_of(test, 2, "few-shot test views").mean(dim=1)  # the image and its mirror image
    return FewShotFeatures(shots, template, train, {s: i for i, s in enumerate(union)}, test_feats, recipe)


def _reset_head(model: nn.Module, seed: int) -> None:
    """A fresh, seeded head of the template's kind."""
    torch.manual_seed(seed)
    head = model.get_classifier()  # type: ignore[operator]
    for module in head.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.reset_parameters()
    final = head if isinstance(head, nn.Linear) else head.fc
    nn.init.trunc_normal_(final.weight, std=0.01)
    nn.init.zeros_(final.bias)


def summarize_runs(runs: Sequence[dict[str, Any]], methods: Sequence[str],
                   shots: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and (sample) std of test accuracy per (method, shots)."""
    out = []
    for method in methods:
        for shot in shots:
            accs = [r["test_acc"] for r in runs if r["method"] == method and r["shots"] == shot]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                out.append({"method": method, "shots": shot, "mean": statistics.fmean(accs), "std": std,
                            "n": len(accs)})
    return out


def format_curve_table(summary: Sequence[dict[str, Any]], methods: Sequence[str], shots: Sequence[str]) -> str:
    """Markdown table: one row per method, one column per budget, ``mean +- std`` in percent."""
    cell = {(s["method"], s["shots"]): f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in summary}
    header = "| method | " + " | ".join(f"{s} / class" for s in shots) + " |"
    lines = [header, "| --- |" + " --- |" * len(shots)]
    lines += ["| " + " | ".join([m, *(cell.get((m, s), "") for s in shots)]) + " |" for m in methods]
    return "\n".join(lines)


def curve_png(summary: Sequence[dict[str, Any]], methods: Sequence[str], shots: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl_deploy.reports import png_bytes

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(len(shots)))
    for method in methods:
        pts = [next((s for s in summary if s["method"] == method and s["shots"] == shot), None) for shot in shots]
        ax.errorbar([x for x, p in zip(xs, pts) if p], [100 * p["mean"] for p in pts if p],
                    yerr=[100 * p["std"] for p in pts if p], marker="o", capsize=3, label=method)
    ax.set_xticks(xs, [str(s) for s in shots])
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def write_outputs(out: Path, result: dict[str, Any], cc: CurveConfig) -> None:
    table = format_curve_table(result["summary"], cc.methods, cc.shots)
    note = (f"Test accuracy (%), mean ± std over {cc.seeds} seeds, {result['test_images']} test images, "
            f"{cc.model} at {cc.img_size} px; backbone runs: {cc.steps} steps x {cc.batch_size} images; "
            f"probes: {cc.probe_steps} steps on cached features; wall time {result['wall_seconds']:.0f} s.")
    png = curve_png(result["summary"], cc.methods, cc.shots, f"Transfer curve: {Path(result['data']).name}")
    check_output_folder(out, "transfer curve")
    with atomic_dir(out) as tmp:  # results, table and plot of one run replace the previous three together
        atomic_write_json(tmp / "results.json", result)
        atomic_write_text(tmp / "table.md", f"{table}\n\n{note}\n")
        atomic_write_bytes(tmp / "curve.png", png)
    print(table)
    print(note)
    rows = [[s["method"], s["shots"], f"{100 * s['mean']:.2f}", f"{100 * s['std']:.2f}"] for s in result["summary"]]
    _logger.debug("\n%s", format_table(["method", "shots", "mean %", "std %"], rows))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'curve.png'}")
