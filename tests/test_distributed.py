"""Distributed fine-tuning: 2 gloo CPU processes (torchrun) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.data import load_splits
from tl_deploy.errors import TlDeployError
from tl_deploy.train import distributed, finetuning
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.distributed import DistContext
from tl_deploy.train.recipe import fit

from .conftest import TINY_MODEL, TINY_SIZE

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """Deterministic, no augmentation, no dropout, frozen BatchNorm: the result cannot depend on the split
    of a global batch over processes, only on float summation order."""
    base = TrainConfig(data=str(data), model=TINY_MODEL, weights="none", img_size=TINY_SIZE, strategy="lp-ft",
                       unfreeze=1, epochs=2, probe_epochs=3, batch_size=8, lr=1e-2, backbone_lr_mult=1.0,
                       augment=False,
                       drop_rate=0.0, bn="frozen", warmup_epochs=0.5, deterministic=True, out=str(out),
                       no_cache=True, workers=0, amp="off", device="cpu")  # pinned: the same on every machine
    return replace(base, **overrides)  # type: ignore[arg-type]


def cli_args(cfg: TrainConfig) -> list[str]:
    args = ["--data", str(cfg.data), "--model", cfg.model, "--weights", cfg.weights, "--img-size", str(cfg.img_size),
            "--strategy", cfg.strategy, "--unfreeze", str(cfg.unfreeze), "--epochs", str(cfg.epochs),
            "--probe-epochs", str(cfg.probe_epochs),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--backbone-lr-mult", str(cfg.backbone_lr_mult),
            "--drop-rate", str(cfg.drop_rate), "--bn", cfg.bn, "--warmup-epochs", str(cfg.warmup_epochs),
            "--workers", "0", "--deterministic", "--no-augment", "--amp", cfg.amp, "--device", cfg.device,
            "--out", str(cfg.out)]
    if cfg.no_cache:
        args.append("--no-cache")
    if cfg.cache_dir:
        args += ["--cache-dir", cfg.cache_dir]
    if cfg.resume:
        args.append("--resume")
    return args


def torchrun(cfg: TrainConfig, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "tl_deploy.finetune", *cli_args(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference run."""
    return fit(config(tiny_data, tmp_path_factory.mktemp("single") / "run"))


# ----------------------------------------------------------------------------- end to end (torchrun)

def test_two_gloo_processes_match_one_process(single: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "run"
    cache = tmp_path / "cache"
    cfg = config(tiny_data, out, no_cache=False, cache_dir=str(cache))
    proc = torchrun(cfg)
    assert proc.stdout.count("test accuracy") == 1  # results printed by rank 0 only
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # one artifact, no checkpoint or temp left
    assert_same_weights(load_artifact(single).model.state_dict(), load_artifact(out).model.state_dict())

    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())
    assert metrics["splits"]["test"]["count"] == 24  # the whole split, gathered from both ranks
    assert sum(map(sum, metrics["splits"]["test"]["confusion_matrix"])) == 24
    assert metrics["test_acc"] == reference["test_acc"]
    assert [h["phase"] for h in metrics["history"]] == [h["phase"] for h in reference["history"]]
    for ours, theirs in zip(metrics["history"], reference["history"]):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)  # over both ranks' images
    assert json.loads((out / "config.json").read_text())["training"]["world_size"] == 2

    # The linear probe's features (train and val) were computed in two halves, gathered, and cached by rank 0;
    # equal weights above mean the gathered features were the right ones, in the right order.
    assert len(list((cache / "features").glob("*.safetensors"))) == 2


