"""Several processes, one result: process-group set-up, rank helpers, sharding and reductions.

Training runs under ``torchrun`` (or ``fsae train --nproc N``, which calls torchrun's own launcher):
each process reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment torchrun sets, and
``process_group(device)`` joins them (NCCL on GPU, one GPU per process; gloo on CPU). Without those
variables, or with ``WORLD_SIZE=1``, nothing is initialised and every helper is the single-process
identity, so library code calls them unconditionally.

Image-wise stages (``fsae cam``, ``fsae crf``, ``fsae eval``) shard their image list with
``shard_indices``: shard ``i`` of ``n`` takes positions ``i, i + n, i + 2n, ...``; the shards are
disjoint and cover the list, so the union of their output files is the single-process output.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from fsae.errors import FsaeError

T = TypeVar("T")


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, evaluates and writes checkpoints."""
    return rank() == 0


@contextmanager
def process_group(device: str = "cpu"):
    """Join torchrun's process group for the ``with`` block (a no-op outside torchrun or with one process).

    NCCL when ``device`` is CUDA (each process takes GPU ``LOCAL_RANK``, so ``"cuda"`` means its own GPU),
    gloo otherwise. The group is destroyed on exit, also after an exception.
    """
    _, world, local_rank = env_world()
    if world <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise FsaeError(f"process with LOCAL_RANK {local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; pass --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def launch(nproc: int, fsae_argv: list[str]) -> None:
    """Run ``python -m fsae <fsae_argv>`` in ``nproc`` processes on this machine with torchrun's own
    launcher (``torch.distributed.run``, ``--standalone``: a local rendezvous on a free port)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "fsae", *fsae_argv])
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(exc.failures.items()))
        raise FsaeError(f"torchrun with {nproc} processes failed: {failed}; their errors are printed above") from exc


def process_device(device: str) -> str:
    """``"cuda"`` -> this process's GPU ``cuda:LOCAL_RANK`` under torchrun; any other device unchanged."""
    _, world, local_rank = env_world()
    return f"cuda:{local_rank}" if device == "cuda" and world > 1 else device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise FsaeError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4 for the first of four shards") from exc
    if not 0 <= index < count:
        raise FsaeError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def current_shard(shard: tuple[int, int] | None = None) -> tuple[int, int]:
    """The shard this process works on: an explicit ``(i, n)``, else ``(rank, world size)``.

    The process group need not be initialised (image-wise stages need no collectives): the rank comes
    from torchrun's environment. Both together (``--shard`` under torchrun) split shard ``i`` further.
    """
    env_rank, env_size, _ = env_world()
    if shard is None:
        return env_rank, env_size
    index, count = shard
    return index * env_size + env_rank, count * env_size


def shard_indices(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Items at positions ``i, i + n, i + 2n, ...`` for ``shard = (i, n)``."""
    index, count = shard
    return list(items[index::count])


def per_rank_batch(global_batch: int, world: int) -> int:
    """The recipe's global batch split evenly over ``world`` processes; refuse an uneven split."""
    if global_batch % world:
        raise FsaeError(f"train.batch_size {global_batch} (the global batch) does not divide by {world} "
                        f"processes; choose a batch size that is a multiple of the process count")
    return global_batch // world


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` over whole batches that can start mid-epoch.

    Epoch ``e`` is a permutation of the data set drawn from ``seed + e`` (``set_epoch``), cut to a
    multiple of the world size; rank ``r`` takes positions ``r, r + N, ...``. Batch ``t`` of every rank
    (``batch_size`` = global batch / N) together is then positions ``t*B .. (t+1)*B - 1`` of the
    permutation, the same images one process with the global batch ``B`` gets at step ``t``.
    ``set_epoch(e, skip_batches=k)`` leaves out this rank's first ``k`` batches (resuming mid-epoch).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` and-ed over every rank (every rank must call it at the same point)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value)
    return value.item() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over every rank (integer sums such as confusion matrices stay exact)."""
    if is_distributed():
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.cuda()
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor)
    return tensor


def mean_over_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-key mean over ranks of logged scalars, NaN entries left out (NaN where every rank has NaN).

    Every rank must pass the same keys in the same order.
    """
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)
    raw = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    finite = ~torch.isnan(raw)
    sums = torch.stack([torch.where(finite, raw, torch.zeros_like(raw)), finite.double()]).to(device)
    all_reduce_sum(sums)
    sums = sums.cpu()
    return {k: (sums[0, i] / sums[1, i]).item() if sums[1, i] > 0 else math.nan for i, k in enumerate(keys)}


__all__ = ["env_world", "is_distributed", "rank", "world_size", "is_main", "process_group", "launch",
           "process_device", "barrier", "parse_shard", "current_shard", "shard_indices", "per_rank_batch",
           "ResumableSampler", "all_true", "all_reduce_sum", "mean_over_ranks"]
