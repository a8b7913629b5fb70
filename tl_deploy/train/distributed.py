"""Data-parallel training under torchrun: PyTorch's DistributedDataParallel, one process per device.

``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`process_group` reads them, joins the group (NCCL on CUDA, gloo on CPU) and
yields a :class:`DistContext` that the training code passes along. Without torchrun the context is one
process and every helper here returns its input unchanged.

The training order does not depend on the number of processes: every rank shuffles the whole training
set with the same (seed, epoch) generator as a single process and takes every ``world_size``-th index
of it (the split of ``DistributedSampler``), so the ranks' micro-batches of one optimizer step together
are exactly the global batch one process draws. ``--batch-size`` is that global batch; each process runs
``batch_size / (world_size * grad_accum_steps)`` images per forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tl_deploy.errors import BackendUnavailableError, TlDeployError

_logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run (one process: rank 0 of 1)."""

    rank: int = 0  # global index of this process
    world_size: int = 1  # number of processes over all nodes
    local_rank: int = 0  # index on this node: the GPU this process drives
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this process's device
    backend: str = ""  # nccl | gloo; empty for one process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs at INFO level and shows progress bars."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: NCCL only moves CUDA tensors."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


SINGLE = DistContext()


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise TlDeployError(f"Invalid RANK/WORLD_SIZE/LOCAL_RANK in the environment ({exc}): "
                            "launch with torchrun, or unset them for one process.") from exc


def is_main_process() -> bool:
    """True in a single process and on rank 0 of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def tqdm_disable() -> bool | None:
    """tqdm's ``disable``: progress bars on rank 0 only (None: shown when attached to a terminal)."""
    return None if is_main_process() else True


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistContext]:
    """Join the torchrun process group for the run (a no-op for one process); leave it afterwards.

    On CUDA each process drives GPU ``LOCAL_RANK``; a group already initialised by the caller is
    reused and left open.
    """
    rank, world, local = env_ranks()
    if world <= 1:
        yield DistContext(device=device)
        return
    if not dist.is_available():
        raise BackendUnavailableError(f"WORLD_SIZE={world} but this torch {torch.__version__} was built without "
                                      "torch.distributed. Run one process, or install a standard torch build.")
    if device.type == "cuda":
        if device.index is not None:
            raise TlDeployError(f"--device {device} pins every process to one GPU; under torchrun use --device cuda "
                                "(or auto): each process takes the GPU of its LOCAL_RANK.")
        if local >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"LOCAL_RANK {local} needs GPU {local} but {torch.cuda.device_count()} are visible: "
                f"use --nproc_per_node {torch.cuda.device_count()} or fewer.")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise TlDeployError(f"Distributed training runs on cuda or cpu devices, not {device}.")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                      backend=str(dist.get_backend()))
    # One log, from rank 0: the other ranks keep warnings only (root too: ``-m tl_deploy.x`` logs as __main__).
    loggers = [logging.getLogger(), logging.getLogger("tl_deploy")]
    levels = [lg.level for lg in loggers]
    if not ctx.is_main:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    _logger.info("distributed: %d processes (%s), rank 0 on %s", ctx.world_size, ctx.backend, device)
    try:
        yield ctx
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if created:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives

def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


@contextlib.contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """The body runs on each node's local rank 0 first, then on the other ranks (e.g. preparing data)."""
    if ctx.enabled and ctx.local_rank != 0:
        dist.barrier()
    yield
    if ctx.enabled and ctx.local_rank == 0:
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small objects and checkpoints)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.comm_device)
    return box[0]


def run_on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` on rank 0 only; every rank returns its result or raises its TlDeployError."""
    result: Any = None
    error: TlDeployError | None = None
    if ctx.is_main:
        try:
            result = fn()
        except TlDeployError as exc:
            if not ctx.enabled:
                raise
            error = exc
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


def broadcast_tensor(tensor: torch.Tensor | None, ctx: DistContext) -> torch.Tensor:
    """Rank 0's CPU tensor on every rank (the other ranks pass None)."""
    if not ctx.enabled:
        assert tensor is not None, "rank 0 must pass a tensor"
        return tensor
    meta = broadcast_object((tuple(tensor.shape), tensor.dtype) if tensor is not None else None, ctx)
    shape, dtype = meta  # type: ignore[misc]
    buf = tensor.to(ctx.comm_device) if tensor is not None else torch.empty(shape, dtype=dtype, device=ctx.comm_device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's."""
    if not ctx.enabled:
        return
    for tensor in module.state_dict().values():  # detached views of the module's own storage
        buf = tensor.to(ctx.comm_device)
        dist.broadcast(buf, src=0)
        tensor.copy_(buf)


def all_gather_cat(local: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0 in rank order; sizes along dim 0 may differ."""
    if not ctx.enabled:
        return local
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=ctx.comm_device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=ctx.comm_device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sums of every rank's numbers (float64)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


# ----------------------------------------------------------------------------- data

def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's contiguous block of ``items`` (blocks differ by at most one item; evaluation, features)."""
    n = len(items)
    return list(items[n * ctx.rank // ctx.world_size: n * (ctx.rank + 1) // ctx.world_size])


def micro_batch_size(global_batch: int, accum_steps: int, num_samples: int, ctx: DistContext) -> int:
    """Images per forward pass on each process so that one optimizer step sees ``global_batch`` images."""
    parts = ctx.world_size * accum_steps
    if global_batch % parts:
        raise TlDeployError(
            f"--batch-size {global_batch} is the global batch: it must split evenly over {ctx.world_size} "
            f"process(es) x {accum_steps} --grad-accum-steps. Use a multiple of {parts}.")
    if parts > 1 and num_samples < global_batch:
        raise TlDeployError(f"--batch-size {global_batch} is larger than the {num_samples} training images: "
                            "lower --batch-size.")
    return global_batch // parts


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank r's items r, r+W, r+2W... of a base sampler that draws the same order on every rank (seeded
    by (seed, epoch)): ``DistributedSampler``'s split, applied to the very shuffle one process draws, so a
    single-process run keeps its order and the ranks' batches of one step add up to its batch.

    ``drop_last`` trims the order to a multiple of W; otherwise it is padded by repeating its start.
    """

    def __init__(self, base: torch.utils.data.Sampler[int], ctx: DistContext, drop_last: bool) -> None:
        self.base, self.rank, self.world, self.drop_last = base, ctx.rank, ctx.world_size, drop_last

    def _total(self, n: int) -> int:
        return n - n % self.world if self.drop_last else -(-n // self.world) * self.world

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        total = self._total(len(order))
        order = (order * (-(-total // max(1, len(order)))))[:total]
        return iter(order[self.rank::self.world])

    def __len__(self) -> int:
        return self._total(len(self.base)) // self.world  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- model

def data_parallel(model: nn.Module, ctx: DistContext, *, sync_bn: bool) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (unchanged for one process). Call after freezing:
    DDP reduces the gradients of the parameters that require them when it is built."""
    if not ctx.enabled:
        return model
    if sync_bn:
        if ctx.device.type != "cuda":
            raise TlDeployError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU kernel. "
                                "Drop --sync-bn for a CPU (gloo) run.")
        from timm.layers import convert_sync_batchnorm  # also converts timm's fused BatchNormAct layers

        model = convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce on the micro-batches before the last of an accumulation step."""
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
