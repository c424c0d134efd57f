"""Data-parallel training across processes and machines, on PyTorch's DDP engine.

Launch any training command with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE and
runs the rendezvous (one machine or several):

    torchrun --nproc_per_node 4 -m fundusfm finetune --config C
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m fundusfm pretrain --config C

Contracts kept here:
- `train.batch_size` is the global batch. Each of N processes takes batch_size / N images
  per step, and `shard_order` gives the ranks disjoint shares of the single-process order,
  so 1 and N processes take the same optimisation steps over the same images (only
  BatchNorm statistics differ: per process, unless `train.sync_batchnorm` on GPUs).
- Only rank 0 writes files; the others wait at barriers. The run folder and the data cache
  must be on a filesystem every process sees (always so on one machine).
- Validation and test predictions are computed on each rank's share and gathered, so every
  metric is of every image, in the same order as with one process.
- Without torchrun every function here is a no-op; a one-process torchrun job joins a
  process group (NCCL or gloo) and trains through DDP, as each rank of a larger job does.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm  # timm's BatchNormAct2d keeps its act
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset

from fundusfm.errors import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process started by torchrun, even a job of one process: it joins a process
    group and trains through DDP like every rank of a larger job (`torchrun --nproc_per_node 1`
    checks the NCCL and SyncBatchNorm path on a single GPU)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); return this rank's device."""
    if not launched():
        return device
    if device.type == "mps":
        raise ConfigError("distributed training runs on CUDA GPUs or CPUs, not on MPS")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs; "
                "set torchrun --nproc_per_node to at most the number of GPUs"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (building caches, creating folders), then the others."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


def local_batch(global_batch: int) -> int:
    """Images per process and step for a global batch; it must divide evenly."""
    n = world_size()
    if global_batch % n:
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must be divisible by "
            f"the {n} processes; choose a multiple of {n}"
        )
    return global_batch // n


def shard_order(order: Sequence[int], rank_: int, world: int) -> list[int]:
    """This rank's share of a global sample order: every `world`-th index, from `rank_`.

    The order is first cut to a multiple of `world`. Batches of b consecutive items on each
    rank then together hold exactly the global batch of b * world consecutive items of
    `order`: the single-process batch. For a uniform shuffle this is what
    `DistributedSampler(shuffle=True, drop_last=True)` yields; it also serves the weighted
    (balanced) sampler, which DistributedSampler cannot.
    """
    usable = len(order) // world * world
    return list(order[rank_:usable:world])


class ShardSampler(Sampler[int]):
    """Shards a global sampler's order (drawn identically on every rank) for this rank."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler, self.rank, self.world = sampler, rank(), world_size()

    def __iter__(self) -> Iterator[int]:
        return iter(shard_order(list(self.sampler), self.rank, self.world))

    def __len__(self) -> int:
        return len(self.sampler) // self.world


def shard(dataset: Dataset) -> Dataset:
    """This rank's images for inference (every world-th one); the whole set with one process."""
    n = world_size()
    return dataset if n == 1 else Subset(dataset, range(rank(), len(dataset), n))


def gather_predictions(
    scores: np.ndarray, labels: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's (scores, labels, dataset index), joined and put in dataset order."""
    if world_size() == 1:
        return scores, labels, index
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, (scores, labels, index))
    parts = [p for p in parts if len(p[2])]  # a rank may have had no images
    if not parts:
        return scores, labels, index
    scores, labels, index = (np.concatenate([p[k] for p in parts]) for k in range(3))
    order = np.argsort(index, kind="stable")
    return scores[order], labels[order], index[order]


def gather_list(items: list) -> list:
    """Every rank's list, concatenated in rank order."""
    if world_size() == 1:
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_all(*values: float) -> list[float]:
    """Sums of numbers over all ranks (e.g. training loss totals and image counts)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """The module to train: DDP around `model` under torchrun (any number of processes), else
    `model` itself.

    `model` stays the unwrapped module for saving and inference. SyncBatchNorm converts the
    BatchNorm layers in place (same parameters and buffers); PyTorch runs it on GPUs only.
    """
    if world_size() == 1 and not (dist.is_available() and dist.is_initialized()):
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU "
                "implementation; leave it off for CPU runs"
            )
        convert_sync_batchnorm(model)  # in place: the root is no BatchNorm
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def rng_states() -> list[torch.Tensor]:
    """Every rank's CPU random state, for a checkpoint (rank order)."""
    return gather_list([torch.get_rng_state()])


def restore_rng(states: list[torch.Tensor], fallback: torch.Tensor) -> None:
    """This rank's saved random state; a rank the checkpoint did not have takes `fallback`."""
    r = rank()
    torch.set_rng_state(states[r] if r < len(states) else fallback)