def test_distributed_resume_of_a_single_process_checkpoint(single: Path, tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run interrupted in its second epoch resumes on 2 processes and ends where the uninterrupted run did."""
    real_epoch = finetuning.train_one_epoch
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(finetuning, "train_one_epoch", crash_on_second)
    cfg = config(tiny_data, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg)
    assert (tmp_path / ".run.checkpoint").is_dir() and not (tmp_path / "run").exists()
    proc = torchrun(replace(cfg, resume=True))
    assert "resumed" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # checkpoint removed by rank 0
    assert_same_weights(load_artifact(single).model.state_dict(), load_artifact(tmp_path / "run").model.state_dict())


# ----------------------------------------------------------------------------- in one process

def test_gradient_accumulation_keeps_the_global_batch(single: Path, tiny_data: Path, tmp_path: Path) -> None:
    accumulated = fit(config(tiny_data, tmp_path / "accum", grad_accum_steps=4))  # 4 micro-batches of 2
    assert_same_weights(load_artifact(single).model.state_dict(), load_artifact(accumulated).model.state_dict())


@pytest.mark.parametrize("n", [72, 75])
@pytest.mark.parametrize("weighted", [False, True])
def test_ranks_micro_batches_make_up_the_single_process_batches(n: int, weighted: bool) -> None:
    """Per optimizer step, the union of every rank's micro-batches is the one-process batch."""
    world, accum, batch = 2, 2, 8
    micro = batch // (world * accum)

    def order(ctx: DistContext) -> list[int]:
        generator = torch.Generator().manual_seed(5)  # the loader's (seed, epoch) generator
        base: torch.utils.data.Sampler[int] = (
            torch.utils.data.WeightedRandomSampler([1.0 + i % 3 for i in range(n)], n, generator=generator)
            if weighted else torch.utils.data.RandomSampler(range(n), generator=generator))
        return list(distributed.ShardSampler(base, ctx, drop_last=True))

    single = order(distributed.SINGLE)
    ranks = [order(DistContext(rank=r, world_size=world)) for r in range(world)]
    steps = len(ranks[0]) // micro // accum
    assert steps == n // batch
    for step in range(steps):
        got = sorted(i for r in ranks for i in r[step * accum * micro:(step + 1) * accum * micro])
        assert got == sorted(single[step * batch:(step + 1) * batch])


def test_batch_that_does_not_split_is_refused() -> None:
    ctx = DistContext(rank=0, world_size=4)
    with pytest.raises(TlDeployError, match="multiple of 8"):
        distributed.micro_batch_size(12, 2, 100, ctx)
    with pytest.raises(TlDeployError, match="larger than the 5 training images"):
        distributed.micro_batch_size(8, 1, 5, ctx)
    assert distributed.micro_batch_size(32, 2, 100, ctx) == 4


def test_sync_bn_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(TlDeployError, match="add --bn train"):
        TrainConfig(sync_bn=True, bn="frozen").validate()
    with pytest.raises(TlDeployError, match="no CPU kernel"):
        distributed.data_parallel(torch.nn.Linear(2, 2), DistContext(rank=0, world_size=2), sync_bn=True)


# ----------------------------------------------------------------------------- collectives (2 forked processes)

def _collectives_worker(rank: int, port: int, data: str, cache: str) -> None:
    import torch.distributed as dist

    from tl_deploy.backbones import create_model
    from tl_deploy.preprocess import PreprocessSpec
    from tl_deploy.train.feature_cache import cached_features, compute_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    # Uneven blocks (3 and 2 rows) come back whole and in order on every rank.
    rows = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)
    assert torch.equal(distributed.all_gather_cat(rows[distributed.shard(range(5), ctx)], ctx), rows)
    assert distributed.broadcast_tensor(rows if rank == 0 else None, ctx).equal(rows)
    # A failure on rank 0 stops every rank with the same message.
    def fails() -> None:
        raise TlDeployError("disk full on rank 0")

    try:
        distributed.run_on_main(fails, ctx)
        raise AssertionError("run_on_main did not raise")
    except TlDeployError as exc:
        assert "disk full on rank 0" in str(exc)
    # Sharded feature computation, then a cache hit broadcast by rank 0, both equal to one process's result.
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, num_classes=3, weights="none")
    samples = load_splits(data).train[:9]
    spec = PreprocessSpec(input_size=TINY_SIZE, resize=TINY_SIZE)
    cpu = torch.device("cpu")
    alone = compute_features(model, samples, spec, device=cpu, batch_size=4)
    miss = cached_features(model, "m", samples, spec, device=cpu, cache_dir=Path(cache), batch_size=4, dist=ctx)
    hit = cached_features(model, "m", samples, spec, device=cpu, cache_dir=Path(cache), batch_size=4, dist=ctx)
    torch.testing.assert_close(miss, alone)
    assert torch.equal(hit, miss)
    assert len(list((Path(cache) / "features").iterdir())) == 1
    dist.destroy_process_group()


def test_collectives_and_sharded_feature_cache(tiny_data: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_collectives_worker, args=(free_port(), str(tiny_data), str(tmp_path / "cache")), nprocs=2,
                       start_method="fork")
