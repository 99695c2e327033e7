"""What one process of a multi-process run needs: its place, device, process group and DDP.

The training loop calls these with a `World`; with the default single-process world every helper
is a no-op, so the one-process path runs exactly as before and needs no process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from siamese_cv.core.errors import UserError

TORCHRUN_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's rank overall and on its node, and how many processes there are of each."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone logs and writes the checkpoint."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The world that torchrun (or `elastic_launch`) describes in RANK, WORLD_SIZE, ..."""
        env = os.environ
        size = int(env["WORLD_SIZE"])
        return cls(
            int(env.get("RANK", env["LOCAL_RANK"])),
            int(env["LOCAL_RANK"]),
            size,
            int(env.get("LOCAL_WORLD_SIZE", size)),
        )


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun or our launcher (so it must not relaunch)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_device(requested: str, world: World) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when training on GPUs, else the CPU.

    Raises:
        UserError: GPUs were asked for and fewer are visible than processes on this node.
    """
    cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if requested.startswith("cuda:") and world.local_size == 1:
        index = int(requested[5:])
    else:
        index = world.local_rank
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= visible:
        raise UserError(
            f"train.devices: {world.local_size} processes on this node need "
            f"{max(index + 1, world.local_size)} GPUs but {visible} are visible; lower "
            "train.devices or set train.device: cpu"
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group (nccl on CUDA, gloo on the CPU) for the block, then leave it cleanly.

    On the CPU each process gets an equal share of the cores unless OMP_NUM_THREADS says otherwise,
    so `devices` processes do not each start one thread per core.
    """
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // world.local_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def wrap(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel when there are several processes (itself otherwise).

    DDP broadcasts rank 0's parameters and buffers on construction, so every rank starts equal,
    and averages gradients in backward; the unwrapped module is what gets saved (no `module.`).
    """
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=ids, output_device=device.index if ids else None
    )


def sync_buffers(module: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before validation.

    DDP broadcasts them before each forward, but the last step updates each rank's copy from its
    own half of the batch; without this the ranks would validate and keep different statistics.
    """
    if not world.distributed:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def average_gradients(module: nn.Module, world: World) -> None:
    """Average the gradients of a module DDP does not wrap (a proxy loss's class vectors).

    Each rank's gradient comes from its share of the step, weighted so that their mean is the
    step's gradient, as DDP averages the model's.
    """
    if not world.distributed:
        return
    import torch.distributed as dist

    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world.size


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-rank number (the epoch's training loss) over all ranks."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / world.size


def cross_rank(loss: nn.Module, miner: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    """Loss and miner that see every rank's embeddings of the step (pytorch-metric-learning).

    The wrappers all-gather embeddings and labels (gradients flow through this rank's own rows
    only) and scale the loss by the world size, so after DDP's averaging the gradient is that of
    the loss over the whole step, as one process computing it would get.
    """
    from pytorch_metric_learning.utils.distributed import (
        DistributedLossWrapper,
        DistributedMinerWrapper,
    )

    return DistributedLossWrapper(loss), None if miner is None else DistributedMinerWrapper(miner)
